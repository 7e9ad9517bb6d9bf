#!/usr/bin/env bash
# The demo's last step (scripts/demo.sh): predict the held-out case of DEMO/trained (made by `anymc3d demo DEMO`)
# with the trained plugin into DEMO/review/, the review page's layout (the case, results/heldout.json,
# results/heatmaps/ with one grad_rollout map per finding, the method that finds the demo's lesion), print what
# the prediction found, and print the commands that show it in the browser. Needs `anymc3d` on PATH.
set -euo pipefail
DEMO="${1:-demo}"
TRAINED="$DEMO/trained"
REVIEW="$DEMO/review"
VENV_SHOWN="${ANYMC3D_VENV:-.venv}"
rm -rf "$REVIEW"  # the demo's own output folder: remade at each run (results are never overwritten in place)
mkdir -p "$REVIEW/results/heatmaps"
cp "$TRAINED/heldout.nii.gz" "$REVIEW/heldout.nii.gz"
anymc3d predict "$REVIEW/heldout.nii.gz" --backbone "$TRAINED/backbone.safetensors" \
  --plugin "$TRAINED/lesion.anymc3d" --heatmap-method grad_rollout --heatmap "$REVIEW/results/heatmaps" \
  --heatmap-format nrrd --json "$REVIEW/results/heldout.json" --progress none
DEMO="$DEMO" REVIEW="$REVIEW" python - <<'PY'
import json
import os

import numpy as np
import SimpleITK as sitk

demo_dir, review = os.environ["DEMO"], os.environ["REVIEW"]
demo = json.load(open(f"{demo_dir}/trained/demo.json"))
(record,) = json.load(open(f"{review}/results/heldout.json"))
result = record["results"][0]
heat = sitk.GetArrayFromImage(sitk.ReadImage(result["heatmap"]))
lesion = sitk.GetArrayFromImage(sitk.ReadImage(demo["heldout"]["lesion_mask"])) > 0
peak = np.unravel_index(np.argmax(heat), heat.shape)
print(f"demo backbone: {demo['backbone']}")
print(f"task: {demo['task']}")
print(f"trained plugin {demo_dir}/trained/lesion.anymc3d: validation AUROC {demo['validation_auroc']:.3f}")
print(f"held-out case {review}/heldout.nii.gz (has a lesion at IJK {demo['heldout']['lesion_center_ijk']}):")
print(f"  probabilities {result['probabilities']}  decisions {result['decisions']}")
print(f"  heatmap {os.path.relpath(result['heatmap'])}: maximum at IJK {list(map(int, peak[::-1]))}, "
      f"{'inside' if lesion[peak] else 'outside'} the lesion")
PY
echo
echo "Look at the results in a browser (the command prints the address to open):"
echo "  $VENV_SHOWN/bin/anymc3d review $REVIEW"
echo "or activate the environment first (then 'anymc3d' is on PATH):"
echo "  source $VENV_SHOWN/bin/activate && anymc3d review $REVIEW"
echo "To also run cases and click-similarity from the page, add:"
echo "  --backbone $TRAINED/backbone.safetensors --plugin $TRAINED/lesion.anymc3d"
