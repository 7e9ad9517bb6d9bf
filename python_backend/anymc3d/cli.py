"""Command-line interface: ``anymc3d demo | predict | info`` (contract: docs/cli-contract.md).

Logs go to stderr; ``--progress json`` prints one JSON event per line on stdout for process runners
such as the Slicer module. Every output file is written under a temporary name and renamed at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from anymc3d import __version__
from anymc3d.errors import AnyMC3DError
from anymc3d.fileio import write_text_atomic

logger = logging.getLogger("anymc3d")

EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE = 0, 1, 2


class _Subparsers:
    """``add_parser`` that gives every subcommand the common options (extensions' commands too)."""

    def __init__(self, actions, common: argparse.ArgumentParser):
        self._actions, self._common = actions, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._actions.add_parser(name, parents=[self._common, *kwargs.pop("parents", [])], **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anymc3d", description="AnyMC3D: 3D classification with a frozen 2D "
                                     "foundation model and task plugins, with 3D heatmaps.")
    parser.add_argument("--version", action="version", version=f"anymc3d {__version__}")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--log-level", default="INFO", choices=levels, help="Logging level on stderr (default: INFO).")
    common = argparse.ArgumentParser(add_help=False)  # so --log-level also works after the subcommand
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels, help="Logging level on stderr (default: INFO).")
    sub = _Subparsers(parser.add_subparsers(dest="command", required=True), common)

    demo = sub.add_parser("demo", help="Write a small demo backbone, plugin and volume (no downloads).")
    demo.add_argument("folder", type=Path, help="Folder to write backbone.safetensors, plugin.anymc3d, volume.nii.gz into.")
    demo.add_argument("--seed", type=int, default=0, help="Random seed of the demo weights and volume (default: 0).")

    info = sub.add_parser("info", help="Print a plugin's metadata.")
    info.add_argument("plugin", type=Path, help="Plugin file (.anymc3d) or folder.")
    info.add_argument("--json", action="store_true", help="Print the plugin.json contents as JSON (default: a summary).")

    pred = sub.add_parser("predict", help="Predict findings and heatmaps for images.")
    pred.add_argument("images", nargs="+", help="Image files, DICOM series folders, or folders of images; "
                      "the views of a multi-view case joined with '+'.")
    pred.add_argument("--backbone", type=Path, required=True, help="Backbone weights file (required).")
    pred.add_argument("--plugin", type=Path, action="append", required=True,
                      help="Plugin file or folder; repeat for several plugins (required).")
    pred.add_argument("--ensemble", action="store_true",
                      help="Treat the plugins as one ensemble: average calibrated logits (default: off).")
    pred.add_argument("--heatmap", type=Path, default=None, help="Folder for heatmap files (default: no heatmaps).")
    pred.add_argument("--heatmap-method", default="attention", choices=["attention", "rollout", "grad_rollout", "grad_last"],
                      help="Heatmap method (default: attention, the last-block CLS attention of the paper).")
    pred.add_argument("--heatmap-format", default="nii.gz", choices=["nii.gz", "nrrd"],
                      help="Heatmap file format (default: nii.gz).")
    pred.add_argument("--embedding", action="store_true",
                      help="Add each plugin's volume embedding v (C floats) to the JSON records (default: off).")
    pred.add_argument("--json", type=Path, default=None, help="Write the JSON records here (default: print them on stdout).")
    pred.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                      help="Compute device (default: auto = CUDA if available, else CPU).")
    pred.add_argument("--chunk-size", type=int, default=32, help="Slices per backbone forward (default: 32).")
    pred.add_argument("--progress", default="bar", choices=["bar", "json", "none"],
                      help="Progress display: a bar on stderr, JSON lines on stdout, or none (default: bar).")
    from anymc3d.train import register as register_training; register_training(sub)  # noqa: E702 (train, eval)
    _add_extension_commands(sub)
    return parser


#: commands that live in other packages (they may import Slicer's scene classes; this package may not)
EXTENSION_HINTS = {"review": "the web review app is not installed: pip install -e WebReview (see README)"}


def _add_extension_commands(sub) -> None:
    """Subcommands registered by other packages under the entry-point group ``anymc3d.commands``.

    Each entry point is ``register(subparsers)``: it adds its parser and sets ``handler=fn(args) -> int``.
    A known command whose package is missing gets a parser that says how to install it.
    """
    from importlib.metadata import entry_points

    found = set()
    for ep in entry_points(group="anymc3d.commands"):
        try:
            ep.load()(sub)
            found.add(ep.name)
        except Exception as exc:  # a broken extension must not break predict
            logger.warning("command %r from %s could not be loaded: %s", ep.name, ep.value, exc)
    for name, hint in EXTENSION_HINTS.items():
        if name not in found:
            missing = sub.add_parser(name, help=f"(not installed) {hint}")
            missing.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            missing.set_defaults(handler=lambda args, hint=hint: _missing(hint))


