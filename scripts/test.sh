#!/usr/bin/env bash
# Install the backend with its test extras into .venv and run every test (backend and Slicer Logic).
set -euo pipefail
source "$(dirname "$0")/_venv.sh" "[test]"
cd "$ROOT"
python -m pytest -q python_backend/tests "$@"
