"""Runs from the page: the server's run folders, the guarded backend command, and putting a run's outputs in place.

The Logic's prediction job writes into its own temporary folder (inside this server's run root); when the backend
has succeeded, :func:`save_job_outputs` copies the record and its heatmaps into ``FOLDER/results/``:

- the results folder must resolve inside FOLDER (a ``results/`` that is a link out of it is refused);
- every output is first written to a new file made exclusively (``mkstemp``: ``O_CREAT | O_EXCL | O_NOFOLLOW``, a
  random hidden name), so a link planted at a guessable name is never followed;
- each file is then given its name with a hard link, which fails on any existing name: results are never
  overwritten, and a file that appeared meanwhile is kept;
- all or nothing: when one output cannot be put in place (or the Logic's import fails afterwards,
  :func:`start_prediction_into`), the files this run already put in place are removed again.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile

from anymc3d.safeio import create_exclusive, inside, link_new, read_json

RUN_ROOT_PREFIX = "AnyMC3D-review-"
OWNER_FILE = "server.pid"
COPY_CHUNK = 1 << 20


def make_run_root(parent=None) -> str:
    """A folder of this server's run folders (the Logic's ``AnyMC3D-*`` temporary folders go inside it), marked
    with the server's pid and removed when the process exits (even when it fails to start). Folders of servers
    that no longer run (killed: no clean-up) are removed first."""
    sweep_stale_run_roots(parent)
    root = tempfile.mkdtemp(prefix=f"{RUN_ROOT_PREFIX}{os.getpid()}-", dir=parent)
    with open(os.path.join(root, OWNER_FILE), "w", encoding="utf-8") as file:
        file.write(str(os.getpid()))
    atexit.register(shutil.rmtree, root, True)
    return root


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_run_roots(parent=None) -> list[str]:
    """Remove the run-root folders whose server process is gone; returns what was removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(RUN_ROOT_PREFIX) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            with open(os.path.join(path, OWNER_FILE), encoding="utf-8") as file:
                pid = int(file.read().strip())
            if os.stat(path).st_uid != os.getuid():
                continue
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def guarded_backend_command() -> list[str]:
    """``python -m anymc3d`` through :mod:`anymc3d_review.backend_child`: the backend dies with this server."""
    return [sys.executable, "-m", "anymc3d_review.backend_child", str(os.getpid()), "--",
            sys.executable, "-m", "anymc3d"]


def checked_results_folder(root, folder) -> str:
    """``folder`` (a results folder of FOLDER ``root``) made if needed, as its resolved path; ValueError when it,
    or anything on the way to it, resolves outside ``root``."""
    root = os.path.realpath(root)
    relative = os.path.relpath(os.path.abspath(folder), root)
    if relative.startswith(os.pardir):
        raise ValueError(f"{folder} is not inside {root}")
    path = root
    for part in [p for p in relative.split(os.sep) if p not in ("", os.curdir)]:
        path = os.path.join(path, part)
        if os.path.lexists(path) and not inside(path, root):
            raise ValueError(f"{path} leads outside {root}: results are written inside the review folder only")
        if not os.path.lexists(path):
            os.mkdir(path)
        path = os.path.realpath(path)
    if not inside(path, root) or not os.path.isdir(path):
        raise ValueError(f"{folder} is not a folder inside {root}")
    return path


