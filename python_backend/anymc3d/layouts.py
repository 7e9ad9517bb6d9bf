"""Backbone checkpoints in the layouts users have them, read into one layout and named.

Three layouts are read: a plain timm state dict, an official DINOv2/DINOv3 checkpoint (safetensors, or a
``.pth`` read with ``weights_only=True``), and a transformers checkpoint folder (``config.json`` +
``model.safetensors``) of ``Dinov2Model``, ``Dinov2WithRegistersModel`` or ``DINOv3ViTModel``. A transformers
checkpoint is renamed into the official layout, so that timm's own ``checkpoint_filter_fn`` maps all of them
onto timm. The architecture (short name, input size and size overrides) is read from the transformers config
or inferred from the tensors' names and shapes; what cannot be mapped exactly is refused in one line.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import safetensors
import torch

from anymc3d.safeio import read_json
from anymc3d.errors import BackboneError

#: short name -> timm architecture. DINOv3 maps to timm's bias-free variants on purpose: the ``_qkvb``
#: variants compute qkv with ``F.linear(x, qkv.weight)``, which would bypass a LoRA wrapper on ``qkv``.
BACKBONES: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
    "dinov3_vits16": "vit_small_patch16_dinov3",
    "dinov3_vitb16": "vit_base_patch16_dinov3",
    "dinov3_vitl16": "vit_large_patch16_dinov3",
}

#: (family, embed_dim, depth) of the published sizes -> (size letter, heads); heads cannot be read from tensors
STANDARD_SIZES = {("dinov2", 384, 12): ("s", 6), ("dinov2", 768, 12): ("b", 12), ("dinov2", 1024, 24): ("l", 16),
                  ("dinov2", 1536, 40): ("g", 24), ("dinov3", 384, 12): ("s", 6), ("dinov3", 768, 12): ("b", 12),
                  ("dinov3", 1024, 24): ("l", 16)}
PATCH = {"dinov2": 14, "dinov3": 16}
REGISTERS = 4  # timm's DINOv2 "_reg4" and every DINOv3 have four register tokens
HF_ARCHITECTURES = ("Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel")


def short_name(family: str, size: str, registers: bool) -> str:
    return f"{family}_vit{size}{PATCH[family]}" + ("_reg" if registers and family == "dinov2" else "")


def name_for_arch(arch: str) -> str:
    """A short name or a timm model name (e.g. 'vit_small_patch14_reg4_dinov2') -> the short name."""
    if arch in BACKBONES:
        return arch
    by_timm = {v: k for k, v in BACKBONES.items()}
    if arch in by_timm:
        return by_timm[arch]
    raise BackboneError(f"--arch {arch!r}: not a supported backbone; give one of {', '.join(sorted(BACKBONES))} "
                        "or its timm name")


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------


def _is_plugin_file(path: Path) -> bool:
    """A plugin (a zip holding plugin.json) given where backbone weights belong."""
    import zipfile

    from anymc3d.plugin_file import JSON_NAME

    try:
        with zipfile.ZipFile(path) as archive:
            return JSON_NAME in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict of tensors and its metadata from safetensors or a ``.pth`` file, never unpickling objects."""
    if not path.is_file():
        raise BackboneError(f"{path}: backbone weights file not found")
    if _is_plugin_file(path):
        raise BackboneError(f"{path}: this is a plugin file: use --plugin {path} (and --backbone for the backbone's "
                            "weights it was trained on)")
    try:
        if path.suffix == ".safetensors":
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            metadata = {}
    except Exception as exc:
        raise BackboneError(f"{path}: cannot read backbone weights ({type(exc).__name__}: {exc})") from exc
    for key in ("teacher", "model", "state_dict"):  # official checkpoints sometimes nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("backbone."): v for k, v in state.items()}, metadata


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Optional[dict]]:
    """``(state, metadata, architecture)`` of a file or transformers folder; the architecture (keyword
    arguments of ``BackboneSpec``) comes from a transformers config, else None."""
    if path.is_dir():
        return _read_transformers(path)
    state, metadata = read_state(path)
    return state, metadata, None