def _missing(hint: str) -> int:
    logger.error("%s", hint)
    return EXIT_USAGE


def _cmd_demo(args) -> int:
    from anymc3d.demo import write_demo

    paths = write_demo(args.folder, seed=args.seed)
    for kind, path in paths.items():
        logger.info("wrote %s: %s", kind, path)
    return EXIT_OK


def _cmd_info(args) -> int:
    from anymc3d.plugin import read_plugin_metadata

    from anymc3d.plugin import load_plugin

    meta = read_plugin_metadata(args.plugin)
    if args.json:
        print(json.dumps(meta, indent=2))
        return EXIT_OK
    bb = meta["backbone"]
    lines = [f"plugin       {meta['name']}  ({args.plugin})", f"task         {meta['task']}",
             f"labels       {', '.join(meta['labels'])}", f"views        {', '.join(meta['views'])}",
             f"backbone     {bb['name']} (img_size {bb['img_size']}), weights {meta['backbone_fingerprint'][:16]}",
             f"LoRA         rank {meta['lora']['rank']}, alpha {meta['lora']['alpha']}",
             f"thresholds   {meta['thresholds']}", f"calibration  a={meta['calibration_a']} b={meta['calibration_b']}",
             f"format       v{meta['format_version']}, written by anymc3d {meta['anymc3d_version']}"]
    loaded = load_plugin(args.plugin)
    lora = sum(t.numel() for view in loaded.lora for t in view.values())
    head = sum(p.numel() for p in loaded.head.parameters())
    lines.append(f"parameters   {lora + head:,} ({lora:,} LoRA, {head:,} queries and head)")
    if meta.get("description"):
        lines.append(f"description  {meta['description']}")
    print("\n".join(lines))
    return EXIT_OK


def _expand_images(items: Sequence[str]) -> list[list[Path]]:
    """Each case is a list of view paths; a folder that is not a DICOM series means every image in it."""
    from anymc3d.preprocessing import find_images, is_dicom_folder

    cases: list[list[Path]] = []
    for item in items:
        views = [Path(p) for p in item.split("+")]
        if len(views) == 1 and views[0].is_dir() and not is_dicom_folder(views[0]):
            found = find_images(views[0])
            if not found:
                logger.warning("%s: no images found in this folder", views[0])
            cases.extend([p] for p in found)
        else:
            cases.append(views)
    return cases


def _unique_stem(path: Path, used: set) -> str:
    """The image's stem, numbered when another case of this run had the same one."""
    from anymc3d.preprocessing import image_stem

    stem, n = image_stem(path), 1
    while stem in used:
        n += 1
        stem = f"{image_stem(path)}_{n}"
    used.add(stem)
    return stem


class _Reporter:
    """Progress as a tqdm bar, JSON lines on stdout, or nothing."""

    def __init__(self, mode: str, total: int):
        self.mode, self.total = mode, total
        self.case, self.image = 0, ""
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr)
        self.emit(event="start", cases=total)

    def emit(self, **event) -> None:
        if self.mode == "json":
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def stage(self, stage: str, done: int, total: int) -> None:
        self.emit(event="progress", case=self.case, cases=self.total, image=self.image, stage=stage, done=done, total=total)

    def case_done(self, status: str, error: Optional[str]) -> None:
        self.emit(event="case_done", case=self.case, image=self.image, status=status, error=error)
        if self.bar is not None:
            self.bar.update(1)

    def close(self, ok: int, failed: int, json_path: Optional[Path], records: list) -> None:
        if self.bar is not None:
            self.bar.close()
        extra = {} if json_path is not None else {"records": records}
        self.emit(event="done", ok=ok, failed=failed, json=None if json_path is None else str(json_path), **extra)


