"""Background process runners for the ``anymc3d`` backend (no Qt at import time).

The Logic starts ``PythonSlicer -m anymc3d predict ... --progress json`` through a runner. Each runner reads the
child's stdout line by line off the GUI thread and hands every line, and at the end the exit code, to callbacks:

- ``QProcessRunner`` (inside Slicer): an event-driven ``qt.QProcess``; its signals arrive on the GUI thread.
- ``SubprocessRunner`` (tests, scripts): ``subprocess.Popen`` with reader threads that only queue lines;
  ``processEvents()`` / ``waitForFinished()`` run the callbacks on the caller's thread, as an event loop would.

``cancel()`` kills the whole process tree: PythonSlicer is a launcher, so killing only the launcher would leave the
Python worker running. A cancelled run reports ``ExitCode.CANCELLED`` whatever the killed process returned.
"""

import enum
import json
import os
import queue
import signal
import subprocess
import threading
import time


class ExitCode(enum.IntEnum):
    """Exit codes of a backend run, as seen by the Logic (0, 1, 2 are the backend's own, see cli-contract.md)."""

    SUCCESS = 0
    CASE_FAILED = 1
    FATAL = 2
    CANCELLED = 1000  # never returned by the backend itself


# ---------------------------------------------------------------------------------------------------------------
# Process tree handling


