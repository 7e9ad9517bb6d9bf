"""Scoring an archive on Ray Data: ``anymc3d predict ... --ray [ADDRESS]`` (docs/scale.md).

The same prediction as the local run, spread over a Ray cluster without a scheduler of our own:

    cases (anymc3d.cases, on the driver)
      -> read stage: Ray tasks read and check each case's images (CPU)           ``_read_batch``
      -> model stage: an actor pool, each actor one resident backbone with every  ``ModelWorker``
         plugin attached; it predicts, writes heatmaps and commits the case's record file (anymc3d.runner)
      -> driver: progress (done / failed / cases per second), then the final JSON (or JSON Lines) assembled
         from the committed record files, in input order

Ray facts relied on (ray 2.60.0, ``python/ray/data/dataset.py`` ``Dataset.map_batches``; and
``python/ray/data/_internal/execution/operators/actor_pool_map_operator.py``
``ActorPoolMapOperator._apply_default_remote_args``; ``python/ray/data/_internal/logical/rules/operator_fusion.py``):
a callable class given to ``map_batches`` runs in a pool of
actors (``ActorPoolStrategy(size=n)``), constructed once each and then called with many batches; a plain
function runs as stateless tasks; actors of the pool get ``max_restarts=-1`` and ``max_task_retries=-1`` unless
told otherwise, so an actor process that dies is restarted and its batch retried; a task stage is fused into
the following actor stage unless their compute strategies or resources differ. A case's record is committed
with an atomic rename (``fileio``), so a retried case rewrites its record whole and never twice in the output.

Ray is imported only here, and only when ``--ray`` is given.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from anymc3d.cases import InputCase, expand_inputs, read_case
from anymc3d.contract import EXIT_CASE_FAILED, EXIT_OK, PARTIAL_MARKER, STATUS_ERROR, RecordError
from anymc3d.errors import AnyMC3DError
from anymc3d.fileio import write_text_atomic
from anymc3d.records import error_message, error_record, read_records, write_record, write_records

logger = logging.getLogger(__name__)

INSTALL_HINT = "--ray needs Ray Data: pip install 'anymc3d[ray]' (or pip install 'ray[data]>=2.60')"
RUN_FILE = "run.json"          # the options of the run, so --resume refuses a different run
WORKERS_DIR = ".workers"       # one file per model-worker process (host, pid): operations and the kill test
#: the options that change a record: a resumed run must have the same
_RUN_OPTIONS = ("backbone", "plugin", "ensemble", "heatmap", "heatmap_method", "heatmap_format", "embedding", "dicom")


def import_ray():
    """Ray and Ray Data, or a usage error saying how to install them."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise AnyMC3DError(INSTALL_HINT) from None
    return ray


# ------------------------------------------------------------------------------------------ run folder
def record_file(run_dir: Path, case: InputCase) -> Path:
    """The committed record of a case: named by a hash of its key, so inputs may be reordered between runs."""
    return run_dir / f"{hashlib.sha256(case.key.encode()).hexdigest()[:24]}.json"


def committed(run_dir: Path, case: InputCase) -> bool:
    """True when the case's record is committed and complete: valid, for this image, heatmap files present."""
    path = record_file(run_dir, case)
    if not path.is_file():
        return False
    try:
        (record,) = read_records(path)
    except (RecordError, ValueError, OSError):
        return False
    if record["image"] != case.image or record.get("series") != case.series:
        return False
    files = [r["heatmap"] for r in record["results"] if r["heatmap"]]
    files += [f for r in record["results"] for f in r["finding_heatmaps"].values()] + record.get("dicom", [])
    return all(Path(f).is_file() for f in files)


def _run_options(args) -> dict:
    def value(v):
        if isinstance(v, list):
            return [str(x.resolve()) for x in v]
        return str(v.resolve()) if isinstance(v, Path) else v

    return {k: value(getattr(args, k)) for k in _RUN_OPTIONS}


