"""Small units of the Logic: stderr messages, dependency check, plugin library with a fake reader, runner."""

import json
import os
import sys
from pathlib import Path

import pytest

from Logic import DependencyChecker, ExitCode, PluginLibrary, SubprocessRunner
from Logic.process import lastErrorLine, parseEventLine


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


def test_dependency_checker_lists_missing_packages():
    present = {"torch", "timm", "safetensors"}
    checker = DependencyChecker(backendRequirement="anymc3d==0.1.0", findSpec=lambda name: object() if name in present else None)
    missing = checker.missingPackages()
    assert missing == ["peft", "nibabel", "anymc3d"]
    description = checker.installDescription(missing)
    assert description[-1] == "anymc3d==0.1.0" and any(line.startswith("peft") for line in description)
    assert DependencyChecker(findSpec=lambda name: None).missingPackages()[0] == "torch"
    assert "numpy" not in DependencyChecker(findSpec=lambda name: None).missingPackages()


def test_plugin_library_with_fake_reader(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    good = source / "chest.anymc3d"
    good.write_text(json.dumps({"name": "chest", "task": "multilabel", "labels": ["a", "b"], "backbone": {"name": "vit"}}))
    bad = source / "bad.anymc3d"
    bad.write_text("{")
    library = PluginLibrary(tmp_path / "plugins", metadataReader=lambda path: json.loads(Path(path).read_text()))
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
