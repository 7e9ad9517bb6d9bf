"""``anymc3d features``, ``anymc3d similarity`` and ``anymc3d fit-lifted``: the PlaneCycle subcommands (contract:
docs/planecycle.md).

:func:`register` adds them to the CLI's subparsers; each parser carries its ``handler``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from anymc3d.contract import DEVICES, EXIT_OK, EXIT_USAGE, HEATMAP_FORMATS, PRECISION_HELP, PRECISIONS
from anymc3d.planecycle.config import (
    DEFAULT_CYCLE,
    VARIANTS,
    PlaneCycleConfig,
    check_layers,
    parse_cycle,
)

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _seed(text: str) -> tuple[int, int, int]:
    values = _int_list(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected i,j,k (three integers), got {text!r}")
    return tuple(values)


def _cycle(text: str) -> tuple[str, ...]:
    try:
        return parse_cycle(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(parser: argparse.ArgumentParser, mode_required: bool) -> None:
    parser.add_argument("--backbone", type=Path, required=True,
                        help="Backbone weights: our backbone file, an official checkpoint, or a plain timm state dict "
                        "in safetensors (required).")
    parser.add_argument("--arch", default=None,
                        help="timm model name (e.g. vit_small_patch14_reg4_dinov2) or short backbone name for weights "
                        "that do not record their architecture (default: read it from the file).")
    mode = {"required": True} if mode_required else {"default": "planecycle"}
    parser.add_argument("--mode", choices=["planecycle", "slicewise"], **mode,
                        help="planecycle: the 2D backbone lifted to 3D; slicewise: the 2D backbone on every slice"
                        + (" (required)." if mode_required else " (default: planecycle)."))
    parser.add_argument("--variant", choices=VARIANTS, default="pcg",
                        help="Global tokens between planes: pcg = adaptive average pooling, pcm = mean "
                        "(default: pcg; planecycle mode only).")
    parser.add_argument("--cycle", type=_cycle, default=DEFAULT_CYCLE,
                        help="Plane schedule, block i on cycle[i mod len] (default: HW,DW,DH,HW).")
    parser.add_argument("--input-size", type=int, default=224,
                        help="In-plane size image slices are resized to before the backbone (default: 224; "
                        "ignored for .npy input).")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="Compute device (default: cpu).")
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0], help=PRECISION_HELP)


def register(subparsers) -> None:
    """Add ``features`` and ``similarity`` to the CLI's subparsers."""
    feats = subparsers.add_parser("features", help="Write lifted (PlaneCycle) or slice-wise token features of a volume.")
    feats.add_argument("input", type=Path, help="Image file (preprocessed as for prediction) or a .npy float32 "
                       "(D, 3, H, W) array of normalised slices, used as is.")
    _add_common(feats, mode_required=True)
    feats.add_argument("--layers", type=_int_list, default=[],
                       help="0-based block indices whose outputs to write too, e.g. 2,5,11 (default: none).")
    feats.add_argument("--out", type=Path, required=True,
                       help="Output folder for patch_tokens.npy, global_tokens.npy, layer{i}_*.npy (required).")
    feats.set_defaults(handler=run_features)

    sim = subparsers.add_parser("similarity", help="Cosine similarity of every voxel's feature to a seed voxel's.")
    sim.add_argument("input", type=Path, help="Image file (NIfTI, NRRD, MHA, DICOM folder).")
    sim.add_argument("--seed", type=_seed, required=True, action="append",
                     help="Seed voxel i,j,k in the image's IJK order, as SimpleITK and Slicer number voxels; repeat "
                     "for several maps from one feature computation (required).")
    _add_common(sim, mode_required=False)
    sim.add_argument("--out", type=Path, required=True,
                     help="Output image (.nii.gz, .nrrd, .mha) in the input's geometry; with several seeds (or an "
                     "existing folder) a folder receiving similarity_I_J_K.FORMAT per seed (required).")
    sim.add_argument("--format", choices=HEATMAP_FORMATS, default="nii.gz",
                     help="File format of the maps when --out is a folder (default: nii.gz).")
    sim.add_argument("--features-cache", type=Path, default=None,
                     help="Folder keeping this image's token features: computed once, then loaded while the image, "
                     "backbone file and settings are unchanged (default: no cache).")
    sim.set_defaults(handler=run_similarity)

    fit = subparsers.add_parser("fit-lifted", help="Fit a lifted-feature plugin (kind planecycle_linear): a linear "
                                "head on the mean PlaneCycle-lifted patch token, no backbone training.")
    fit.add_argument("manifest", type=Path, help="Manifest CSV (docs/cli-contract.md) with an 'image' column (paths "
                     "relative to the CSV), one 0/1 column per finding and an optional 'split' column (train/val/test; "
                     "without it every row trains).")
    fit.add_argument("--backbone", type=Path, required=True, help="Backbone weights file (required).")
    fit.add_argument("--out", type=Path, required=True, help="Plugin to write: a .anymc3d file or a folder (required).")
    fit.add_argument("--labels", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=None,
                     help="Comma-separated label columns (default: every column but image, split, mask, id, case).")
    fit.add_argument("--variant", choices=VARIANTS, default="pcg",
                     help="Global tokens between planes: pcg = adaptive average pooling, pcm = mean (default: pcg).")
    fit.add_argument("--cycle", type=_cycle, default=DEFAULT_CYCLE,
                     help="Plane schedule, block i on cycle[i mod len] (default: HW,DW,DH,HW).")
    fit.add_argument("--input-size", type=int, default=None,
                     help="In-plane slice size (default: the backbone's img_size).")
    fit.add_argument("--c", type=float, default=1.0,
                     help="Inverse L2 strength of the logistic regression (scikit-learn's C; default: 1.0).")
    fit.add_argument("--name", default=None, help="Plugin name (default: the output file's stem).")
    fit.add_argument("--device", choices=DEVICES, default="cpu",
                     help="Compute device for the lifted features, fp32 (default: cpu).")
    fit.set_defaults(handler=run_fit_lifted)


