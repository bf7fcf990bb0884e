#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv with every dependency pinned.
# Re-installs only when pyproject.toml or ci/constraints.txt changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HYBRIDSEG_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.hybridseg-installed"
want="$(cat "$root/pyproject.toml" "$root/ci/constraints.txt" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
    echo "[env] creating $venv"
    "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[env] installing pinned dependencies into $venv (first run takes a few minutes)"
    # The constraints file keeps torch at the local CPU build on this and every later install.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/ci/constraints.txt" \
        -e "$root[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$want" > "$stamp"
fi