def _record(result, written: dict, image: str, embedding: bool = False) -> dict:
    geometry = result.predictions[0].geometry
    record = {"image": image, "status": "ok", "error": None, "slicing_axis": geometry.slice_axis,
              "num_slices": geometry.num_input_slices, "results": []}
    for pred in result.predictions:
        labels = pred.labels
        files = written.get(pred.plugin, {})
        record["results"].append({
            "plugin": pred.plugin,
            "plugin_path": pred.plugin_paths[0] if len(pred.plugin_paths) == 1 else pred.plugin_paths,
            "task": pred.task, "labels": labels,
            "probabilities": dict(zip(labels, map(float, pred.probabilities))),
            "probabilities_raw": dict(zip(labels, map(float, pred.probabilities_raw))),
            "thresholds": dict(zip(labels, map(float, pred.thresholds))),
            "decisions": dict(zip(labels, map(bool, pred.decisions))),
            "slicing_axis": pred.geometry.slice_axis,
            "slice_importance": [float(x) for x in pred.importance_per_input_slice()],
            "heatmap_method": pred.heatmap_method if files else None,
            "heatmap": files.get(None),
            "finding_heatmaps": {k: v for k, v in files.items() if k is not None},
            **({"embedding": [float(x) for x in pred.embedding]} if embedding else {}),
        })
    return record


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _write_heatmaps(result, folder: Path, stem: str, fmt: str, progress) -> dict:
    """Write each prediction's heatmap(s); on any failure remove what this case wrote and re-raise."""
    from anymc3d.plugin import safe_name
    from anymc3d.preprocessing import write_image_atomic

    written: dict[str, dict] = {}
    done: list[Path] = []
    total = sum(len(p.finding_heatmaps) or int(p.heatmap is not None) for p in result.predictions)
    try:
        for pred in result.predictions:
            files: dict = {}
            base = f"{stem}__{safe_name(pred.plugin)}"
            for label in pred.finding_heatmaps:
                progress("heatmap", len(done), total)
                path = write_image_atomic(pred.heatmap_image(label), folder / f"{base}__{safe_name(label)}.{fmt}")
                done.append(path)
                files[label] = str(path.resolve())
            if pred.heatmap is not None:
                top = max(pred.finding_heatmaps, key=lambda k: pred.probabilities[pred.labels.index(k)], default=None)
                if top is not None:
                    path = Path(files[top])
                else:
                    progress("heatmap", len(done), total)
                    path = write_image_atomic(pred.heatmap_image(), folder / f"{base}.{fmt}")
                    done.append(path)
                files[None] = str(path.resolve())
            written[pred.plugin] = files
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
    return written


def _cmd_predict(args) -> int:
    from anymc3d.backbone import spec_from_file
    from anymc3d.engine import Engine, ensemble
    from anymc3d.plugin import load_plugin

    plugins = [load_plugin(p.resolve()) for p in args.plugin]
    spec = spec_from_file(args.backbone) or plugins[0].config.backbone
    engine = Engine(args.backbone, spec=spec, device=args.device, chunk_size=args.chunk_size)
    names = [engine.add_plugin(p, name=f"{p.config.name}#{i}" if any(
        q.config.name == p.config.name for q in plugins[:i]) else None) for i, p in enumerate(plugins)]
    if args.heatmap is not None:
        args.heatmap.mkdir(parents=True, exist_ok=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    cases = _expand_images(args.images)
    reporter = _Reporter(args.progress, len(cases))
    records, failed, stems = [], 0, set()
    for index, views in enumerate(cases):
        image = "+".join(str(v.resolve()) for v in views)
        reporter.case, reporter.image = index, image
        try:
            result = engine.predict_file(views, names, heatmap=args.heatmap_method if args.heatmap else None,
                                         progress=reporter.stage)
            if args.ensemble:
                result.predictions = [ensemble(result.predictions)]
            written = {}
            if args.heatmap:
                written = _write_heatmaps(result, args.heatmap, _unique_stem(views[0], stems), args.heatmap_format,
                                          reporter.stage)
            reporter.stage("writing", 0, 1)
            records.append(_record(result, written, image, args.embedding))
            reporter.case_done("ok", None)
        except (AnyMC3DError, OSError, RuntimeError, ValueError) as exc:
            message = _one_line(str(exc) if isinstance(exc, AnyMC3DError) else f"{image}: {type(exc).__name__}: {exc}")
            logger.error("%s", message)
            failed += 1
            records.append({"image": image, "status": "error", "error": message, "slicing_axis": None,
                            "num_slices": None, "results": []})
            reporter.case_done("error", message)
    text = json.dumps(records, indent=2)
    if args.json is not None:
        write_text_atomic(args.json, text)
    elif args.progress != "json":
        print(text)
    reporter.close(len(cases) - failed, failed, args.json, records)
    return EXIT_CASE_FAILED if failed else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    commands = {"demo": _cmd_demo, "info": _cmd_info, "predict": _cmd_predict}
    handler = getattr(args, "handler", None) or commands[args.command]
    try:
        return handler(args)
    except AnyMC3DError as exc:
        logger.error("%s", _one_line(str(exc)))
        return EXIT_USAGE