def _open_run_dir(args, cases: list[InputCase]) -> Path:
    """Create the run folder, or check it matches this run; refuse to mix runs unless ``--resume``."""
    run_dir = args.run_dir or (Path(f"{args.json}.parts") if args.json is not None else None)
    if run_dir is None:
        raise AnyMC3DError("--ray needs --json OUT or --run-dir DIR: the per-case records are committed there")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnyMC3DError(f"{run_dir}: cannot be used as the run folder ({exc.strerror or exc})") from None
    options = _run_options(args)
    run_file = run_dir / RUN_FILE
    if run_file.exists():
        if not args.resume:
            raise AnyMC3DError(f"{run_dir}: holds an earlier run; pass --resume to continue it, or remove the folder")
        earlier = json.loads(run_file.read_text())
        if earlier != options:
            changed = sorted(k for k in options if earlier.get(k) != options[k])
            raise AnyMC3DError(f"{run_dir}: --resume with other options than the earlier run ({', '.join(changed)})")
    else:
        write_text_atomic(run_file, json.dumps(options, indent=2))
    for stale in run_dir.glob(f".*{PARTIAL_MARKER}*"):  # a worker killed mid-write leaves its temporary file
        stale.unlink(missing_ok=True)
    return run_dir


# ------------------------------------------------------------------------------------------ stages
def _case_rows(cases: list[InputCase]) -> list[dict]:
    return [{"key": c.key, "image": c.image, "views": "\n".join(str(v) for v in c.views), "series": c.series or "",
             "stem": c.stem, "error": c.error or ""} for c in cases]


def _row_case(row: dict) -> InputCase:
    return InputCase(image=str(row["image"]), views=[Path(v) for v in str(row["views"]).split("\n")],
                stem=str(row["stem"]), series=str(row["series"]) or None, error=str(row["error"]) or None)


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [{k: batch[k][i] for k in keys} for i in range(len(batch[keys[0]]))]


def _read_batch(batch: dict) -> dict:
    """CPU stage: read and check each case's images; a case that cannot be read carries its error message on."""
    payload, errors = [], []
    for row in _rows(batch):
        case = _row_case(row)
        try:
            payload.append(pickle.dumps(read_case(case)))  # SimpleITK images pickle with their geometry
            errors.append("")
        except Exception as error:  # noqa: BLE001 (a bad volume is an error record, never a failed run)
            payload.append(b"")
            errors.append(error_message(case.image, error))
    return {**batch, "images": np.array(payload, dtype=object), "read_error": np.array(errors, dtype=object)}


