#!/usr/bin/env bash
# The main job: generate data, train, evaluate and infer both bundles, print the results.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/ci/env.sh"
cd "$root"
exec .venv/bin/python -m hybridseg demo "$@"