def descendantPids(pid):
    """Return the pids of every descendant of ``pid`` (children first found, grandchildren after)."""
    try:
        import psutil

        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    except ImportError:
        pass
    if os.name == "nt":
        return []  # taskkill /T walks the tree itself
    try:
        output = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    childrenOf = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            childrenOf.setdefault(int(fields[1]), []).append(int(fields[0]))
    found, pending = [], [pid]
    while pending:
        for child in childrenOf.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def killProcessTree(pid, processGroup=False):
    """Kill ``pid`` and all its descendants.

    Args:
        pid: the root process (for the backend: the PythonSlicer launcher).
        processGroup: POSIX only; ``pid`` leads its own process group (started with ``start_new_session``),
            so the whole group is killed too, which also catches descendants already re-parented.
    """
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], check=False, capture_output=True)
        return
    pids = [pid] + descendantPids(pid)  # collect first: killed parents re-parent their children
    if processGroup:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for each in pids:
        try:
            os.kill(each, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------------------------
# Progress lines (cli-contract.md, ``--progress json``)


def parseEventLine(line):
    """Return the event dict of one stdout line, or None for a line that is not a contract event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    return event


def lastErrorLine(stderrLines, maxLength=300):
    """A short, clear message from the backend's stderr, not the whole traceback.

    Preference: the last logged error (``ERROR ...``, ``anymc3d: error: ...``), then the last line naming an
    error, then the last meaningful line; cut to ``maxLength`` characters.
    """
    lines = [line.strip() for line in stderrLines if line.strip()]
    tests = (lambda low: low.startswith("error") or "anymc3d: error" in low,
             lambda low: "error" in low and not low.startswith(("file ", "traceback")),
             lambda low: not low.startswith(("file ", "traceback", "^", "~")))
    for test in tests:
        for line in reversed(lines):
            if test(line.lower()):
                return line if len(line) <= maxLength else line[: maxLength - 1] + "\u2026"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# Runners


class ProcessRunner:
    """Interface of a runner. One process at a time; callbacks are called on the thread that owns the runner.

    ``start(command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None)`` starts ``command`` (a list),
    ``cancel()`` kills its process tree, ``isRunning()``, ``processEvents(timeout)`` delivers pending callbacks
    and ``waitForFinished(timeout)`` blocks until ``onFinished(exitCode)`` has been called (tests, self-test).
    """

    def start(self, command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None):
        raise NotImplementedError

    def cancel(self):
        raise NotImplementedError

    def isRunning(self):
        raise NotImplementedError

    def processEvents(self, timeout=0.0):
        raise NotImplementedError

    def waitForFinished(self, timeout=None):
        """Deliver callbacks until the process has finished. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.isRunning():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.processEvents(0.05 if remaining is None else min(0.05, remaining))
        return True


class SubprocessRunner(ProcessRunner):
    """``subprocess.Popen`` runner: reader threads queue stdout/stderr lines, ``processEvents`` dispatches them."""

    def __init__(self):
        self._process = None
        self._events = queue.Queue()
        self._callbacks = None
        self._cancelled = False
        self._running = False

    def start(self, command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None):
        if self._running:
            raise RuntimeError("A process is already running")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # own process group: Cancel kills the whole tree
        self._events = queue.Queue()
        self._callbacks = (onStdoutLine, onStderrLine, onFinished)
        self._cancelled = False
        self._process = subprocess.Popen(
            [str(c) for c in command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._running = True
        readers = [threading.Thread(target=self._read, args=(stream, kind), daemon=True)
                   for stream, kind in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr"))]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._waitForExit, args=(self._process, readers), daemon=True).start()

    def _read(self, stream, kind):
        for line in stream:
            self._events.put((kind, line.rstrip("\r\n")))
        stream.close()

    def _waitForExit(self, process, readers):
        exitCode = process.wait()
        for reader in readers:
            reader.join(timeout=5.0)  # a surviving grandchild may hold the pipes open: do not wait for ever
        self._events.put(("finished", exitCode))

    @property
    def pid(self):
        return self._process.pid if self._process else None

    def cancel(self):
        if self._running and self._process is not None:
            self._cancelled = True
            killProcessTree(self._process.pid, processGroup=(os.name != "nt"))

    def isRunning(self):
        return self._running

    def processEvents(self, timeout=0.0):
        try:
            kind, value = self._events.get(timeout=timeout) if timeout else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._dispatch(kind, value)
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, kind, value):
        onStdoutLine, onStderrLine, onFinished = self._callbacks
        if kind == "stdout":
            onStdoutLine(value)
        elif kind == "stderr":
            onStderrLine(value)
        elif kind == "finished" and self._running:
            self._running = False
            onFinished(ExitCode.CANCELLED if self._cancelled else value)


class QProcessRunner(ProcessRunner):
    """Event-driven ``qt.QProcess`` runner for the Slicer application (``qt`` is imported only here)."""

    def __init__(self):
        import qt  # noqa: F401  (fails early outside Slicer)

        self._process = None
        self._callbacks = None
        self._buffers = {"stdout": "", "stderr": ""}
        self._cancelled = False
        self._retired = []  # finished QProcess objects, kept until control is back in the event loop

    def start(self, command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None):
        import qt

        if self.isRunning():
            raise RuntimeError("A process is already running")
        self._callbacks = (onStdoutLine, onStderrLine, onFinished)
        self._buffers = {"stdout": "", "stderr": ""}
        self._cancelled = False
        process = qt.QProcess()
        if env is not None:
            environment = qt.QProcessEnvironment()
            for key, value in env.items():
                environment.insert(key, value)
            process.setProcessEnvironment(environment)
        if cwd:
            process.setWorkingDirectory(cwd)
        process.connect("readyReadStandardOutput()", lambda: self._onReadyRead("stdout"))
        process.connect("readyReadStandardError()", lambda: self._onReadyRead("stderr"))
        process.connect("finished(int,QProcess::ExitStatus)", self._onFinished)
        self._process = process
        command = [str(c) for c in command]
        process.start(command[0], command[1:])

    def _onReadyRead(self, kind):
        data = self._process.readAllStandardOutput() if kind == "stdout" else self._process.readAllStandardError()
        text = self._buffers[kind] + bytes(data.data()).decode("utf-8", errors="replace")
        *lines, self._buffers[kind] = text.split("\n")
        callback = self._callbacks[0] if kind == "stdout" else self._callbacks[1]
        for line in lines:
            callback(line.rstrip("\r"))

    def _onFinished(self, exitCode, exitStatus=None):
        import qt

        for kind in ("stdout", "stderr"):
            self._onReadyRead(kind)
            if self._buffers[kind]:
                (self._callbacks[0] if kind == "stdout" else self._callbacks[1])(self._buffers[kind])
                self._buffers[kind] = ""
        # This runs inside the QProcess's own finished() signal. PythonQt deletes a parentless QObject made from
        # Python as soon as its last Python reference goes, even while that object's signal is being dispatched.
        # So the finished process is kept in _retired and released by a zero-time timer, i.e. back in the event
        # loop after this handler (and a next start() made from onFinished, as a batch does) has returned.
        process, self._process = self._process, None
        self._retired.append(process)
        qt.QTimer.singleShot(0, self._releaseRetired)
        self._callbacks[2](ExitCode.CANCELLED if self._cancelled else exitCode)

    def _releaseRetired(self):
        self._retired = []

    def cancel(self):
        if self.isRunning():
            self._cancelled = True
            killProcessTree(int(self._process.processId()))

    def isRunning(self):
        return self._process is not None

    def processEvents(self, timeout=0.0):
        import qt

        qt.QCoreApplication.processEvents()
        if timeout:
            time.sleep(timeout)