def _settings(args) -> tuple:
    from anymc3d.preprocess_config import PreprocessConfig

    return PlaneCycleConfig(variant=args.variant, cycle=args.cycle), PreprocessConfig(input_size=args.input_size)


def run_features(args) -> int:
    from anymc3d.planecycle.features import (
        compute_features,
        load_model,
        read_volume,
        write_features,
    )
    from anymc3d.device import FEATURES, precision_name, resolve_device, resolve_precision

    try:
        config, preprocess = _settings(args)
        device = resolve_device(args.device)
        dtype = resolve_precision(args.precision, device, FEATURES)  # not agreement-tested: auto keeps fp32
        model, digest = load_model(args.backbone, args.arch)
        layers = check_layers(args.layers, len(model.blocks))
        volume, _ = read_volume(args.input, preprocess)
        feats = compute_features(model, volume, args.mode, config, layers, device, dtype)
    except ValueError as exc:
        logger.error("%s", " ".join(str(exc).split()))
        return EXIT_USAGE
    meta = {"input": str(Path(args.input).resolve()), "mode": args.mode, "backbone": str(Path(args.backbone).resolve()),
            "backbone_fingerprint": digest, "arch": type(model).__name__, "layers": list(layers),
            "precision": precision_name(dtype),
            "planecycle": config.to_dict() if args.mode == "planecycle" else None,
            "volume_embedding": "mean over slices of the per-slice CLS token (global_tokens[:, 0])"}
    written = write_features(feats, args.out, meta)
    logger.info("wrote %d files to %s", len(written), args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), "files": [p.name for p in written]}))
    return EXIT_OK


