"""The process runners on the paths a real Slicer takes and the easy stand-ins never did: a backend that cannot
start (Qt 5: ``errorOccurred(FailedToStart)``, never ``finished``, pid 0), a pid of 0 or -1 given to the kill
helper, output that arrives while the process runs, a run killed from outside. The QProcess stand-in
(slicer_standins/qt.py) behaves as Qt 5's QProcess there; each scenario runs in a child process."""

import json
import os
import signal
import subprocess
import sys

import pytest
from AnyMC3DSlicerLogic import process as processModule

from .slicer_testing import BACKEND_PATH, REPO_ROOT

STANDINS = os.path.join(REPO_ROOT, "Testing", "slicer_standins")


def runWithStandins(code, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([STANDINS, BACKEND_PATH, os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", env=env, check=False,
                               timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_kill_helper_never_signals_pid_zero_or_negative(monkeypatch):
    """os.kill(0, SIGKILL) would kill the caller's process group (Slicer), os.kill(-1, ...) every process of the
    user: the helper signals nothing for pid 0, -1 or None."""
    signalled = []
    monkeypatch.setattr(processModule.os, "kill", lambda pid, sig: signalled.append(("kill", pid, sig)))
    monkeypatch.setattr(processModule.os, "killpg", lambda pid, sig: signalled.append(("killpg", pid, sig)), raising=False)
    realRun = processModule.subprocess.run
    monkeypatch.setattr(processModule.subprocess, "run",
                        lambda command, **kw: signalled.append(("run", command)) if "taskkill" in command else realRun(command, **kw))
    for pid in (0, -1, None):
        processModule.killProcessTree(pid)
        processModule.killProcessTree(pid, processGroup=True)
    assert signalled == []
    processModule.killProcessTree(2_000_000_000)  # a real (absent) pid is still signalled: the guard is not "never"
    assert ("kill", 2_000_000_000, signal.SIGKILL) in signalled


@pytest.mark.slow  # a child-process Slicer scenario
def test_failed_start_ends_the_job_with_a_clear_message_and_cancel_signals_nothing(tmp_path):
    """A backend that cannot start: the prediction job ends as failed with a message naming the program (it used to
    stay "running" for ever), the runner takes new work, and a Cancel or close afterwards signals no pid <= 0."""
    missing = str(tmp_path / "no-such-PythonSlicer")
    seen = runWithStandins(f"""
import json, os, slicer, qt
from AnyMC3DSlicerLogic import AnyMC3DSlicerLogic, QProcessRunner, process
signalled = []
realKill = os.kill
os.kill = lambda pid, sig: signalled.append(pid) if pid <= 0 else realKill(pid, sig)
scene = slicer.vtkMRMLScene()
logic = AnyMC3DSlicerLogic(scene, runner=QProcessRunner(), backendCommand=[{missing!r}, "-m", "anymc3d"])
logic.keepBackendReady = True
logic.prepareBackend()
volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
import vtk
image = vtk.vtkImageData(); image.SetDimensions(4, 4, 4); image.AllocateScalars(vtk.VTK_FLOAT, 1)
volume.SetAndObserveImageData(image)
job = logic.startPrediction([volume], "w.safetensors", ["p.anymc3d"])
finished = job.wait(30)
job.cancel(); logic.runner.cancel(); logic.close()
print(json.dumps({{"finished": finished, "status": job.result and job.result.status, "message": job.result and job.result.message,
                  "running": logic.runner.isRunning(), "signalled": signalled}}))
""")
    assert seen["finished"] and seen["status"] == "failed" and not seen["running"]
    assert "cannot start" in seen["message"] and "no-such-PythonSlicer" in seen["message"]
    assert seen["signalled"] == []


@pytest.mark.slow  # a child-process Slicer scenario
def test_standin_qprocess_behaves_as_qt5():
    """The stand-in itself: a failed start emits errorOccurred(FailedToStart) only, pid 0; a normal run emits
    started (pid > 0), streams output before the exit, and reports pid 0 once finished; the child stays in the
    caller's process group; a child killed from outside: errorOccurred(Crashed), finished(0, CrashExit)."""
    seen = runWithStandins("""
import json, os, sys, time, qt
events = []
bad = qt.QProcess()
for name in ("started", "finished", "errorOccurred"):
    bad.connect(name + "()", lambda *a, n=name: events.append(["bad", n, list(a)]))
bad.start("/no/such/program", [])
badPid = bad.processId()
qt.QCoreApplication.processEvents()
good = qt.QProcess()
pids = {}
good.connect("started()", lambda: pids.update(started=good.processId()))
good.connect("readyReadStandardOutput()", lambda: events.append(["out", bytes(good.readAllStandardOutput().data()).decode(), pids.get("exited")]))
good.connect("finished(int,QProcess::ExitStatus)", lambda code, status: pids.update(exited=good.processId(), code=code, status=status))
code = "import os, sys, time; print(os.getpgrp(), flush=True); time.sleep(1.5); print('late', flush=True)"
good.start(sys.executable, ["-c", code])
deadline = time.monotonic() + 30
firstChunkBeforeExit = None
while "exited" not in pids and time.monotonic() < deadline:
    qt.QCoreApplication.processEvents(); time.sleep(0.02)
    if firstChunkBeforeExit is None and any(e[0] == "out" for e in events):
        firstChunkBeforeExit = "exited" not in pids
killed = qt.QProcess(); crash = []
killed.connect("errorOccurred()", lambda error: crash.append(["error", error]))
killed.connect("finished(int,QProcess::ExitStatus)", lambda code, status: crash.append(["finished", code, status]))
killed.start(sys.executable, ["-c", "import time; time.sleep(60)"])
qt.QCoreApplication.processEvents()
os.kill(killed.processId(), 9)
while len(crash) < 2 and time.monotonic() < deadline:
    qt.QCoreApplication.processEvents(); time.sleep(0.02)
print(json.dumps({"events": events, "badPid": badPid, "badError": bad.errorString(), "pids": pids, "myGroup": os.getpgrp(),
                  "firstChunkBeforeExit": firstChunkBeforeExit, "crash": crash}))
""")
    assert [e for e in seen["events"] if e[0] == "bad"] == [["bad", "errorOccurred", [0]]]
    assert seen["badPid"] == 0 and "failed to start" in seen["badError"].lower()
    assert seen["pids"]["started"] > 0 and seen["pids"]["exited"] == 0 and seen["pids"]["code"] == 0
    outputs = [e[1] for e in seen["events"] if e[0] == "out"]
    assert outputs[0].strip() == str(seen["myGroup"])  # same process group as the caller: no new session
    assert seen["firstChunkBeforeExit"] and "late" in "".join(outputs)
    assert seen["crash"] == [["error", 1], ["finished", 0, 1]]


@pytest.mark.slow  # a child-process Slicer scenario
def test_runner_reports_a_crash_as_crashed_not_success():
    """Qt 5 reports a child killed by a signal as finished(0, CrashExit): the runner must not pass that on as 0."""
    seen = runWithStandins("""
import json, os, sys, time
from AnyMC3DSlicerLogic import QProcessRunner, ExitCode
runner, done = QProcessRunner(), []
runner.start([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], lambda l: None, lambda l: None, done.append)
deadline = time.monotonic() + 30
while not done and time.monotonic() < deadline:
    runner.processEvents(0.02)
print(json.dumps({"done": [int(c) for c in done], "crashed": int(ExitCode.CRASHED)}))
""")
    assert seen["done"] == [seen["crashed"]]