def _read_transformers(folder: Path) -> tuple[dict, dict, dict]:
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise BackboneError(f"{folder}: a backbone folder must hold a transformers checkpoint (config.json and "
                            "model.safetensors)")
    try:
        config = read_json(config_path, max_bytes=1_000_000)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackboneError(str(exc) if str(config_path) in str(exc) else f"{config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise BackboneError(f"{config_path}: not a JSON object")
    state, metadata = read_state(weights)
    state = {re.sub(r"^(dinov2|dinov3|model)\.(?=embeddings\.|encoder\.|layernorm\.|norm\.|model\.)", "", k): v
             for k, v in state.items()}  # a checkpoint saved from a model with a head nests the backbone
    arch = (config.get("architectures") or [None])[0]
    kind = config.get("model_type")
    try:
        if kind == "dinov2" or kind == "dinov2_with_registers":
            spec = _hf_spec(config, "dinov2")  # the input size the position embedding was made for, as inferred
            spec["img_size"] = _pos_embed_side(state["embeddings.position_embeddings"].shape[1], folder) * PATCH["dinov2"]
            return _from_hf_dinov2(state, config, kind == "dinov2_with_registers"), metadata, spec
        if kind == "dinov3_vit":
            return _from_hf_dinov3(state, config), metadata, _hf_spec(config, "dinov3")
    except KeyError as exc:
        raise BackboneError(f"{folder}: transformers checkpoint lacks tensor {exc}") from None
    raise BackboneError(f"{folder}: transformers model {arch or kind!r} is not a supported backbone (supported: "
                        f"{', '.join(HF_ARCHITECTURES)})")


def _hf_spec(config: dict, family: str) -> dict:
    """BackboneSpec keywords for a transformers config, refusing options timm's architecture does not have."""
    dim, depth, heads = config.get("hidden_size"), config.get("num_hidden_layers"), config.get("num_attention_heads")
    checks = {"patch_size": (config.get("patch_size"), PATCH[family]), "num_channels": (config.get("num_channels", 3), 3),
              "hidden_act": (config.get("hidden_act"), "gelu"),
              "layer_norm_eps": (config.get("layer_norm_eps"), 1e-6 if family == "dinov2" else 1e-5),
              "intermediate_size": (config.get("intermediate_size", 4 * (dim or 0)) if family == "dinov3"
                                    else round(config.get("mlp_ratio", 4) * (dim or 0)), 4 * (dim or 0))}
    if family == "dinov3":
        checks.update(use_gated_mlp=(config.get("use_gated_mlp", False), False), key_bias=(config.get("key_bias"), False),
                      num_register_tokens=(config.get("num_register_tokens"), REGISTERS),
                      proj_bias=(config.get("proj_bias", True), True), mlp_bias=(config.get("mlp_bias", True), True),
                      rope_theta=(config.get("rope_theta", 100.0), 100.0))
    else:
        checks.update(use_swiglu_ffn=(config.get("use_swiglu_ffn", False), False),
                      qkv_bias=(config.get("qkv_bias", True), True))
        if config.get("model_type") == "dinov2_with_registers":
            checks["num_register_tokens"] = (config.get("num_register_tokens"), REGISTERS)
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise BackboneError(f"config.json: {key}={value!r} has no timm DINO counterpart (needs {wanted!r})")
    registers = family == "dinov3" or config.get("model_type") == "dinov2_with_registers"
    size, standard_heads = STANDARD_SIZES.get((family, dim, depth), ("s", None))
    image = config.get("image_size", 224)
    spec = {"name": short_name(family, size, registers), "img_size": int(image if isinstance(image, int) else image[0])}
    if heads != standard_heads:
        spec.update(depth=depth, embed_dim=dim, num_heads=heads)
    return spec


def _qkv(prefix: str, names: tuple[str, str, str], state: dict, suffix: str, dim: int) -> torch.Tensor:
    """Join separate query, key and value tensors into timm's ``qkv`` (a missing bias is zero)."""
    parts = []
    for name in names:
        key = f"{prefix}{name}.{suffix}"
        parts.append(state[key] if key in state or suffix == "weight" else torch.zeros(dim))
    return torch.cat(parts, 0)


def _from_hf_dinov2(state: dict, config: dict, registers: bool) -> dict:
    """transformers Dinov2Model / Dinov2WithRegistersModel tensors -> the official DINOv2 layout."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "mask_token": state["embeddings.mask_token"].reshape(1, -1),
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    if registers:
        out["register_tokens"] = state["embeddings.register_tokens"]
    dim = config["hidden_size"]
    for i in range(config["num_hidden_layers"]):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = (src + "attention.attention.", ("query", "key", "value"), src + "attention.output.dense")
        if src + "attention.q_proj.weight" in state:
            attn = (src + "attention.", ("q_proj", "k_proj", "v_proj"), src + "attention.o_proj")
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.qkv.{suffix}"] = _qkv(attn[0], attn[1], state, suffix, dim)
            out[f"{dst}attn.proj.{suffix}"] = state[f"{attn[2]}.{suffix}"]
        _copy_block(out, state, src, dst, ("mlp.fc1", "mlp.fc2"))
    return out


def _from_hf_dinov3(state: dict, config: dict) -> dict:
    """transformers DINOv3ViTModel tensors -> the official DINOv3 layout (registers named storage tokens)."""
    out = {"cls_token": state["embeddings.cls_token"], "storage_tokens": state["embeddings.register_tokens"],
           "mask_token": state["embeddings.mask_token"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.bias"],
           "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"]}
    dim = config["hidden_size"]
    for i in range(config["num_hidden_layers"]):
        src, dst = f"layer.{i}.", f"blocks.{i}."
        if src + "norm1.weight" not in state:
            src = f"model.layer.{i}."
        names = ("q_proj", "k_proj", "v_proj")
        out[f"{dst}attn.qkv.weight"] = _qkv(src + "attention.", names, state, "weight", dim)
        if any(f"{src}attention.{n}.bias" in state for n in names):
            out[f"{dst}attn.qkv.bias"] = _qkv(src + "attention.", names, state, "bias", dim)
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.proj.{suffix}"] = state[f"{src}attention.o_proj.{suffix}"]
        _copy_block(out, state, src, dst, ("mlp.up_proj", "mlp.down_proj"))
    return out


def _copy_block(out: dict, state: dict, src: str, dst: str, mlp: tuple[str, str]) -> None:
    """One block's norms, MLP (transformers' ``mlp`` names -> fc1, fc2) and layer scales into the official layout."""
    for suffix in ("weight", "bias"):
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), (mlp[0], "mlp.fc1"), (mlp[1], "mlp.fc2")):
            out[f"{dst}{b}.{suffix}"] = state[f"{src}{a}.{suffix}"]
    out[f"{dst}ls1.gamma"] = state[src + "layer_scale1.lambda1"]
    out[f"{dst}ls2.gamma"] = state[src + "layer_scale2.lambda1"]


# ------------------------------------------------------------------------------------------------
# The architecture from the tensors
# ------------------------------------------------------------------------------------------------


def infer_architecture(state: dict[str, torch.Tensor], source: Path) -> dict:
    """BackboneSpec keywords for a timm or official state dict: family from the tensors' names, width from the
    CLS token, depth from the block count, registers from their tensor, input size from the position embedding.
    The head count is not in any shape, so only the published sizes are named; others need ``--arch``."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise BackboneError(f"{source}: not a DINOv2/DINOv3 checkpoint (no cls_token or patch_embed tensors)")
    family = "dinov2" if "pos_embed" in state else "dinov3"
    patch = state["patch_embed.proj.weight"].shape[-1]
    if patch != PATCH[family]:
        raise BackboneError(f"{source}: patch size {patch} does not match {family} (patch {PATCH[family]})")
    registers = any(k in state for k in ("register_tokens", "reg_token", "storage_tokens"))
    dim = state["cls_token"].shape[-1]
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if (family, dim, depth) not in STANDARD_SIZES:
        raise BackboneError(f"{source}: a {family} of non-published size (width {dim}, {depth} blocks); its head "
                            "count is not in the tensors; save it with anymc3d.backbone.save_backbone, which records it")
    size, _ = STANDARD_SIZES[(family, dim, depth)]
    spec = {"name": short_name(family, size, registers)}
    if family == "dinov2":
        spec["img_size"] = _pos_embed_side(state["pos_embed"].shape[1], source) * patch
    return spec


def _pos_embed_side(tokens: int, source: Path) -> int:
    """Grid side of an absolute position embedding of ``tokens`` entries (with or without a CLS entry)."""
    for prefix in (1, 0):
        side = math.isqrt(tokens - prefix)
        if side * side == tokens - prefix:
            return side
    raise BackboneError(f"{source}: position embedding of {tokens} entries is not a square grid")
