#!/usr/bin/env bash
# Create .venv and install tether with its test dependencies.
# torch is pinned to 2.13.0 first (a CPU wheel on this project's machines); set TORCH_SPEC to
# choose another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"  # the tested versions exactly
echo "tether installed in .venv"
