"""Get backbone…: ``anymc3d backbone get NAME --progress json`` in the background, through the Logic's runner.

The list comes from the backend's catalog (``anymc3d.catalog``: standard library only, no process), so the dialog
opens at once. The download runs as any backend run does (``Logic.startBackend``: event-driven, never blocking the
GUI); its JSON progress lines feed ``onProgress`` and Cancel kills the process tree (an interrupted download
resumes on the next Get). The result's ``weightsFile`` is what the module's backbone file selector takes: the
weights file, or the ``config.json`` of a transformers checkpoint folder (the backend reads the folder from it).
"""

import dataclasses
import os

from .process import ExitCode, lastErrorLine, parseEventLine


def listBackbones(cacheDir=None):
    """One dict per catalog name: name, arch, params, size_mb, licence, source, gated, cached, path, description."""
    from anymc3d.catalog import cache_dir, catalog, is_cached, target

    rows = []
    for name, entry in catalog().items():
        rows.append({"name": name, "arch": entry["arch"], "params": entry["params"], "size_mb": entry["size_mb"],
                     "licence": entry["licence"], "gated": bool(entry["source"].get("gated")),
                     "cached": is_cached(name, cacheDir), "path": str(target(name, cacheDir)),
                     "description": entry["description"], "cacheDir": str(cache_dir(cacheDir))})
    return rows


def describe(row):
    """One line for a chooser: ``dinov2_vits14_reg (21M, 88 MB, Apache-2.0, cached)``."""
    extra = ", cached" if row["cached"] else (", gated: accept its licence on the hub first" if row["gated"] else "")
    return f"{row['name']} ({row['params']}, {row['size_mb']} MB, {row['licence']}{extra})"


@dataclasses.dataclass
class DownloadProgress:
    """One progress report of a download (the fields the module's progress bar reads)."""

    fraction: float
    message: str
    case: int = 0
    cases: int = 1


@dataclasses.dataclass
class BackboneResult:
    """Outcome of one Get: ``status`` is "ok", "failed" or "cancelled"; ``path`` as the backend printed it."""

    name: str
    status: str
    message: str = ""
    path: str = ""
    exitCode: int = 0
    outputs: object = None  # nothing is added to the scene

    @property
    def weightsFile(self):
        if self.path and os.path.isdir(self.path):
            return os.path.join(self.path, "config.json")
        return self.path


class BackboneDownload:
    """One ``anymc3d backbone get`` process."""

    def __init__(self, logic, name, onProgress=None, onFinished=None, cacheDir=None):
        self.logic, self.name, self.cacheDir = logic, name, cacheDir
        self.onProgress, self.onFinished = onProgress, onFinished
        self.stderrLog = []
        self.path = ""
        self.result = None
        self.started = False

    @property
    def done(self):
        return self.result is not None

    def buildCommand(self):
        command = self.logic.backendCommand + ["backbone", "get", self.name, "--progress", "json"]
        return command + (["--cache-dir", str(self.cacheDir)] if self.cacheDir else [])

    def start(self):
        self.started = True
        try:
            self.logic.startBackend(self.buildCommand(), self._onStdoutLine, self._onStderrLine, self._onFinished)
        except Exception as error:  # noqa: BLE001 - a start failure is a failed Get, shown in one line
            self._finish(BackboneResult(self.name, "failed", f"Cannot start the backend: {error}",
                                        exitCode=int(ExitCode.FATAL)))
        return self

    def cancel(self):
        if self.done:
            return
        if self.started:
            self.logic.runner.cancel()
        else:
            self._finish(BackboneResult(self.name, "cancelled", "Cancelled", exitCode=int(ExitCode.CANCELLED)))

    def wait(self, timeout=None):
        """Deliver the runner's callbacks until this download is finished (tests, scripts). False on timeout."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.logic.runner.processEvents(0.05)
        return True

    def _onStdoutLine(self, line):
        event = parseEventLine(line)
        if event is None:
            return
        if event.get("event") == "done":
            self.path = str(event.get("path") or "")
        elif event.get("event") == "progress" and self.onProgress:
            done, total = event.get("done") or 0, event.get("total")
            fraction = min(1.0, done / total) if isinstance(total, int) and total > 0 else 0.0
            size = f"{done / 1e6:.1f} of {total / 1e6:.1f} MB" if isinstance(total, int) and total else f"{done / 1e6:.1f} MB"
            self.onProgress(DownloadProgress(fraction, f"Downloading {self.name}: {event.get('file', '')} {size}"))

    def _onStderrLine(self, line):
        self.stderrLog.append(line)
        del self.stderrLog[:-200]

    def _onFinished(self, exitCode):
        if exitCode == ExitCode.CANCELLED:
            result = BackboneResult(self.name, "cancelled", "Cancelled (the next Get resumes the download)",
                                    exitCode=int(exitCode))
        elif exitCode != 0 or not self.path:
            message = lastErrorLine(self.stderrLog) or f"The backend exited with code {exitCode}"
            result = BackboneResult(self.name, "failed", message, exitCode=int(exitCode))
        else:
            result = BackboneResult(self.name, "ok", f"{self.name} is in the backbone cache", path=self.path)
        self._finish(result)

    def _finish(self, result):
        self.result = result
        if self.onFinished:
            self.onFinished(result)
