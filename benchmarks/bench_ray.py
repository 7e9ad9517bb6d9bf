"""Cases per second of `anymc3d predict`: the local engine against Ray Data with 1 and 2 model workers, all
measured in this one run on the same synthetic volumes, plugin and heatmap settings (not a timed test).

Rows:
  local      one process: engine load once, then each case read, predicted, heatmap and record written
             (anymc3d.records.predict_case, the CLI's loop)
  ray N      `anymc3d predict --ray --workers N` on a local Ray instance: a read stage of Ray tasks and an actor
             pool of N model workers, each case's record committed by the worker (anymc3d.scoring)

Columns: wall (whole run, including the model load in each worker), steady cases/s (between the first and the last
committed record, i.e. without start-up), and for Ray the overhead per case against local at steady state
(1/rate_ray - 1/rate_local) and the start-up (wall - cases / steady rate).

    python benchmarks/bench_ray.py                     # CPU, ViT-S/14 at 224^2, 12 cases of 32 slices
    python benchmarks/bench_ray.py --device cuda --num-gpus-per-worker 1 --cases 64
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from anymc3d.backbone import BackboneSpec, create_backbone, make_load_bearing, save_backbone
from anymc3d.cases import expand_inputs
from anymc3d.demo import random_plugin
from anymc3d.engine import Engine
from anymc3d.plugin import save_plugin
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.records import predict_case, write_records
from anymc3d.synthetic import make_ct_volume


def _setup(folder: Path, args) -> tuple[Path, Path, Path]:
    spec = BackboneSpec(args.backbone, img_size=args.img_size)
    model = make_load_bearing(create_backbone(spec), seed=0)
    backbone = folder / "backbone.safetensors"
    save_backbone(model, spec, backbone)
    config, head, lora = random_plugin(model, spec, preprocessing=PreprocessConfig(input_size=args.img_size))
    plugin = save_plugin(folder / "plugin.anymc3d", config, head, lora)
    cases = folder / "cases"
    cases.mkdir()
    import SimpleITK as sitk

    for i in range(args.cases):
        volume = make_ct_volume(size=(args.in_plane, args.in_plane, args.slices), spacing=(0.8, 0.8, 3.0), seed=i)
        sitk.WriteImage(volume, str(cases / f"case{i:03d}.nii.gz"))
    return backbone, plugin, cases


def _steady_rate(times: list[float]) -> float:
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


def _local(backbone, plugin, cases, out: Path, args) -> dict:
    start = time.perf_counter()
    engine = Engine(backbone, device=args.device)
    names = [engine.add_plugin(plugin)]
    loaded = time.perf_counter()
    heat = out / "heat_local"
    heat.mkdir()
    done, records = [], []
    for case in expand_inputs([str(cases)]):
        records.append(predict_case(engine, case, names, heatmap_method="attention", heatmap_dir=heat))
        done.append(time.perf_counter())
    write_records(out / "local.json", records)
    assert all(r["status"] == "ok" for r in records)
    return {"wall": time.perf_counter() - start, "load": loaded - start, "steady": _steady_rate(done)}


def _ray(backbone, plugin, cases, out: Path, workers: int, args) -> dict:
    from anymc3d.cli import main

    json_path = out / f"ray{workers}.json"
    argv = ["predict", str(cases), "--backbone", str(backbone), "--plugin", str(plugin), "--device", args.device,
            "--heatmap", str(out / f"heat_ray{workers}"), "--json", str(json_path), "--progress", "none",
            "--ray", "--workers", str(workers), "--cpus-per-worker", str(args.cpus_per_worker),
            "--num-gpus-per-worker", str(args.num_gpus_per_worker)]
    start = time.perf_counter()
    code = main(argv)
    wall = time.perf_counter() - start
    assert code == 0, code
    commits = [p.stat().st_mtime for p in Path(f"{json_path}.parts").glob("*.json") if p.name != "run.json"]
    return {"wall": wall, "steady": _steady_rate(commits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2_vits14_reg", help="Backbone name (default: dinov2_vits14_reg).")
    parser.add_argument("--img-size", type=int, default=224, help="Slice size (default: 224).")
    parser.add_argument("--cases", type=int, default=12, help="Number of volumes (default: 12).")
    parser.add_argument("--slices", type=int, default=32, help="Slices per volume (default: 32).")
    parser.add_argument("--in-plane", type=int, default=128, help="In-plane voxels of each volume (default: 128).")
    parser.add_argument("--device", default="cpu", help="Device (default: cpu).")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts (default: 1 2).")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all).")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs per model worker (default: 0.5).")
    parser.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per model worker (default: 0).")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"# bench_ray {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}")
    print(f"# {args.backbone} at {args.img_size}^2, {args.cases} cases of {args.slices} slices "
          f"({args.in_plane}x{args.in_plane}), attention heatmap written per case")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone, plugin, cases = _setup(tmp, args)
        rows = {"local": _local(backbone, plugin, cases, tmp, args)}
        import ray

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        try:
            for workers in args.workers:
                rows[f"ray {workers}"] = _ray(backbone, plugin, cases, tmp, workers, args)
        finally:
            ray.shutdown()
    local = rows["local"]["steady"]
    print(f"{'run':<8} {'wall s':>8} {'cases/s (wall)':>15} {'cases/s (steady)':>17} {'overhead s/case':>16} "
          f"{'start-up s':>11}")
    for name, row in rows.items():
        overhead = "" if name == "local" else f"{1 / row['steady'] - 1 / local:16.3f}"
        startup = row["load"] if name == "local" else row["wall"] - args.cases / row["steady"]
        print(f"{name:<8} {row['wall']:8.1f} {args.cases / row['wall']:15.3f} {row['steady']:17.3f} "
              f"{overhead:>16} {startup:11.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
