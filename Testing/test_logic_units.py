"""Small units of the Logic: stderr messages, dependency check, plugin library with a fake reader, runner."""

import json
import os
import sys
from pathlib import Path

import pytest
from AnyMC3DSlicerLogic import (
    DependencyChecker,
    ExitCode,
    PluginLibrary,
    SubprocessRunner,
)
from AnyMC3DSlicerLogic.process import lastErrorLine, parseEventLine


def test_parse_event_line():
    assert parseEventLine('{"event": "start", "cases": 2}') == {"event": "start", "cases": 2}
    assert parseEventLine("INFO loading") is None
    assert parseEventLine("{not json") is None
    assert parseEventLine('{"no_event": 1}') is None


def test_last_error_line_prefers_the_logged_error():
    lines = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: bad",
             "ERROR anymc3d: cannot read backbone weights (UnpicklingError: ...", "Please file an issue: WeightsUnpickler error:",
             "Check the documentation"]
    assert lastErrorLine(lines) == "ERROR anymc3d: cannot read backbone weights (UnpicklingError: ..."
    assert lastErrorLine(["Traceback (most recent call last):", "ValueError: bad value"]) == "ValueError: bad value"
    assert len(lastErrorLine(["ERROR " + "x" * 1000])) == 300


def test_subprocess_runner_lines_and_exit_code():
    runner = SubprocessRunner()
    out, err, finished = [], [], []
    code = "import sys; print('a'); print('b', flush=True); print('oops', file=sys.stderr); sys.exit(3)"
    runner.start([sys.executable, "-c", code], out.append, err.append, finished.append)
    assert runner.waitForFinished(30)
    assert out == ["a", "b"] and err == ["oops"] and finished == [3]
    assert not runner.isRunning()


def test_subprocess_runner_cancel_reports_cancelled():
    runner = SubprocessRunner()
    finished = []
    runner.start([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"], lambda line: runner.cancel(),
                 lambda line: None, finished.append)
    assert runner.waitForFinished(30)
    assert finished == [ExitCode.CANCELLED]


ECHO = "import os, sys; print(os.getpid(), sys.stdin.readline().strip(), flush=True)"


def test_subprocess_runner_adopts_the_process_kept_ready():
    """prepare() starts the process ahead; start() with the same command and environment uses that very process
    (same pid) and hands it stdinText; another environment gets a new process and the ready one is ended."""
    runner = SubprocessRunner()
    env = dict(os.environ, MARK="1")
    runner.prepare([sys.executable, "-c", ECHO], env=env)
    readyPid = runner.readyPid
    out, finished = [], []
    runner.start([sys.executable, "-c", ECHO], out.append, lambda line: None, finished.append, env=env, stdinText="hello\n")
    assert runner.waitForFinished(30) and finished == [0]
    assert out == [f"{readyPid} hello"] and runner.readyPid is None
    runner.prepare([sys.executable, "-c", ECHO], env=env)
    stale = runner._ready[1]
    out = []
    runner.start([sys.executable, "-c", ECHO], out.append, lambda line: None, finished.append,
                 env=dict(env, MARK="2"), stdinText="again\n")
    assert runner.waitForFinished(30)
    assert out[0].endswith(" again") and int(out[0].split()[0]) != stale.pid
    assert stale.wait(10) is not None  # the mismatched ready process was ended, not left behind
    runner.prepare([sys.executable, "-c", ECHO], env=env)
    ready = runner._ready[1]
    runner.close()
    assert ready.wait(10) is not None and runner.readyPid is None


def test_dependency_checker_routes_the_backends_own_pins():
    """Versions come from metadata; each unsatisfied requirement is routed to PyTorchUtils, pip or "update Slicer"."""
    requirements = ["torch>=2.3", "torchvision", "timm>=1.0.20,<1.1", "peft>=0.17", "numpy>=1.24", "jsonschema>=4",
                    "tqdm>=4.60", "pywin32; sys_platform == 'nonexistent-platform'"]
    installed = {"torch": "2.4.0+cu121", "timm": "1.1.2", "numpy": "1.26.4", "tqdm": "4.67.1"}
    checker = DependencyChecker(requirements, versionOf=installed.get)
    assert checker.missingPackages() == ["torchvision", "timm", "peft", "jsonschema"]  # timm 1.1.2 breaks the <1.1 pin
    assert checker.plan() == {"torch": ["torchvision"], "pip": ["timm<1.1,>=1.0.20", "peft>=0.17", "jsonschema>=4"],
                              "shipped": []}
    assert checker.torchSpecifiers() == (">=2.3", "")
    lines = checker.installDescription(checker.missingPackages())
    assert lines[0] == "torchvision (through the PyTorch extension)" and "timm<1.1,>=1.0.20" in lines
    assert DependencyChecker(requirements, versionOf={**installed, "numpy": "1.20"}.get).plan()["shipped"] == ["numpy>=1.24"]
    everything = {"torch": "2.5", "torchvision": "0.20", "timm": "1.0.22", "peft": "0.17.1", "numpy": "2.1",
                  "jsonschema": "4.23", "tqdm": "4.66"}
    assert DependencyChecker(requirements, versionOf=everything.get).missingPackages() == []


def test_plugin_library_with_fake_reader(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    good = source / "chest.anymc3d"
    good.write_text(json.dumps({"name": "chest", "task": "multilabel", "labels": ["a", "b"], "backbone": {"name": "vit"}}))
    bad = source / "bad.anymc3d"
    bad.write_text("{")
    library = PluginLibrary(tmp_path / "plugins", metadataReader=lambda path: json.loads(Path(path).read_text(encoding="utf-8")))
    with pytest.raises(ValueError):
        library.importPlugin(str(bad))
    with pytest.raises(ValueError):
        library.importPlugin(str(tmp_path / "plugin.zip"))
    assert not os.path.exists(tmp_path / "plugins" / "bad.anymc3d")
    info = library.importPlugin(str(good))
    assert (info.name, info.labels, info.backbone) == ("chest", ["a", "b"], "vit")
    assert [p.name for p in library.plugins()[0]] == ["chest"]
    with pytest.raises(ValueError):
        library.removePlugin(str(good))  # not in the library's folder
    library.removePlugin(info.path)
    assert library.plugins() == ([], [])
