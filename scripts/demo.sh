#!/usr/bin/env bash
# Install the backend, the Slicer module's Logic and the web review into .venv and run the main job on a demo: make a
# demo backbone, train a small plugin on a synthetic lesion task (about two minutes on 2 CPU cores; demo/trained/),
# then predict a held-out case with the trained plugin as a user would, into a folder in the review page's layout
# (demo/review/: the case, results/heldout.json, results/heatmaps/), and print how to look at it.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" ""
python -m pip install -q -c "$ROOT/python_backend/constraints.txt" -e "$ROOT/Logic" -e "$ROOT/WebReview"
cd "$ROOT"
anymc3d demo demo
bash scripts/demo_review.sh demo