def similarity_outputs(out: Path, seeds: list[tuple[int, int, int]], fmt: str) -> list[Path]:
    """One output path per seed: ``out`` itself for one seed, else ``out/similarity_I_J_K.FORMAT``."""
    if len(seeds) == 1 and not Path(out).is_dir():
        return [Path(out)]
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out: {out} is a file; several seeds need a folder")
    return [Path(out) / f"similarity_{i}_{j}_{k}.{fmt}" for i, j, k in seeds]


def run_similarity(args) -> int:
    """Seed-point similarity maps; with ``--features-cache`` the token volume is computed once per image."""
    from anymc3d.errors import InputError
    from anymc3d.planecycle.cache import cache_key, cached_patch_tokens
    from anymc3d.planecycle.features import (
        compute_features,
        cosine_map,
        load_model,
        read_volume,
        seed_to_slice,
        seed_token,
    )
    from anymc3d.device import FEATURES, precision_name, resolve_device, resolve_precision
    from anymc3d.image_writing import write_image_atomic

    seeds = list(dict.fromkeys(tuple(seed) for seed in args.seed))  # repeated seeds: one map
    try:
        config, preprocess = _settings(args)
        device = resolve_device(args.device)
        dtype = resolve_precision(args.precision, device, FEATURES)  # not agreement-tested: auto keeps fp32
        paths = similarity_outputs(args.out, seeds, args.format)
        volume, geometry = read_volume(args.input, preprocess)
        if geometry is None:
            raise InputError(args.input, "similarity needs an image file (its geometry), not a .npy array")
        for seed in seeds:  # every seed checked before any work
            try:
                seed_to_slice(geometry, seed)
            except ValueError as exc:
                raise InputError(args.input, str(exc)) from None

        def compute():
            model, _ = load_model(args.backbone, args.arch)
            return compute_features(model, volume, args.mode, config, device=device, dtype=dtype)

        if args.features_cache is None:
            tokens, hit = compute().patch_tokens[0], None
        else:
            key = cache_key(args.input, args.backbone, args.arch, args.mode, config, preprocess, precision_name(dtype))
            meta = {"input": str(Path(args.input).resolve()), "mode": args.mode,
                    "backbone": str(Path(args.backbone).resolve())}
            cached = cached_patch_tokens(args.features_cache, key, compute, meta)
            tokens, hit = cached.patch_tokens, cached.hit
        tokens_of_seeds = [seed_token(geometry, seed, tokens.shape[:3]) for seed in seeds]
        maps = [geometry.to_input(cosine_map(tokens, token)) for token in tokens_of_seeds]
    except ValueError as exc:
        logger.error("%s", " ".join(str(exc).split()))
        return EXIT_USAGE
    written: list[Path] = []
    try:
        for image, path in zip(maps, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            written.append(write_image_atomic(image, path))
    except BaseException:
        for path in written:  # all maps or none
            path.unlink(missing_ok=True)
        raise
    logger.info("wrote %d similarity map(s) (seed tokens %s)", len(written), tokens_of_seeds)
    print(json.dumps({"out": [str(p.resolve()) for p in written], "seeds": [list(s) for s in seeds],
                      "tokens": [list(t) for t in tokens_of_seeds],
                      "features_cache": None if hit is None else ("hit" if hit else "miss")}))
    return EXIT_OK


def run_fit_lifted(args) -> int:
    from anymc3d.errors import AnyMC3DError
    from anymc3d.planecycle.fit import fit_lifted

    try:
        result = fit_lifted(args.manifest, args.backbone, args.out, labels=args.labels, variant=args.variant,
                            cycle=args.cycle, input_size=args.input_size, device=args.device, c=args.c,
                            name=args.name)
    except (ValueError, AnyMC3DError) as exc:
        logger.error("%s", " ".join(str(exc).split()))
        return EXIT_USAGE
    logger.info("wrote %s", result.path)
    print(json.dumps({"out": str(Path(result.path).resolve()), "counts": result.counts, "auroc": result.auroc}))
    return EXIT_OK
