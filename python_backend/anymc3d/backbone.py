"""Frozen 2D foundation backbones (DINOv2 / DINOv3 from timm), local weight loading and fingerprints.

The backbone is built by timm from a short name and never edited; weights come only from local files
(our safetensors, a plain timm state dict, an official ``.pth`` read with ``weights_only=True``, or a
transformers checkpoint folder; see :mod:`anymc3d.layouts`) or a cached catalog name (:mod:`anymc3d.catalog`),
mapped by the family's own timm ``checkpoint_filter_fn`` and loaded strictly. A fingerprint of the loaded
weights lets a plugin refuse a backbone it was not made for.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from anymc3d.catalog import resolve_backbone
from anymc3d.errors import BackboneError
from anymc3d.fileio import atomic_path
from anymc3d.layouts import BACKBONES, infer_architecture, name_for_arch, read_checkpoint, read_state
from anymc3d.safeio import loads

logger = logging.getLogger(__name__)

#: safetensors metadata key under which our own backbone files record their architecture.
SPEC_METADATA_KEY = "anymc3d.backbone"


def family(name: str) -> str:
    """'dinov2' or 'dinov3' for a short backbone name."""
    return name.split("_", 1)[0]


@dataclass
class BackboneSpec:
    """Which architecture to build; JSON-serialisable, stored in plugins and in our backbone files."""

    name: str = field(metadata={"help": f"Short backbone name, one of {sorted(BACKBONES)}."})
    img_size: int = field(default=224, metadata={"help": "Nominal input size; other multiples of the patch size work too."})
    depth: Optional[int] = field(default=None, metadata={"help": "Override the block count (small test/demo backbones)."})
    embed_dim: Optional[int] = field(default=None, metadata={"help": "Override the width (small test/demo backbones)."})
    num_heads: Optional[int] = field(default=None, metadata={"help": "Override the head count (small test/demo backbones)."})

    def __post_init__(self):
        if self.name not in BACKBONES:
            raise ValueError(f"backbone.name: unknown backbone {self.name!r}; known: {', '.join(sorted(BACKBONES))}")
        if not isinstance(self.img_size, int) or self.img_size < 1:
            raise ValueError(f"backbone.img_size: must be a positive integer, got {self.img_size!r}")
        for f in ("depth", "embed_dim", "num_heads"):
            value = getattr(self, f)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"backbone.{f}: must be a positive integer or null, got {value!r}")

    @property
    def timm_name(self) -> str:
        return BACKBONES[self.name]

    @property
    def patch_size(self) -> int:
        return 14 if family(self.name) == "dinov2" else 16

    def same_architecture(self, other: "BackboneSpec") -> bool:
        """True when weights of one fit the other (img_size may differ: inputs are sized dynamically)."""
        a, b = asdict(self), asdict(other)
        a.pop("img_size"), b.pop("img_size")
        return a == b

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """What it is, for people (``contract.backbone_description``)."""
        from anymc3d.contract import backbone_description

        return backbone_description(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"backbone: unknown keys {sorted(unknown)}")
        return cls(**d)


def create_backbone(spec: BackboneSpec, device: str | torch.device | None = None) -> nn.Module:
    """Build the timm model for ``spec`` with random init, frozen, in eval mode, no classifier.

    ``dynamic_img_size`` lets plugins with other slice sizes share the resident backbone. ``device="meta"``
    builds the structure without allocating or initialising weights (for loading a file into it at once).
    """
    overrides = {k: v for k, v in (("depth", spec.depth), ("embed_dim", spec.embed_dim), ("num_heads", spec.num_heads)) if v}
    try:
        with torch.device(device or "cpu"):
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=spec.img_size,
                                      dynamic_img_size=True, **overrides)
    except Exception as exc:  # timm raises assorted errors for impossible overrides
        raise BackboneError(f"cannot build backbone {spec.name} with {overrides or 'default settings'}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    return model


def embed_dim(model: nn.Module) -> int:
    return int(model.embed_dim)


def patch_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Patch-grid size (h, w) for a (height, width) input."""
    ph, pw = model.patch_embed.patch_size
    return height // ph, width // pw


