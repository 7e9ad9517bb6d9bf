"""PlaneCycle-lifted forward against slice-wise 2D and full-3D attention: time and peak memory, one run.

Three ways to encode a (D, 3, M, M) volume with the same frozen DINOv2 ViT-S/14 (12 blocks, load-bearing
random weights; the speed does not depend on the values):

  slicewise  timm's ``forward_features`` on the D slices (one batch of D sequences of G + h*w tokens);
  lifted     :class:`anymc3d.planecycle.converter.PlaneCycleEncoder`, default cycle HW,DW,DH,HW, PCg;
  full3d     the same 2D stem, then every block on ONE sequence of G + D*h*w tokens (all tokens attend to
             all), then the final norm: the quadratic baseline PlaneCycle avoids.

Each method and size runs in a fresh subprocess: peak memory is the growth of the process's peak RSS
(``ru_maxrss``) during the first forward, over the RSS after building the model and the input; time is the
median of the later forwards. fp32 on CPU (correctness runs are fp32 only; this is speed).

    python benchmarks/bench_planecycle.py                  # two sizes, prints a table and the ratios
    python benchmarks/bench_planecycle.py --out benchmarks/results/planecycle-cpu.txt
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

METHODS = ("slicewise", "lifted", "full3d")


def _worker(method: str, depth: int, size: int, repeats: int, threads: int) -> dict:
    import resource

    import torch
    from anymc3d.backbone import BackboneSpec, create_backbone, make_load_bearing
    from anymc3d.planecycle.converter import lift

    torch.set_num_threads(threads)
    model = make_load_bearing(create_backbone(BackboneSpec("dinov2_vits14_reg", img_size=size)))
    volume = torch.randn(1, depth, 3, size, size)
    encoder = lift(model)

    def full3d():
        tokens, _ = encoder.stem(volume[0])  # (D, G + h*w, C)
        g = model.num_prefix_tokens
        x = torch.cat([tokens[:1, :g], tokens[:, g:].reshape(1, -1, tokens.shape[-1])], dim=1)  # (1, G + D*h*w, C)
        for blk in model.blocks:
            x = blk(x)
        return model.norm(x)

    run = {"slicewise": lambda: model.forward_features(volume[0]),
           "lifted": lambda: encoder.forward_features(volume),
           "full3d": full3d}[method]
    kib = 1024 if sys.platform != "darwin" else 1
    with torch.inference_mode():
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    h = size // 14
    return {"method": method, "depth": depth, "size": size, "tokens": depth * h * h,
            "seconds": statistics.median(times) if times else first, "peak_mib": (peak - base) * kib / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="16x112,24x224",
                        help="Volumes as DxM (D slices of M x M pixels), comma-separated (default: 16x112,24x224).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed forwards after the first (default: 2).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2).")
    parser.add_argument("--out", default=None, help="Also write the report to this file (default: stdout only).")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, depth, size = args.worker.split(":")
        print(json.dumps(_worker(method, int(depth), int(size), args.repeats, args.threads)))
        return
    rows = []
    for item in args.sizes.split(","):
        depth, size = (int(v) for v in item.lower().split("x"))
        for method in METHODS:
            repeats = args.repeats if method != "full3d" or depth * (size // 14) ** 2 <= 2048 else 1
            out = subprocess.run([sys.executable, __file__, "--worker", f"{method}:{depth}:{size}",
                                  "--repeats", str(repeats), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  done {method} {depth}x{size}", file=sys.stderr)
    lines = [(f"# bench_planecycle  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  "
              f"{platform.processor() or platform.machine()}  torch threads {args.threads}"),
             "# DINOv2 ViT-S/14 reg4, 12 blocks, fp32, CPU; time = median forward, peak = peak-RSS growth in the forward",
             f"{'volume':>14} {'tokens':>7} {'method':>10} {'time s':>9} {'peak MiB':>9} {'time/2D':>8} {'mem/2D':>8}"]
    for item in args.sizes.split(","):
        depth, size = (int(v) for v in item.lower().split("x"))
        group = {r["method"]: r for r in rows if r["depth"] == depth and r["size"] == size}
        ref = group["slicewise"]
        for method in METHODS:
            r = group[method]
            grid = size // 14
            lines.append(f"{f'{depth}x{grid}x{grid} ({size}px)':>14} {r['tokens']:>7} {method:>10} {r['seconds']:>9.3f} "
                         f"{r['peak_mib']:>9.1f} {r['seconds'] / ref['seconds']:>8.2f} "
                         f"{r['peak_mib'] / max(ref['peak_mib'], 1e-9):>8.2f}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
