"""Engine throughput against the plain timm forward, measured in the same run (not a timed test).

For each backbone it times, on the same preprocessed slices:
  timm      plain ``forward_features`` over the slices in chunks (fp32), no LoRA, no pooling: the floor;
  engine    ``Engine.predict_slices``: active LoRA adapter, CLS, task-query pooling, head, calibration;
  engine+hm the same with the paper's attention heatmap.
and prints volumes/s and the ratios to the timm forward. Runs on CPU, and on CUDA where present
(where the engine uses bf16 autocast, so the timm row is also given in bf16).

    python benchmarks/bench_engine.py                      # CPU, ViT-S/14, 16 slices of 224^2
    python benchmarks/bench_engine.py --device cuda --backbones dinov2_vitl14_reg --slices 64
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from anymc3d.backbone import BackboneSpec, LoadedBackbone, create_backbone, make_load_bearing
from anymc3d.demo import random_plugin
from anymc3d.engine import Engine
from anymc3d.plugin import LoadedPlugin
from anymc3d.preprocessing import to_model_input


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, device: torch.device, slices: int, size: int, chunk: int, repeats: int, depth=None) -> list[str]:
    spec = BackboneSpec(name, img_size=size, depth=depth)
    model = make_load_bearing(create_backbone(spec))
    config, head, lora = random_plugin(model, spec, preprocessing=None)
    plain = make_load_bearing(create_backbone(spec)).to(device)  # same weights, no adapters
    engine = Engine(LoadedBackbone(model, spec, config.backbone_fingerprint), device=device, chunk_size=chunk)
    plugin = engine.add_plugin(LoadedPlugin(config=config, head=head, lora=lora))
    volume = torch.rand(slices, size, size)

    def timm_forward(dtype=torch.float32):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for start in range(0, slices, chunk):
                plain.forward_features(to_model_input(volume[start:start + chunk].to(device)))[:, 0]

    rows = [("timm fp32", _time(timm_forward, device, repeats))]
    if device.type == "cuda":
        rows.append(("timm bf16", _time(lambda: timm_forward(torch.bfloat16), device, repeats)))
    rows.append(("engine", _time(lambda: engine.predict_slices([volume], plugin), device, repeats)))
    rows.append(("engine+heatmap", _time(lambda: engine.predict_slices([volume], plugin, heatmap="attention"),
                                         device, repeats)))
    base = rows[0][1]
    out = [f"{name} ({'depth ' + str(depth) if depth else 'full depth'}), {slices} slices of {size}^2, chunk {chunk}, "
           f"median of {repeats}"]
    for label, seconds in rows:
        out.append(f"  {label:16s} {seconds * 1000:9.1f} ms/volume  {1 / seconds:7.2f} volumes/s  "
                   f"time ratio to timm fp32 {seconds / base:5.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu).")
    parser.add_argument("--backbones", nargs="+", default=["dinov2_vits14_reg", "dinov3_vits16"],
                        help="Short backbone names (default: dinov2_vits14_reg dinov3_vits16).")
    parser.add_argument("--slices", type=int, default=16, help="Slices per volume (default: 16).")
    parser.add_argument("--size", type=int, default=224, help="Slice size, a multiple of both patch sizes (default: 224).")
    parser.add_argument("--chunk-size", type=int, default=16, help="Slices per forward (default: 16).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats, median reported (default: 3).")
    parser.add_argument("--depth", type=int, default=None, help="Fewer blocks, for a quick smoke run (default: full).")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# anymc3d engine benchmark {datetime.date.today()}  device={device}  torch={torch.__version__}  "
          f"threads={torch.get_num_threads()}  cpu={platform.processor() or platform.machine()}"
          + (f"  gpu={torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    for name in args.backbones:
        print("\n".join(bench(name, device, args.slices, args.size, args.chunk_size, args.repeats, args.depth)))


if __name__ == "__main__":
    main()