class ModelWorker:
    """Model stage: one resident backbone with every plugin, serving many cases; commits each case's record.

    Constructed once per actor by Ray Data (``map_batches`` with a callable class).
    """

    def __init__(self, options: dict):
        from anymc3d.backbone import spec_from_file
        from anymc3d.engine import Engine
        from anymc3d.plugin import ensemble_members, load_plugin
        from anymc3d.runner import attach_plugins

        self.options = options
        first = load_plugin(ensemble_members(options["plugin"][0])[0])
        spec = spec_from_file(options["backbone"]) or first.config.backbone
        self.engine = Engine(options["backbone"], spec=spec, device=options["device"], chunk_size=options["chunk_size"],
                             precision=options.get("precision", "auto"), merge_lora=options.get("merge_lora", True),
                             heatmap=options["heatmap_method"] if options.get("heatmap") else None)
        self.units = attach_plugins(self.engine, options["plugin"])  # a --folds folder: its members, averaged
        self.names = [m for u in self.units for m in u.members]
        self.run_dir = Path(options["run_dir"])
        workers = self.run_dir / WORKERS_DIR
        workers.mkdir(exist_ok=True)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        write_text_atomic(workers / f"{info['host']}-{info['pid']}.json", json.dumps(info))

    def __call__(self, batch: dict) -> dict:
        from anymc3d.runner import predict_case

        out = {"key": [], "status": [], "error": []}
        for row in _rows(batch):
            case = _row_case(row)
            if row["read_error"]:
                record = error_record(case.image, str(row["read_error"]), case.series)
            else:
                o = self.options
                record = predict_case(self.engine, case, self.names, images=pickle.loads(row["images"]),
                                      heatmap_method=o["heatmap_method"], heatmap_dir=o["heatmap"],
                                      heatmap_format=o["heatmap_format"], ensemble_plugins=o["ensemble"],
                                      embedding=o["embedding"], units=self.units, dicom_dir=o["dicom"])
            write_record(record_file(self.run_dir, case), record)  # the commit
            out["key"].append(case.key)
            out["status"].append(record["status"])
            out["error"].append(record["error"] or "")
        return {k: np.array(v, dtype=object) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ driver
class _Progress:
    """Cases done / failed / per second: a tqdm bar on stderr, JSON lines on stdout, or a closing log line."""

    def __init__(self, mode: str, total: int, skipped: int):
        self.mode, self.total, self.done, self.failed = mode, total, 0, 0
        self.start = time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr)
        self._emit(event="start", cases=total, skipped=skipped)

    def _emit(self, **event) -> None:
        if self.mode == "json":
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def case_done(self, key: str, status: str, error: str) -> None:
        self.done += 1
        self.failed += status == STATUS_ERROR
        if status == STATUS_ERROR:
            logger.error("%s", error)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self._emit(event="case_done", case=self.done - 1, image=key, status=status, error=error or None,
                   done=self.done, failed=self.failed, cases_per_s=round(self.rate, 4))

    def close(self, ok: int, failed: int, json_path: Optional[Path]) -> None:
        if self.bar is not None:
            self.bar.close()
        logger.info("ray run: %d case(s) processed (%d failed) at %.3f cases/s; %d ok, %d failed in all",
                    self.done, self.failed, self.rate, ok, failed)
        self._emit(event="done", ok=ok, failed=failed, json=None if json_path is None else str(json_path))


