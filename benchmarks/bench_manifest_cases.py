"""How long "Add cases from a manifest" holds the Slicer module's event loop: N gzipped NIfTI CT cases (int16, masks
for every other case) listed in a manifest, added to the training case table on a slicer-core scene (a) all on one
thread (read and add each case in turn: what a synchronous import would hold the GUI for) and (b) by
``ManifestImport`` as the module runs it (files read in a thread, one case added per event-loop turn). Reported: (a)'s
total, (b)'s longest single turn (the longest the event loop is held) and its total.
Usage: python benchmarks/bench_manifest_cases.py [--cases 8] [--size 256,256,120] [--repeat 3]
"""

import argparse
import csv
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import SimpleITK as sitk
import slicer
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    SubprocessRunner,
    manifestcases,
    trainingtable,
)


def writeManifest(folder, cases, size):
    rng = np.random.default_rng(0)
    rows = []
    for index in range(cases):
        voxels = (rng.normal(40, 30, size[::-1])).astype(np.int16)
        image = sitk.GetImageFromArray(voxels)
        image.SetSpacing((0.8, 0.8, 2.0))
        sitk.WriteImage(image, os.path.join(folder, f"c{index}.nii.gz"))
        mask = ""
        if index % 2:
            label = sitk.GetImageFromArray((voxels > 80).astype(np.uint8))
            label.CopyInformation(image)
            mask = f"c{index}_mask.nii.gz"
            sitk.WriteImage(label, os.path.join(folder, mask))
        rows.append([f"c{index}.nii.gz", index % 2, mask])
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows([["image", "lesion", "mask"], *rows])
    return path


def freshLogic(folder):
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()  # the label maps' default colour table, as in the application
    colors.SetMRMLApplicationLogic(appLogic)
    colors.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(appLogic)
    volumes.SetMRMLScene(scene)
    logic = AnyMC3DSlicerLogic(scene, runner=SubprocessRunner(), volumesLogic=volumes, volumeRenderingLogic=object(),
                               tempRoot=folder)
    logic.keep = (appLogic, colors)
    return logic, trainingtable.createTrainingTable(scene)


def synchronous(path, folder):
    logic, table = freshLogic(folder)
    plan = manifestcases.readManifest(table, path)
    trainingtable.setTrainingSettings(table, plan.settings)
    start = time.perf_counter()
    for case in plan.cases:
        manifestcases.addCase(logic, table, case, *manifestcases.readCaseFiles(case))
    return time.perf_counter() - start


def eventLoop(path, folder):
    """The module's way, with a minimal event loop: run each scheduled turn when due, timing it."""
    logic, table = freshLogic(folder)
    due, turns = [], []
    logic.schedule = lambda milliseconds, callback: due.append((time.perf_counter() + milliseconds / 1000, callback))
    start = time.perf_counter()
    job = manifestcases.ManifestImport(logic, table, path)
    job.start()
    turns.append(time.perf_counter() - start)  # the click itself: the CSV's check
    while due:
        when, callback = due.pop(0)
        time.sleep(max(0.0, when - time.perf_counter()))
        began = time.perf_counter()
        callback()
        turns.append(time.perf_counter() - began)
    assert job.done and len(job.added) == len(job.plan.cases) and not job.problems, job.problems
    return max(turns), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", default="256,256,120")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    with tempfile.TemporaryDirectory() as folder:
        path = writeManifest(folder, args.cases, size)
        sync, longest, total = [], [], []
        for _ in range(args.repeat):
            sync.append(synchronous(path, folder))
            turn, whole = eventLoop(path, folder)
            longest.append(turn)
            total.append(whole)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.cases} cases of {size} int16 "
          f"(masks for {args.cases // 2}); median of {args.repeat}")
    print(f"(a) one thread, read and add every case: {statistics.median(sync):.2f} s holding the event loop")
    print(f"(b) ManifestImport: longest event-loop turn {1000 * statistics.median(longest):.0f} ms, "
          f"all cases in after {statistics.median(total):.2f} s")
    print(f"the event loop is held {statistics.median(sync) / statistics.median(longest):.1f}x shorter at a time")


if __name__ == "__main__":
    main()
