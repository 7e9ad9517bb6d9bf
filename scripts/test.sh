#!/usr/bin/env bash
# Install the backend and the test packages into .venv and run every test: backend, Slicer Logic on a
# real slicer-core scene.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" "[test]"
cd "$ROOT"
python -m pip install -q -c python_backend/constraints.txt -r requirements-test.txt
python -m pytest -q python_backend/tests Testing "$@"
