"""A stand-in for ``python -m anymc3d`` that follows docs/cli-contract.md (SlicerNNUnet's MockProcess idea).

It reads the image with SimpleITK, prints the contract's ``--progress json`` lines, writes heatmaps with the
input's geometry under temporary names and renames them, and writes the JSON records. A "plugin" here is a JSON
file: {"name": ..., "task": ..., "labels": [...], "thresholds": {...}, "probabilities": {...}}.

FAKE_ANYMC3D_MODE selects a behaviour: ok (default), fail (the case fails, exit 1), fatal (exit 2 before any
image), hang (spawns a grandchild, writes both pids to FAKE_ANYMC3D_PIDS, sleeps), missing_heatmap (exit 0 but
no heatmap file: a contract breach the Logic must catch).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from anymc3d.contract import (
    AUTO_HEATMAP,
    GRADIENT_METHODS,
    PARTIAL_MARKER,
    heatmap_name,
    image_stem,
)

MODE = os.environ.get("FAKE_ANYMC3D_MODE", "ok")


def emit(**event):
    print(json.dumps(event), flush=True)


def predictOne(image, plugins, args, index, cases):
    import numpy as np
    import SimpleITK as sitk

    emit(event="progress", case=index, cases=cases, image=image, stage="reading", done=0, total=1)
    if MODE == "fail":
        raise ValueError(f"Cannot read {image}: not a valid image")
    try:
        itkImage = sitk.ReadImage(image.split("+")[0])
    except RuntimeError:
        raise ValueError(f"{image}: not a readable image") from None
    voxels = sitk.GetArrayFromImage(itkImage).astype(np.float32)  # (K, J, I)
    numSlices = voxels.shape[0]
    for done in range(1, numSlices + 1):
        emit(event="progress", case=index, cases=cases, image=image, stage="encoding", done=done, total=numSlices)
        if MODE == "hang":
            time.sleep(0.05)
    emit(event="progress", case=index, cases=cases, image=image, stage="heatmap", done=0, total=1)
    heat = voxels - voxels.min()
    heat = (heat / heat.max() if heat.max() > 0 else heat).astype(np.float32)
    importance = heat.reshape(numSlices, -1).mean(axis=1) + 1e-3
    importance = importance / importance.sum()
    emit(event="progress", case=index, cases=cases, image=image, stage="writing", done=0, total=1)
    results = []
    # "auto": a plugin's best measured method, else its kind's default; these plugins were never measured and are
    # slice plugins, whose default is attention (anymc3d.engine.auto_heatmap_method)
    method = "attention" if args.heatmap_method == AUTO_HEATMAP else args.heatmap_method
    for pluginIndex, plugin in enumerate(plugins):
        gradient = method in GRADIENT_METHODS
        heatmaps = {}
        for label in (plugin["labels"] if gradient else [None]):
            name = heatmap_name(image_stem(image.split("+")[0]), plugin["name"], label, args.heatmap_format)
            path = os.path.abspath(os.path.join(args.heatmap, name))
            out = sitk.GetImageFromArray(np.clip(heat * (1.0 - 0.1 * pluginIndex) ** (1 + len(heatmaps)), 0, 1).astype(np.float32))
            out.CopyInformation(itkImage)
            if MODE != "missing_heatmap":
                temporary = os.path.join(args.heatmap, f".{name}{PARTIAL_MARKER}.{args.heatmap_format}")
                sitk.WriteImage(out, temporary)
                os.replace(temporary, path)
            heatmaps[label] = path
        probabilities = plugin["probabilities"]
        results.append({
            "plugin": plugin["name"], "plugin_path": plugin["path"], "task": plugin["task"], "labels": plugin["labels"],
            "probabilities": probabilities, "probabilities_raw": probabilities, "thresholds": plugin["thresholds"],
            "decisions": {label: probabilities[label] >= plugin["thresholds"][label] for label in plugin["labels"]},
            "slicing_axis": 2, "slice_importance": importance.tolist(), "heatmap_method": method,
            "heatmap": None if gradient else heatmaps[None],
            "finding_heatmaps": {label: path for label, path in heatmaps.items() if label} if gradient else {},
        })
    return {"image": os.path.abspath(image), "status": "ok", "error": None, "slicing_axis": 2,
            "num_slices": numSlices, "results": results}


def main():
    parser = argparse.ArgumentParser(prog="anymc3d")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--backbone", required=True)
    predict.add_argument("--plugin", action="append", required=True)
    predict.add_argument("--heatmap")
    predict.add_argument("--heatmap-method", default="auto")
    predict.add_argument("--heatmap-format", default="nii.gz")
    predict.add_argument("--json")
    predict.add_argument("--ensemble", action="store_true")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--chunk-size", type=int, default=32)
    predict.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    predict.add_argument("--progress", default="bar")
    argv = sys.argv[1:]
    if argv[:1] == ["standby"]:  # the backend's `anymc3d standby`: the command line comes as one JSON line on stdin
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        argv = json.loads(line)
    args = parser.parse_args(argv)
    if MODE == "fatal":
        print("anymc3d: error: the backbone file is not a safetensors file", file=sys.stderr)
        return 2
    if MODE == "hang":
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["FAKE_ANYMC3D_PIDS"], "w") as file:
            json.dump([os.getpid(), grandchild.pid], file)
    os.makedirs(args.heatmap, exist_ok=True)
    plugins = []
    for path in args.plugin:
        with open(path) as file:
            plugins.append(dict(json.load(file), path=os.path.abspath(path)))
    if args.ensemble:
        plugins = [dict(plugins[0], name="ensemble", path=[p["path"] for p in plugins])]
    emit(event="start", cases=len(args.images))
    records, failed = [], 0
    for index, image in enumerate(args.images):
        try:
            records.append(predictOne(image, plugins, args, index, len(args.images)))
            emit(event="case_done", case=index, image=image, status="ok", error=None)
        except Exception as error:  # noqa: BLE001 - like the backend: report the case, go on
            failed += 1
            records.append({"image": image, "status": "error", "error": str(error), "slicing_axis": None,
                            "num_slices": None, "results": []})
            emit(event="case_done", case=index, image=image, status="error", error=str(error))
    if MODE == "hang":
        time.sleep(600)
    with open(args.json + ".tmp", "w") as file:
        json.dump(records, file)
    os.replace(args.json + ".tmp", args.json)
    emit(event="done", ok=len(records) - failed, failed=failed, json=args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
