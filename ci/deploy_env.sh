#!/usr/bin/env bash
# Creates (or reuses) the MONAI Deploy environment in .venv-deploy: this repository (editable) plus
# monai-deploy-app-sdk with pydicom and highdicom, every package pinned (ci/constraints.txt keeps torch at
# the local CPU build; ci/deploy-constraints.txt pins the SDK and what it pulls). A separate environment
# because the SDK pulls about 3 GB (holoscan, cupy, tritonclient) that the bundles do not need.
# Re-installs only when pyproject.toml or either constraints file changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HYBRIDSEG_DEPLOY_VENV:-$root/.venv-deploy}"
python="${PYTHON:-python3}"
stamp="$venv/.hybridseg-deploy-installed"
want="$(cat "$root/pyproject.toml" "$root/ci/constraints.txt" "$root/ci/deploy-constraints.txt" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
    echo "[deploy-env] creating $venv"
    "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[deploy-env] installing the MONAI Deploy App SDK into $venv (first run takes about 4 minutes)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -c "$root/ci/constraints.txt" -c "$root/ci/deploy-constraints.txt" \
        -e "$root" monai-deploy-app-sdk pydicom highdicom onnx onnxruntime \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    # The SDK breaks `import monai` without pydicom/highdicom; fail here, not in the first test.
    (ulimit -s 32768 2>/dev/null || true; "$venv/bin/python" -c "import monai, monai.deploy.core, highdicom, holoscan")
    echo "$want" > "$stamp"
fi
