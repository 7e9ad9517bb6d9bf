"""How long the Slicer module's import of a finished run blocks the GUI thread: a 512x512x300 case with three
findings (one gzipped float32 NRRD heatmap each, as the backend writes them), imported by the Logic on a slicer-core
scene, (a) all at once (``importResults``, what the module did before) and (b) with the read-ahead the module now
uses (``PredictionJob`` with ``readAhead``: the table and the first-shown heatmap at once, the other two read in
threads and filled in by polls from the event loop). Reported: the blocking time until the table and first heatmap
are shown, the longest single poll (the longest the event loop is held afterwards) and the time until every heatmap
is in. Usage: python benchmarks/bench_slicer_import.py [--size 512,512,300] [--repeat 3]
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import SimpleITK as sitk
import slicer
from anymc3d.contract import heatmap_name
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    CaseResult,
    DisplayOptions,
    PredictionJob,
    PredictionOptions,
    SubprocessRunner,
)
from AnyMC3DSlicerLogic import outputs as out

LABELS = ("nodule", "effusion", "fracture")
PROBABILITIES = {"nodule": 0.8, "effusion": 0.3, "fracture": 0.55}


def scene():
    made = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(made)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(appLogic)
    volumes.SetMRMLScene(made)
    rendering = slicer.vtkSlicerVolumeRenderingLogic()
    rendering.SetMRMLApplicationLogic(appLogic)
    rendering.SetMRMLScene(made)
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(made)
    return made, volumes, rendering, appLogic


def writeCase(folder, size):
    """Heatmaps with the input's geometry (smooth blobs, so gzip sees realistic data) and the record naming them."""
    i, j, k = size
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, k, dtype=np.float32), np.linspace(-1, 1, j, dtype=np.float32),
                             np.linspace(-1, 1, i, dtype=np.float32), indexing="ij")
    heatmaps = {}
    for index, label in enumerate(LABELS):
        voxels = np.exp(-((xx - 0.3 * index) ** 2 + yy ** 2 + zz ** 2) * 4).astype(np.float32)
        image = sitk.GetImageFromArray(voxels / voxels.max())
        path = os.path.join(folder, heatmap_name("case", "p", label, "nrrd"))
        sitk.WriteImage(image, path, useCompression=True)
        heatmaps[label] = path
    record = {"image": "case.nrrd", "status": "ok", "error": None, "slicing_axis": 2, "num_slices": k,
              "results": [{"plugin": "p", "plugin_path": "p.anymc3d", "task": "multilabel", "labels": list(LABELS),
                           "probabilities": PROBABILITIES, "probabilities_raw": PROBABILITIES,
                           "thresholds": dict.fromkeys(LABELS, 0.5), "decisions": {lab: PROBABILITIES[lab] >= 0.5 for lab in LABELS},
                           "slicing_axis": 2, "slice_importance": [1.0 / k] * k, "heatmap_method": "grad_rollout",
                           "heatmap": None, "finding_heatmaps": heatmaps}]}
    return record


def inputNode(madeScene, size):
    voxels = np.zeros(size[::-1], dtype=np.int16)
    node = out.volumeNodeFromArray(voxels, np.diag([-1.0, -1.0, 1.0, 1.0]), "case")  # SimpleITK's default (LPS) in RAS
    madeScene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def once(source, record, size, readAhead):
    madeScene, volumes, rendering, _ = scene()
    logic = AnyMC3DSlicerLogic(madeScene, runner=SubprocessRunner(), volumesLogic=volumes, volumeRenderingLogic=rendering)
    folder = tempfile.mkdtemp(prefix="bench-import-")
    shutil.rmtree(folder)
    shutil.copytree(source, folder)
    local = {**record, "results": [{**record["results"][0], "finding_heatmaps": {
        label: os.path.join(folder, os.path.basename(path)) for label, path in record["results"][0]["finding_heatmaps"].items()}}]}
    volume = inputNode(madeScene, size)
    options, display = PredictionOptions(heatmapMethod="grad_rollout"), DisplayOptions()
    started = time.perf_counter()
    if not readAhead:
        logic.importResults(local, [volume], options, display)
        blocked = time.perf_counter() - started
        shutil.rmtree(folder)
        return blocked, blocked, blocked
    logic.readAhead = True
    job = PredictionJob(logic, "case", [volume], None, folder, 1, options, display, None, None)
    imported = job._import(local)
    first = time.perf_counter() - started
    job.result = CaseResult("case", "ok", "", 0, imported)
    longest = 0.0
    while job.heatmapReads:
        time.sleep(0.05)  # the event loop's timer interval
        poll = time.perf_counter()
        job.pollHeatmaps()
        longest = max(longest, time.perf_counter() - poll)
    assert all(out.pendingHeatmapFile(node) is None for node in imported.heatmapNodes) and not os.path.exists(folder)
    return first, longest, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512,512,300")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    source = tempfile.mkdtemp(prefix="bench-import-source-")
    try:
        record = writeCase(source, size)
        once(source, record, size, True)  # warm-up (imports, file cache)
        results = {False: [], True: []}
        for _ in range(args.repeat):
            for readAhead in (False, True):
                results[readAhead].append(once(source, record, size, readAhead))
    finally:
        shutil.rmtree(source, ignore_errors=True)
    print(f"slicer import benchmark: {platform.node()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    print(f"case: {size[0]}x{size[1]}x{size[2]}, 3 findings, one gzipped float32 NRRD heatmap each; default display "
          "options (volume rendering on); n={args.repeat} each, alternating".replace("{args.repeat}", str(args.repeat)))

    def line(name, values):
        print(f"{name:<64} median {statistics.median(values):.2f} s, max {max(values):.2f} s")

    line("all at once (importResults): GUI blocked for", [r[0] for r in results[False]])
    line("read-ahead: GUI blocked until the table and first heatmap show", [r[0] for r in results[True]])
    line("read-ahead: longest single poll afterwards (GUI held)", [r[1] for r in results[True]])
    line("read-ahead: until every heatmap is in", [r[2] for r in results[True]])
    ratio = statistics.median([r[0] for r in results[False]]) / statistics.median([r[0] for r in results[True]])
    print(f"ratio, blocking time all at once / read-ahead until first shown: {ratio:.2f}")


if __name__ == "__main__":
    main()
