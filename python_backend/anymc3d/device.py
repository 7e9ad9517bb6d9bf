"""Where the backbone runs and in which precision: the one device resolution and the one precision rule.

``--device auto`` is CUDA when present, else the CPU. ``--precision auto`` is bf16 where the device computes it
natively (a CUDA GPU with bf16; a CPU with AMX-BF16 or AVX-512-BF16, detected at run time) and fp32 elsewhere,
for predictions without a heatmap or with a method whose bf16 maps held the agreement bounds (:data:`BF16_METHODS`).
Reduced precision applies to the frozen backbone only; slice embeddings, patch maps, pooling, head, calibration and
probabilities are float32. bf16 means bf16 matrix products in the blocks' MLPs (:func:`place_backbone`), two
thirds of a ViT block's multiply-adds, from a cached bf16 copy of their fp32 weights; attention, norms, layer
scales and the residual stream stay fp32. Over 40 volumes through a trained backbone that form moved a calibrated
probability by 0.005 at most, where a bf16 copy of the whole model moved one by 0.018 and bf16 products in
attention too by 0.013 (bound 0.01; docs/model.md). Setting the environment variable ``ANYMC3D_NO_BF16=1``
reports bf16 as unavailable, so ``auto`` gives fp32 everywhere (tests, or a CPU that misreports).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from anymc3d.contract import PRECISIONS
from anymc3d.errors import AnyMC3DError

logger = logging.getLogger(__name__)

#: environment switch: when set to a non-empty value other than "0", bf16 counts as unavailable
NO_BF16_ENV = "ANYMC3D_NO_BF16"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: whether "auto" may pick bf16 at all (tests/test_precision.py checks the agreement bounds it depends on)
AUTO_BF16 = True
#: heatmap methods whose bf16 maps held the agreement bounds against fp32 over 40 trained-backbone volumes
#: (tests/test_precision.py, docs/model.md); "auto" computes every other method (the gradient maps, whose maxima
#: moved at near-ties, occlusion and the lifted kinds' maps, not measured) in fp32
BF16_METHODS = frozenset({"attention", "rollout"})
#: what the PlaneCycle ``features`` and ``similarity`` commands pass as their output: never agreement-tested in
#: bf16, so "auto" keeps them fp32
FEATURES = "features"
#: CPU flags (Linux /proc/cpuinfo, as lscpu shows them) that mean bf16 GEMMs run in hardware
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnyMC3DError("device 'cuda' was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    return device


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware (False when ``ANYMC3D_NO_BF16`` is set)."""
    if os.environ.get(NO_BF16_ENV, "") not in ("", "0"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and _cpu_bf16()


@functools.lru_cache(maxsize=None)
def _cpu_bf16() -> bool:
    """The CPU's answer, read once per process ("auto" asks again at every prediction)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if any(probe() for probe in probes if probe is not None):
        return True
    return bool(_cpu_flags() & set(_BF16_CPU_FLAGS))


def resolve_precision(precision: str | torch.dtype, device: torch.device, heatmap: str | None = None) -> torch.dtype:
    """The backbone dtype for ``precision`` ("auto", "fp32", "bf16", "fp16" or a torch float dtype) on ``device``;
    "auto" is fp32 for a run whose heatmap method is not in :data:`BF16_METHODS`."""
    if isinstance(precision, torch.dtype):
        if precision not in NAMES:
            raise AnyMC3DError(f"precision: {precision} is not one of {', '.join(map(str, NAMES))}")
        return precision
    if precision not in PRECISIONS:
        raise AnyMC3DError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        bf16 = AUTO_BF16 and native_bf16(device) and (heatmap is None or heatmap in BF16_METHODS)
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    """'fp32', 'bf16' or 'fp16': how records and logs name the precision used."""
    return NAMES[dtype]


def placement(backbone: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """A ViT backbone's device and compute dtype (its patch embedding's): a bf16 backbone takes bf16 inputs."""
    weight = next(p for n, p in backbone.named_parameters() if n.startswith("patch_embed.") and p.ndim == 4)
    return weight.device, weight.dtype


def place_backbone(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a ViT backbone to ``device`` in the precision ``dtype`` (in place; returns it): bf16 runs the blocks'
    MLP products in bf16 with fp32 weights and an fp32 stream around them (the form the agreement tests hold to
    their bounds); fp16 casts the weights; fp32 undoes either."""
    products = dtype == torch.bfloat16
    model.to(device, torch.float32 if products else dtype)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
            module.__class__ = _linear_class(name) if products and ".mlp." in name else torch.nn.Linear
    return model


def backbone_dtype(model: torch.nn.Module) -> torch.dtype:
    """The precision a backbone computes in: bf16 when its MLP products are bf16 (:func:`place_backbone`), else
    the dtype of its weights."""
    if any(isinstance(m, _Bf16Linear) for m in model.modules()):
        return torch.bfloat16
    return placement(model)[1]


class _Bf16Linear(torch.nn.Linear):
    """A Linear whose product runs in bf16 from a bf16 copy of its fp32 weight, made again whenever the weight
    changes (LoRA folding, moves); its output is fp32 (a layer that feeds the residual stream)."""

    keep_bf16 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device)
        cached = self.__dict__.get("_bf16")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: gradient maps reuse the copy
                bias = None if self.bias is None else self.bias.to(torch.bfloat16)
                cached = self.__dict__["_bf16"] = (key, self.weight.to(torch.bfloat16), bias)
        weight, bias = cached[1:]
        if torch.is_grad_enabled() and self.weight.requires_grad:  # training through it: the weight's gradient
            weight, bias = self.weight.to(torch.bfloat16), None if self.bias is None else self.bias.to(torch.bfloat16)
        y = torch.nn.functional.linear(x.to(torch.bfloat16), weight, bias)
        return y if self.keep_bf16 else y.float()


class _Bf16InnerLinear(_Bf16Linear):
    """The same, for a layer whose output stays inside the MLP (its first layer): the activation runs in bf16 and
    the second layer takes it without a cast."""

    keep_bf16 = True


#: MLP layers whose output stays inside the MLP (timm ViT and Eva names, SwiGLU included)
_INNER = (".mlp.fc1", ".mlp.fc1_g", ".mlp.fc1_x")


def _linear_class(name: str) -> type:
    return _Bf16InnerLinear if name.removesuffix(".base_layer").endswith(_INNER) else _Bf16Linear


def autocast(device: torch.device, dtype: torch.dtype = torch.bfloat16, enabled: bool = True):
    """Mixed precision where fp32 master weights must stay (training): bf16 autocast on CUDA only, since CPU
    autocast casts around every GEMM and measured slower than a bf16 copy of the weights. Elsewhere a no-op."""
    if enabled and device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def in_chunks(total: int, chunk_size: int, step: Callable[[int, int], list],
              progress: Optional[Callable[[int, int], None]] = None) -> list[list]:
    """Run ``step(start, stop) -> list of results`` over [0, total) in chunks and collect each result in order.

    A chunk's results are kept only when its step completed: a CUDA out-of-memory error halves the chunk and redoes
    the whole unit, so a retry can never duplicate or drop rows. Every chunked forward (slice encoders, the
    slice-wise PlaneCycle baseline) goes through here.
    """
    if total < 1:
        raise ValueError("no slices to encode")
    start, size, collected = 0, chunk_size, []
    if progress:
        progress(0, total)
    while start < total:
        stop = min(total, start + size)
        try:
            results = step(start, stop)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("CUDA out of memory: retrying with %d slices per chunk", size)
            continue
        collected.append(results)
        start = stop
        if progress:
            progress(start, total)
    return [list(column) for column in zip(*collected)]
