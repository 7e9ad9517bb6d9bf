"""Start-up: the command line answers --help, --version and usage errors without importing torch, and a
prediction imports nothing that only training needs (peft, transformers). Each run is a fresh interpreter
(subprocess), so sys.modules shows what the command itself imported; the times are printed, not asserted
(benchmarks/bench_engine.py, section 4, measures them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: runs anymc3d's main(argv) and prints the exit code and which of the watched modules got imported
PROBE = """
import json, sys
from anymc3d.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:
    code = exc.code
watched = ("torch", "timm", "SimpleITK", "peft", "transformers", "torchvision", "torch._dynamo")
print("PROBE " + json.dumps({"code": code, "imported": [m for m in watched if m in sys.modules]}))
"""


def _run(argv: list[str], env: dict | None = None) -> tuple[dict, float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, encoding="utf-8",
                          env=env or os.environ.copy(), timeout=600)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"no probe line: {done.stdout[-500:]} {done.stderr[-1500:]}"
    return json.loads(lines[-1][6:]), seconds, done.stdout


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--version"], 0), (["predict"], 2),
                                        (["predict", "x.nii.gz", "--backbone", "b", "--plugin", "p",
                                          "--precision", "int8"], 2)])
def test_help_version_and_usage_errors_import_no_torch(argv, code):
    probe, seconds, _ = _run(argv)
    print(f"anymc3d {' '.join(argv)}: {seconds:.2f} s (exit {probe['code']})")
    assert probe["code"] == code
    assert probe["imported"] == [], f"{argv} imported {probe['imported']}"


def _flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return {f for line in lines if line.startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.mark.slow
def test_predict_imports_no_training_packages_and_states_its_precision(demo_dir, tmp_path):
    """The demo prediction with precision auto (bf16 switch cleared): no peft, no transformers; its record says
    which precision ran. torchvision and torch._dynamo are imported by timm itself (timm/layers/create_norm.py
    imports torchvision.ops.misc, whose package imports torch._dynamo): reported, measured in the benchmark."""
    env = {k: v for k, v in os.environ.items() if k != "ANYMC3D_NO_BF16"}
    out = tmp_path / "records.json"
    argv = ["predict", str(demo_dir / "volume.nii.gz"), "--backbone", str(demo_dir / "backbone.safetensors"),
            "--plugin", str(demo_dir / "plugin.anymc3d"), "--json", str(out), "--progress", "none",
            "--heatmap", str(tmp_path / "maps")]
    probe, seconds, _ = _run(argv, env)
    print(f"anymc3d predict (demo): {seconds:.2f} s, imported {probe['imported']}")
    assert probe["code"] == 0
    assert "peft" not in probe["imported"] and "transformers" not in probe["imported"]
    assert {"torch", "timm"} <= set(probe["imported"])
    from anymc3d.device import AUTO_BF16

    native = bool(_flags() & {"amx_bf16", "avx512_bf16"})
    (result,) = json.loads(out.read_text(encoding="utf-8"))[0]["results"]
    assert result["precision"] == ("bf16" if native and AUTO_BF16 else "fp32")


def test_the_entry_point_runs_atexit_handlers_flushes_and_keeps_the_exit_code():
    """``cli.run`` skips only the interpreter's teardown: an atexit handler still runs (temporary files, Ray and
    logging rely on them), buffered output still arrives, and the command's exit code is the process's."""
    code = ("import atexit, sys, anymc3d.cli as cli\n"
            "atexit.register(lambda: sys.stdout.write('atexit ran\\n'))\n"
            "cli.main = lambda: (sys.stdout.write('result written\\n'), 3)[1]\n"
            "cli.run()\n"
            "sys.stdout.write('never\\n')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines() == ["result written", "atexit ran"]
