"""How long the DICOM export of one case takes (``anymc3d.dicom_out.export_record``: the SR and one Parametric Map)
on a CT-sized series, and how large the objects are. No model: a pydicom series and a heatmap on its grid.

    python benchmarks/bench_dicom.py [--size 512 512 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_backend" / "tests"))
from dicom_series import write_series  # noqa: E402

from anymc3d.demo import write_demo  # noqa: E402
from anymc3d.dicom_out import export_record  # noqa: E402
from anymc3d.image_reading import read_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 100), metavar=("COLS", "ROWS", "SLICES"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cols, rows, slices = args.size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = write_demo(tmp / "demo")
        write_series(tmp / "ct", np.random.default_rng(0).normal(0, 200, (slices, rows, cols)).astype(np.int16))
        image = read_image(tmp / "ct")
        heat = sitk.GetImageFromArray(np.random.default_rng(1).random((slices, rows, cols), dtype=np.float32))
        heat.CopyInformation(image)
        sitk.WriteImage(heat, str(tmp / "ct__demo_findings.nii.gz"))
        labels = ["lesion", "effusion", "fracture"]
        record = {"image": str(tmp / "ct"), "status": "ok", "error": None, "slicing_axis": 2, "num_slices": slices,
                  "results": [{"plugin": "demo_findings", "plugin_path": str(demo["plugin"]), "task": "multilabel",
                               "labels": labels, "probabilities": dict.fromkeys(labels, 0.6),
                               "probabilities_raw": dict.fromkeys(labels, 0.55), "thresholds": dict.fromkeys(labels, 0.5),
                               "decisions": dict.fromkeys(labels, True), "slicing_axis": 2,
                               "slice_importance": [1 / slices] * slices, "heatmap_method": "attention",
                               "heatmap": str(tmp / "ct__demo_findings.nii.gz"), "finding_heatmaps": {}}]}
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            written = export_record(record, tmp / "dicom")
            times.append(time.perf_counter() - start)
        sizes = {Path(p).name: Path(p).stat().st_size for p in written}
    print(json.dumps({"series": f"{cols}x{rows}x{slices} int16, {slices} files", "export_s": [round(t, 2) for t in times],
                      "bytes": sizes}))


if __name__ == "__main__":
    main()