def read_weights(path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict and its metadata from safetensors or a ``.pth`` file, never unpickling objects."""
    return read_state(Path(path))


def spec_from_file(path: os.PathLike | str) -> Optional[BackboneSpec]:
    """The architecture a backbone source records: our file's metadata or a transformers folder's config (a
    catalog name is looked up in the cache first); None for plain and official state dicts."""
    path = resolve_backbone(path)
    if path.is_dir():
        return _recorded_spec(path, *read_checkpoint(path)[1:])
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise BackboneError(f"{path}: cannot read backbone weights ({exc})") from exc
    return _recorded_spec(path, metadata, None)


def _recorded_spec(path: Path, metadata: dict, config_spec: Optional[dict]) -> Optional[BackboneSpec]:
    raw = metadata.get(SPEC_METADATA_KEY)
    try:
        if raw is not None:
            return BackboneSpec.from_dict(loads(raw, f"{path}: architecture metadata", max_bytes=1024 ** 2))
        return None if config_spec is None else BackboneSpec(**config_spec)
    except (ValueError, TypeError) as exc:
        raise BackboneError(f"{path}: bad architecture metadata: {exc}") from exc


def resolve_spec(path: Path, state: dict, metadata: dict, config_spec: Optional[dict],
                 spec: Optional[BackboneSpec] = None, arch: Optional[str] = None) -> BackboneSpec:
    """The architecture to build: ``spec`` (a plugin's), else the one the file records, else the one the tensors
    show; ``arch`` (a short or timm name) must agree with what the file shows."""
    found = _recorded_spec(path, metadata, config_spec)
    if spec is None and found is None:
        found = BackboneSpec(**infer_architecture(state, path))
    if arch is not None and found is not None and name_for_arch(arch) != found.name:
        raise BackboneError(f"{path}: holds {found.name}, but --arch {arch} was given")
    if spec is not None and found is not None and not found.same_architecture(spec):
        raise BackboneError(f"{path}: holds {found.describe()} {found.to_dict()}, but {spec.describe()} {spec.to_dict()} "
                            "was asked for")
    return spec or found


def _filter_fn(spec: BackboneSpec):
    if family(spec.name) == "dinov2":
        from timm.models.vision_transformer import checkpoint_filter_fn
    else:
        from timm.models.eva import checkpoint_filter_fn
    return checkpoint_filter_fn


def _check_dinov3_qkv_bias(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """timm's filter silently drops ``qkv.bias`` when the model has none; refuse non-zero ones instead."""
    has_bias = any(name.endswith("q_bias") for name, _ in model.named_parameters())
    bad = [k for k, v in state.items() if k.endswith("attn.qkv.bias") and torch.count_nonzero(v) > 0]
    if bad and not has_bias:
        raise BackboneError(f"{path}: checkpoint has non-zero qkv biases ({bad[0]}), which this DINOv3 architecture "
                            "does not have; it is not a supported DINOv3 checkpoint")


def _resize_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's absolute position embedding resized to the model's grid as DINOv2 and transformers do it:
    bicubic, antialiased for the models with registers only. timm's filter always antialiases, a different
    kernel for the models without (0.5 % off upsampled, 3.6 % from 37x37 to 16x16)."""
    pos = state.get("pos_embed")
    if pos is None or getattr(model, "pos_embed", None) is None:
        return state
    from timm.layers import resample_abs_pos_embed

    grid = tuple(model.patch_embed.grid_size)
    prefix = 1 if math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1 else 0
    if math.isqrt(pos.shape[1] - prefix) == grid[0] and grid[0] == grid[1]:
        return state
    antialias = getattr(model, "num_reg_tokens", 0) > 0
    resized = resample_abs_pos_embed(pos.float(), new_size=list(grid), num_prefix_tokens=prefix, antialias=antialias)
    return {**state, "pos_embed": resized.to(pos.dtype)}


def load_weights(model: nn.Module, spec: BackboneSpec, path: os.PathLike | str, assign: bool = False,
                 state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Load ``path`` (or its already read ``state``) into ``model`` strictly, mapping official key layouts with
    timm's filter.

    ``assign``: the file's tensors (cast to the model's dtypes) become the model's, as a model built on the meta
    device needs; otherwise they are copied into the existing ones."""
    path = Path(path)
    if state is None:
        state = read_checkpoint(resolve_backbone(path))[0]
    state = _mapped_state(state, model, spec, path)
    expected = model.state_dict()
    _check_fit(state, expected, spec, path)
    if assign:
        state = {k: v.to(dtype=expected[k].dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def _mapped_state(state: dict[str, torch.Tensor], model: nn.Module, spec: BackboneSpec,
                  path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors in ``model``'s key layout and position-embedding grid (timm's filter, DINOv3's qkv bias)."""
    state = _resize_pos_embed(state, model)
    if family(spec.name) == "dinov3":
        _check_dinov3_qkv_bias(state, model, path)
        if not any(name.endswith("q_bias") for name, _ in model.named_parameters()):  # all zero (checked above)
            state = {k: v for k, v in state.items() if not k.endswith("attn.qkv.bias")}
    try:
        return _filter_fn(spec)(dict(state), model)  # timm's filter pops from its input
    except Exception as exc:
        raise BackboneError(f"{path}: weights cannot be mapped to {spec.name} ({type(exc).__name__}: {exc})") from exc


def _check_fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], spec: BackboneSpec,
               path: Path) -> None:
    """BackboneError naming ``path`` and the first missing, unexpected and misshapen keys, if any."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("mismatched shapes", wrong_shape)) if items]
        raise BackboneError(f"{path}: weights do not fit backbone {spec.name}: " + "; ".join(parts))


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the backbone's weights (names, shapes, float32 values): the same weights give the same
    fingerprint whatever file layout they came from, and attached LoRA adapters do not change it."""
    digest = hashlib.sha256()
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, tensor in sorted(base.items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LoadedBackbone:
    """A built, weight-loaded, frozen backbone with what identifies it."""

    model: nn.Module
    spec: BackboneSpec
    fingerprint: str
    path: Optional[Path] = None


def load_backbone(path: os.PathLike | str, spec: Optional[BackboneSpec] = None,
                  arch: Optional[str] = None) -> LoadedBackbone:
    """Build the architecture and load the weights into it: the one loader of every command.

    Args:
        path: a backbone file (ours, a plain timm state dict, an official checkpoint), a transformers checkpoint
            folder, or a catalog name cached by ``anymc3d backbone get``.
        spec: the architecture to build (a plugin's); default: recorded in the file, else read from its tensors.
        arch: a short or timm name the file must hold (``--arch``); needed by no supported layout, checked.
    """
    path = resolve_backbone(path)
    state, metadata, config_spec = read_checkpoint(path)
    spec = resolve_spec(path, state, metadata, config_spec, spec, arch)
    # Built on the meta device, the random initialisation (most of the load time: 1.5 s of ViT-S on 2 cores) is
    # skipped, since every weight comes from the file. A buffer made at init and not kept in files (none in the
    # supported families but DINOv3's rotary periods, which timm recomputes) would stay meta: then build for real.
    model = create_backbone(spec, device="meta")
    load_weights(model, spec, path, assign=True, state=state)
    _compute_buffers(model)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = create_backbone(spec)
        load_weights(model, spec, path, state=state)
    return LoadedBackbone(model=model, spec=spec, fingerprint=fingerprint(model), path=path)


def _compute_buffers(model: nn.Module) -> None:
    """Give real values to the buffers that are computed at init and never stored (DINOv3's rotary ``periods``),
    through timm's own ``init_non_persistent_buffers`` of the modules that have one; others stay on meta."""
    try:
        from timm.models._manipulate import reinit_non_persistent_buffers  # timm >= 1.0.20 (in its __all__)
    except ImportError:
        return
    for module in model.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_meta:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")
    reinit_non_persistent_buffers(model)


def save_backbone(model: nn.Module, spec: BackboneSpec, path: os.PathLike | str) -> Path:
    """Write the model's weights as safetensors with the architecture in the metadata (atomic rename)."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={SPEC_METADATA_KEY: json.dumps(spec.to_dict())})
    return path


@torch.no_grad()
def make_load_bearing(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise a random backbone so that every block changes its input (demo and test backbones).

    timm's DINO init starts LayerScale at 1e-5, so a random DINO backbone is near-identity and
    attention near-uniform: tests would pass whatever the code does. Here linear and conv weights get
    std 1/sqrt(fan_in), LayerScale gammas 0.3-1, tokens and position embeddings std 0.5.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and not name.endswith(("pos_embed", "cls_token", "reg_token")):
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        elif name.endswith(("gamma", "gamma_1", "gamma_2")):
            p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
        elif name.endswith(("pos_embed", "cls_token", "reg_token")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model
