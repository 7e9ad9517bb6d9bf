#!/usr/bin/env bash
# Install everything the tests need into .venv (and Debian's Chromium for the browser tests) and run every test:
# backend, Slicer Logic on a real slicer-core scene (the Logic package AnyMC3DSlicerLogic installed editable from Logic/),
# the module file in a Slicer-like Python, the extension's CMake build, web review in a real browser.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" "[test]"
cd "$ROOT"
python -m pip install -q -c python_backend/constraints.txt -r requirements-test.txt -e Logic -e "WebReview[test]"
if ! command -v chromium >/dev/null; then  # browser tests drive Debian's Chromium (never `playwright install`)
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null
fi
python -m pytest -q python_backend/tests Testing WebReview/tests "$@"
