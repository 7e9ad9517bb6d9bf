#!/usr/bin/env bash
# Install the backend into .venv and run the main job on a demo: make a demo backbone, train a small plugin on a
# synthetic lesion task (about two minutes on 2 CPU cores; demo/trained/), then predict a held-out case with the
# trained plugin as a user would: probabilities and a heatmap (demo/results.json, demo/heatmaps/).
set -euo pipefail
source "$(dirname "$0")/_venv.sh" ""
cd "$ROOT"
anymc3d demo demo
anymc3d predict demo/trained/heldout.nii.gz --backbone demo/trained/backbone.safetensors \
  --plugin demo/trained/lesion.anymc3d --heatmap-method grad_rollout --heatmap demo/heatmaps --json demo/results.json
python - <<'PY'
import json
import numpy as np, SimpleITK as sitk
demo, (record,) = json.load(open("demo/trained/demo.json")), json.load(open("demo/results.json"))
result = record["results"][0]
heat = sitk.GetArrayFromImage(sitk.ReadImage(result["heatmap"]))
lesion = sitk.GetArrayFromImage(sitk.ReadImage(demo["heldout"]["lesion_mask"])) > 0
peak = np.unravel_index(np.argmax(heat), heat.shape)
print(f"demo backbone: {demo['backbone']}")
print(f"task: {demo['task']}")
print(f"trained plugin demo/trained/lesion.anymc3d: validation AUROC {demo['validation_auroc']:.3f}")
print(f"held-out case demo/trained/heldout.nii.gz (has a lesion at IJK {demo['heldout']['lesion_center_ijk']}):")
print(f"  probabilities {result['probabilities']}  decisions {result['decisions']}")
print(f"  heatmap {result['heatmap']}: maximum at IJK {list(map(int, peak[::-1]))}, "
      f"{'inside' if lesion[peak] else 'outside'} the lesion")
PY
