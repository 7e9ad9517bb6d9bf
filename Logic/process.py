"""Background process runners for the ``anymc3d`` backend (no Qt at import time).

The Logic starts ``PythonSlicer -m anymc3d predict ... --progress json`` through a runner. Each runner reads the
child's stdout line by line off the GUI thread and hands every line, and at the end the exit code, to callbacks:

- ``QProcessRunner`` (inside Slicer): an event-driven ``qt.QProcess``; its signals arrive on the GUI thread.
- ``SubprocessRunner`` (tests, scripts): ``subprocess.Popen`` with reader threads that only queue lines;
  ``processEvents()`` / ``waitForFinished()`` run the callbacks on the caller's thread, as an event loop would.

A runner can also keep one process *ready* (``prepare``): started ahead of time with its arguments still to come on
stdin (``anymc3d standby`` imports torch, timm and peft, then reads one JSON command line). ``start`` with the same
command, environment and folder adopts it and writes ``stdinText``; otherwise a new process is started and given
the same text, so the warm and the cold path run the same protocol. Each run is still its own process.

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
    FAILED_TO_START = 1001  # the process never ran (QProcess::FailedToStart: program missing, not executable)
    CRASHED = 1002  # ended by a signal it did not ask for (QProcess::CrashExit), not by Cancel


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
        pid: the root process (for the backend: the PythonSlicer launcher). A pid <= 0 (or None) signals nothing:
            QProcess reports 0 before it started and after it ended, and ``os.kill(0, ...)`` would signal the
            caller's whole process group (Slicer itself), ``os.kill(-1, ...)`` every process the user owns.
        processGroup: POSIX only; ``pid`` leads its own process group (started with ``start_new_session``),
            so the whole group is killed too, which also catches descendants already re-parented.
    """
    if pid is None or int(pid) <= 0:
        return
    pid = int(pid)
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

    ``start(command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None, stdinText=None)`` starts ``command``
    (a list; ``stdinText`` is written to its stdin, which is then closed), ``cancel()`` kills its process tree,
    ``isRunning()``, ``processEvents(timeout)`` delivers pending callbacks and ``waitForFinished(timeout)`` blocks
    until ``onFinished(exitCode)`` has been called (tests, self-test). ``prepare(command, env, cwd)`` keeps one
    process of ``command`` ready for a later ``start`` of the same command; ``close()`` ends it.
    """

    def start(self, command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None, stdinText=None):
        raise NotImplementedError

    def prepare(self, command, env=None, cwd=None):
        raise NotImplementedError

    def close(self):
        """End the process kept ready, if any (it would also end by itself when this process exits: its stdin
        closes)."""
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
        self._ready = None  # (key, Popen, its event queue): the process kept ready by prepare()

    @staticmethod
    def _spawn(command, env, cwd):
        """Start ``command`` with piped stdin/stdout/stderr and reader threads; return (Popen, event queue)."""
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # own process group: Cancel kills the whole tree
        events = queue.Queue()
        process = subprocess.Popen(
            [str(c) for c in command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        readers = [threading.Thread(target=SubprocessRunner._read, args=(stream, kind, events), daemon=True)
                   for stream, kind in ((process.stdout, "stdout"), (process.stderr, "stderr"))]
        for reader in readers:
            reader.start()
        threading.Thread(target=SubprocessRunner._waitForExit, args=(process, readers, events), daemon=True).start()
        return process, events

    def prepare(self, command, env=None, cwd=None):
        key = _readyKey(command, env, cwd)
        if self._ready is not None and self._ready[0] == key and self._ready[1].poll() is None:
            return
        self.close()
        self._ready = (key, *self._spawn(command, env, cwd))

    def close(self):
        ready, self._ready = self._ready, None
        if ready is not None and ready[1].poll() is None:
            killProcessTree(ready[1].pid, processGroup=(os.name != "nt"))

    def _adopt(self, command, env, cwd):
        """The ready process if it fits and is alive (it leaves the ready slot either way), else None."""
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        key, process, events = ready
        if key == _readyKey(command, env, cwd) and process.poll() is None:
            return process, events
        if process.poll() is None:
            killProcessTree(process.pid, processGroup=(os.name != "nt"))
        return None

    def start(self, command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None, stdinText=None):
        if self._running:
            raise RuntimeError("A process is already running")
        self._callbacks = (onStdoutLine, onStderrLine, onFinished)
        self._cancelled = False
        adopted = self._adopt(command, env, cwd)
        self._process, self._events = adopted or self._spawn(command, env, cwd)
        self._running = True
        try:
            if stdinText:
                self._process.stdin.write(stdinText)
            self._process.stdin.close()
        except OSError:
            pass  # it has already ended: its exit code and stderr say why

    @staticmethod
    def _read(stream, kind, events):
        for line in stream:
            events.put((kind, line.rstrip("\r\n")))
        stream.close()

    @staticmethod
    def _waitForExit(process, readers, events):
        exitCode = process.wait()
        for reader in readers:
            reader.join(timeout=5.0)  # a surviving grandchild may hold the pipes open: do not wait for ever
        events.put(("finished", exitCode))

    @property
    def pid(self):
        return self._process.pid if self._process else None

    @property
    def readyPid(self):
        """The pid of the process kept ready, or None."""
        return self._ready[1].pid if self._ready else None

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


def _readyKey(command, env, cwd):
    """What a ready process must share with a run to serve it: the command, the environment and the folder."""
    return (tuple(str(c) for c in command), tuple(sorted((env or {}).items())) if env is not None else None,
            str(cwd) if cwd else None)


class _QtRun:
    """One ``qt.QProcess`` with its line buffers. Until a run adopts it (``callbacks`` None) its lines are kept
    and replayed at adoption; a process kept ready that ends by itself is only marked ``ended``.

    Qt 5's QProcess (qtbase src/corelib/io/qprocess.cpp) reports a process that cannot start with
    ``errorOccurred(FailedToStart)`` only, never ``finished``, and its ``processId()`` is 0 then and after an
    exit: so the run ends on that error too, and the pid to kill is the one ``started()`` gave (0 until then).
    """

    FAILED_TO_START = 0  # QProcess::FailedToStart
    CRASH_EXIT = 1  # QProcess::CrashExit

    def __init__(self, runner, command, env, cwd):
        import qt

        self.runner = runner
        self.key = _readyKey(command, env, cwd)
        self.callbacks = None
        self.pending = []  # (kind, line) received before adoption
        self.buffers = {"stdout": "", "stderr": ""}
        self.ended = False
        self.pid = 0
        self.program = str(command[0])
        process = qt.QProcess()
        if env is not None:
            environment = qt.QProcessEnvironment()
            for key, value in env.items():
                environment.insert(key, value)
            process.setProcessEnvironment(environment)
        if cwd:
            process.setWorkingDirectory(cwd)
        process.connect("readyReadStandardOutput()", lambda: self.onReadyRead("stdout"))
        process.connect("readyReadStandardError()", lambda: self.onReadyRead("stderr"))
        process.connect("finished(int,QProcess::ExitStatus)", self.onFinished)
        process.connect("errorOccurred(QProcess::ProcessError)", self.onError)
        process.connect("started()", self.onStarted)
        self.process = process
        command = [str(c) for c in command]
        process.start(command[0], command[1:])

    def emit(self, kind, line):
        if self.callbacks is None:
            self.pending.append((kind, line))
        else:
            (self.callbacks[0] if kind == "stdout" else self.callbacks[1])(line)

    def onStarted(self):
        self.pid = int(self.process.processId())

    def onError(self, error):
        """Only FailedToStart ends the run here: for the other errors (Crashed, ...) ``finished`` follows."""
        if int(error) != self.FAILED_TO_START or self.ended:
            return
        self.ended = True
        self.pid = 0
        self.emit("stderr", f"ERROR: cannot start {self.program}: {self.process.errorString()}")
        self.runner._onFinished(self, ExitCode.FAILED_TO_START)

    def onReadyRead(self, kind):
        data = self.process.readAllStandardOutput() if kind == "stdout" else self.process.readAllStandardError()
        text = self.buffers[kind] + bytes(data.data()).decode("utf-8", errors="replace")
        *lines, self.buffers[kind] = text.split("\n")
        for line in lines:
            self.emit(kind, line.rstrip("\r"))

    def adopt(self, callbacks, stdinText):
        import qt

        self.callbacks = callbacks
        pending, self.pending = self.pending, []
        for kind, line in pending:
            self.emit(kind, line)
        if stdinText:
            self.process.write(qt.QByteArray(stdinText.encode("utf-8")))
        self.process.closeWriteChannel()

    def onFinished(self, exitCode, exitStatus=0):
        if self.ended:
            return
        for kind in ("stdout", "stderr"):
            self.onReadyRead(kind)
            if self.buffers[kind]:
                self.emit(kind, self.buffers[kind])
                self.buffers[kind] = ""
        self.ended = True
        self.pid = 0
        self.runner._onFinished(self, ExitCode.CRASHED if int(exitStatus) == self.CRASH_EXIT else exitCode)

    def kill(self):
        """Kill the process tree of the pid ``started()`` gave; before that, only QProcess's own ``kill()`` (a no-op
        when nothing runs); never a pid <= 0."""
        if self.pid > 0:
            killProcessTree(self.pid)
        elif self.process is not None:
            self.process.kill()


class QProcessRunner(ProcessRunner):
    """Event-driven ``qt.QProcess`` runner for the Slicer application (``qt`` is imported only here)."""

    def __init__(self):
        import qt  # noqa: F401  (fails early outside Slicer)

        self._run = None  # the _QtRun of the current run
        self._ready = None  # the _QtRun kept ready by prepare()
        self._cancelled = False
        self._retired = []  # finished QProcess objects, kept until control is back in the event loop

    def prepare(self, command, env=None, cwd=None):
        ready = self._ready
        if ready is not None and ready.key == _readyKey(command, env, cwd) and not ready.ended:
            return
        self.close()
        self._ready = _QtRun(self, command, env, cwd)

    def close(self):
        ready, self._ready = self._ready, None
        if ready is not None and not ready.ended:
            ready.kill()

    def start(self, command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None, stdinText=None):
        if self.isRunning():
            raise RuntimeError("A process is already running")
        self._cancelled = False
        ready, self._ready = self._ready, None
        if ready is not None and (ready.ended or ready.key != _readyKey(command, env, cwd)):
            if not ready.ended:
                ready.kill()
            ready = None
        self._run = ready or _QtRun(self, command, env, cwd)
        self._run.adopt((onStdoutLine, onStderrLine, onFinished), stdinText)

    def _onFinished(self, run, exitCode):
        import qt

        # This runs inside the QProcess's own finished() signal. PythonQt deletes a parentless QObject made from
        # Python as soon as its last Python reference goes, even while that object's signal is being dispatched.
        # So the finished process is kept in _retired and released by a zero-time timer, i.e. back in the event
        # loop after this handler (and a next start() made from onFinished, as a batch does) has returned.
        self._retired.append(run)
        qt.QTimer.singleShot(0, self._releaseRetired)
        if run is not self._run:
            return  # a process kept ready ended by itself: a later start() starts a new one
        self._run = None
        run.callbacks[2](ExitCode.CANCELLED if self._cancelled else exitCode)

    def _releaseRetired(self):
        retired, self._retired = self._retired, []
        for run in retired:
            run.process = None  # its signal handlers refer to the run: break the cycle so the QProcess goes now

    def cancel(self):
        if self.isRunning():
            self._cancelled = True
            self._run.kill()

    def isRunning(self):
        return self._run is not None

    def processEvents(self, timeout=0.0):
        import qt

        qt.QCoreApplication.processEvents()
        if timeout:
            time.sleep(timeout)
