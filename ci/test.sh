#!/usr/bin/env bash
# Runs the whole test suite (and ruff) in the project's environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/ci/env.sh"
cd "$root"
.venv/bin/python -m ruff check bundles tests ci
# Two cores: one worker per core; the slowest tests are the whole-network and bundle runs.
.venv/bin/python -m pytest -n 2 --timeout 900 "$@"