def _init_ray(ray, address: str) -> bool:
    """Join or start Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs = {"address": None if address == "local" else address, "log_to_driver": False}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise AnyMC3DError(f"--ray {address}: cannot connect to Ray ({str(exc).splitlines()[0]})") from None
    return True


def default_workers(resources: dict, gpus_per_worker: float, cpus_per_worker: float) -> int:
    """What the cluster holds: GPUs / GPUs per worker, else the CPUs left after one for the read stage."""
    if gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    cpus = resources.get("CPU", 1)
    return max(1, int((cpus - 1) // max(cpus_per_worker, 1e-9)))


def run_ray(args) -> int:
    """``anymc3d predict --ray``: the distributed run; returns the CLI exit code."""
    ray = import_ray()
    _check_models(args)
    cases = expand_inputs(args.images)
    run_dir = _open_run_dir(args, cases)
    todo = [c for c in cases if not (args.resume and committed(run_dir, c))]
    if args.resume:
        logger.info("resume: %d of %d case(s) already committed; %d to run", len(cases) - len(todo), len(cases), len(todo))
    started = _init_ray(ray, args.ray) if todo else False
    try:
        progress = _Progress(args.progress, len(todo), len(cases) - len(todo))
        if todo:
            try:
                _execute(ray, args, todo, run_dir, progress)
            except AnyMC3DError:
                raise
            except Exception as exc:  # noqa: BLE001 (a Ray failure: what was committed stays, --resume continues it)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise AnyMC3DError(f"the Ray run stopped after {progress.done} case(s) ({type(exc).__name__}: "
                                   f"{first}); committed records are kept in {run_dir}: rerun with --resume") from None
        records = _assemble(run_dir, cases)
        _remove_stale_heatmaps(args.heatmap, cases)
        failed = sum(r["status"] == STATUS_ERROR for r in records)
        if args.json is not None:
            write_records(args.json, records)
        elif args.progress != "json":
            print(json.dumps(records, indent=2))
        progress.close(len(records) - failed, failed, args.json)
    finally:
        if started:
            ray.shutdown()
    return EXIT_CASE_FAILED if failed else EXIT_OK


def _check_models(args) -> None:
    """Backbone and plugins loaded and matched once on the driver (on CPU) before any worker starts: a bad plugin
    or a backbone it was not made for is the same usage error (exit 2) as in the local run, not a worker that
    dies in its constructor again and again."""
    from anymc3d.backbone import spec_from_file
    from anymc3d.engine import Engine
    from anymc3d.plugin import ensemble_members, load_plugin
    from anymc3d.runner import attach_plugins

    first = load_plugin(ensemble_members(args.plugin[0].resolve())[0])
    engine = Engine(args.backbone, spec=spec_from_file(args.backbone) or first.config.backbone, device="cpu")
    attach_plugins(engine, [p.resolve() for p in args.plugin])


def _execute(ray, args, todo: list[InputCase], run_dir: Path, progress: _Progress) -> None:
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    DataContext.get_current().enable_progress_bars = False  # our own progress: done / failed / per second
    cpus = float(getattr(args, "cpus_per_worker", 1.0))
    gpus = float(args.num_gpus_per_worker)
    workers = args.workers or default_workers(ray.cluster_resources(), gpus, cpus)
    workers = min(workers, len(todo))
    options = {"backbone": str(args.backbone.resolve()), "plugin": [str(p.resolve()) for p in args.plugin],
               "device": args.device, "chunk_size": args.chunk_size, "run_dir": str(run_dir.resolve()),
               "precision": getattr(args, "precision", "auto"), "merge_lora": getattr(args, "merge_lora", True),
               "heatmap_method": args.heatmap_method, "heatmap_format": args.heatmap_format,
               "heatmap": None if args.heatmap is None else str(args.heatmap.resolve()),
               "ensemble": args.ensemble, "embedding": args.embedding,
               "dicom": None if args.dicom is None else str(args.dicom.resolve())}
    logger.info("ray run: %d case(s) on %d model worker(s) (%g CPU, %g GPU each)", len(todo), workers, cpus, gpus)
    # The read stage is a task pool of a size other than the actor pool's: Ray Data fuses a task stage into
    # the next actor stage when their sizes and resources agree (operator_fusion.py, _fuse_compute_strategy),
    # which would put reading back on the model workers.
    readers = TaskPoolStrategy(size=workers + 1)
    dataset = (ray.data.from_items(_case_rows(todo), override_num_blocks=len(todo))
               .map_batches(_read_batch, batch_size=1, compute=readers, num_cpus=1)
               .map_batches(ModelWorker, fn_constructor_kwargs={"options": options}, batch_size=args.batch_size,
                            compute=ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus))
    for row in dataset.iter_rows():
        progress.case_done(str(row["key"]), str(row["status"]), str(row["error"]))


def _assemble(run_dir: Path, cases: list[InputCase]) -> list[dict]:
    """The final records, one per case in input order, read from the committed files."""
    records = []
    for case in cases:
        path = record_file(run_dir, case)
        try:
            (record,) = read_records(path)
        except (OSError, RecordError, ValueError) as exc:
            record = error_record(case.image, f"{case.image}: no committed record ({exc})", case.series)
        records.append(record)
    return records


def _remove_stale_heatmaps(folder: Optional[Path], cases: list[InputCase]) -> None:
    """Temporary heatmap files of this run's cases left by a worker killed mid-write (its retry wrote them whole)."""
    if folder is None:
        return
    for case in cases:
        for stale in folder.glob(f".{case.stem}__*{PARTIAL_MARKER}*"):
            stale.unlink(missing_ok=True)
