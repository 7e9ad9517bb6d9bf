#!/usr/bin/env bash
# Install the backend into .venv and run the whole path on a demo: backbone + plugin + synthetic CT,
# then predict probabilities (demo/results.json) and a heatmap (demo/heatmaps/*.nii.gz).
set -euo pipefail
source "$(dirname "$0")/_venv.sh" ""
cd "$ROOT"
anymc3d demo demo
anymc3d predict demo/volume.nii.gz --backbone demo/backbone.safetensors --plugin demo/plugin.anymc3d \
  --heatmap demo/heatmaps --json demo/results.json
echo "Results: $ROOT/demo/results.json   Heatmap: $(ls "$ROOT"/demo/heatmaps/*.nii.gz)"