def start_prediction_into(logic, image_path, backbone, plugins, root, json_path, heatmap_dir, options,
                          display_options, on_progress, on_finished):
    """``AnyMC3DSlicerLogic.startPrediction`` on one image file, with its outputs also kept in the results folder.

    The Logic's PredictionJob does everything (command line, SubprocessRunner, progress, errors, readRecord,
    importResults, removal of its temporary folder). When the backend has finished successfully and before the
    Logic imports (its "importing" progress report), the record and heatmaps are put in place
    (:func:`save_job_outputs`); a copy that fails makes the run fail (the Logic reports a failed import), and a
    failed import removes the files this run put in place.
    """
    holder = {"saved": []}

    def progress(report):
        if report.stage == "importing" and "job" in holder:
            holder["saved"] = save_job_outputs(holder["job"], root, json_path, heatmap_dir)
        if on_progress:
            on_progress(report)

    def finished(result):
        if result.status != "ok":
            remove_saved(holder["saved"])
            holder["saved"] = []
        if on_finished:
            on_finished(result)

    job = logic.startPrediction([image_path], backbone, plugins, options, display_options, progress, finished,
                                name=os.path.basename(image_path))
    holder["job"] = job
    return job


def save_job_outputs(job, root, json_path, heatmap_dir) -> list[tuple[str, tuple]]:
    """Put a finished job's record and heatmaps in place (module docstring), the record's heatmap paths pointing
    at the copies; each heatmap file once, however many findings name it. Returns ``[(path, (device, inode))]``
    of the files put in place (for :func:`remove_saved`). Raises ValueError; then nothing is left behind."""
    records = read_json(job.jsonPath)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{job.jsonPath}: not a list of records")
    heatmap_dir = checked_results_folder(root, heatmap_dir)
    json_dir = checked_results_folder(root, os.path.dirname(os.path.abspath(json_path)))
    json_target = os.path.join(json_dir, os.path.basename(json_path))
    job_dir = os.path.realpath(job.heatmapDir)
    copies = {}  # source -> target

    def keep(path):
        if not path:
            return path
        source = os.path.realpath(path)
        if os.path.dirname(source) != job_dir:
            raise ValueError(f"unexpected heatmap path {path}")
        copies.setdefault(source, os.path.join(heatmap_dir, os.path.basename(source)))
        return copies[source]

    for record in records:
        for result in record.get("results") or []:
            result["heatmap"] = keep(result.get("heatmap"))
            findings = result.get("finding_heatmaps") or {}
            result["finding_heatmaps"] = {label: keep(path) for label, path in findings.items()}
    outputs = [(target, _file_writer(source)) for source, target in copies.items()]
    outputs.append((json_target, lambda file: file.write(json.dumps(records, indent=2).encode("utf-8"))))
    return _put_in_place(outputs)


def _file_writer(source):
    def write(file):
        with open(source, "rb") as reader:
            shutil.copyfileobj(reader, file, COPY_CHUNK)
    return write


def _put_in_place(outputs) -> list[tuple[str, tuple]]:
    """Write each ``(target, writer)`` to an exclusive temporary file beside its target, then link them all in
    place (heatmaps first, the record last); on any failure remove what was written and linked, and raise."""
    for target, _ in outputs:
        if os.path.lexists(target):
            raise ValueError(f"{target} exists: results are never overwritten")
    partials, saved = [], []
    try:
        for target, writer in outputs:
            file, partial = create_exclusive(os.path.dirname(target), os.path.basename(target))
            partials.append((partial, target))
            with file:
                writer(file)
                file.flush()
                os.fsync(file.fileno())
        while partials:
            partial, target = partials[0]
            identity = _identity(partial)
            link_new(partial, target)  # removes the partial's name, linked or not
            partials.pop(0)
            saved.append((target, identity))
    except BaseException:
        for partial, _ in partials:
            _unlink_quietly(partial)
        remove_saved(saved)
        raise
    return saved


def _identity(path) -> tuple:
    stat = os.lstat(path)
    return stat.st_dev, stat.st_ino


def remove_saved(saved) -> None:
    """Remove the files a run put in place, each only if its name still leads to the very file written (a file
    put there by someone else since is kept)."""
    for target, identity in saved:
        try:
            if _identity(target) == identity:
                os.unlink(target)
        except OSError:
            pass


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["RUN_ROOT_PREFIX", "checked_results_folder", "guarded_backend_command", "make_run_root", "remove_saved",
           "save_job_outputs", "start_prediction_into", "sweep_stale_run_roots"]
