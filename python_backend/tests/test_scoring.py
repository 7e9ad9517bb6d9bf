"""`anymc3d predict --ray` on a local Ray cluster (2 CPUs, 2 model workers): the same records and heatmaps as the
local run, a killed worker retried by Ray with every case once, and --resume running only the missing cases.

Ray runs are slow on 2 cores (each run starts its worker processes), so there are three, shared by the tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from anymc3d.cli import main
from anymc3d.contract import validate_records
from anymc3d.synthetic import make_ct_volume

ray = pytest.importorskip("ray")

RAY_FLAGS = ["--ray", "--workers", "2", "--cpus-per-worker", "0.5"]  # 2 x 0.5 CPU for the models, 1 CPU for reading


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module; `--ray` joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_plugins(demo_dir, tmp_path_factory):
    from anymc3d.backbone import load_backbone
    from anymc3d.demo import random_plugin
    from anymc3d.plugin import save_plugin

    bb = load_backbone(demo_dir / "backbone.safetensors")
    config, head, lora = random_plugin(bb.model, bb.spec, name="second", labels=("a", "b"), seed=4)
    second = save_plugin(tmp_path_factory.mktemp("plugins") / "second.anymc3d", config, head, lora)
    return [demo_dir / "plugin.anymc3d", second]


def _args(demo_dir, plugins, inputs, out, heat, *extra):
    args = ["predict", *map(str, inputs), "--backbone", str(demo_dir / "backbone.safetensors"), "--device", "cpu",
            "--progress", "none", "--json", str(out), "--heatmap", str(heat), *map(str, extra)]
    for plugin in plugins:
        args += ["--plugin", str(plugin)]
    return args


def _write_cases(folder, good: int, bad: bool):
    folder.mkdir()
    for i in range(good):
        sitk.WriteImage(make_ct_volume(size=(32, 28, 4 + i % 3), lesion=i % 2 == 0, seed=i), str(folder / f"g{i}.nii.gz"))
    if bad:
        (folder / "corrupt.nii.gz").write_bytes(os.urandom(2000))
        data = (folder / "g0.nii.gz").read_bytes()
        (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])


def test_ray_records_and_heatmaps_equal_the_local_runs(local_ray, demo_dir, two_plugins, tmp_path):
    cases = tmp_path / "cases"
    _write_cases(cases, good=3, bad=True)
    assert main(_args(demo_dir, two_plugins, [cases], tmp_path / "local.json", tmp_path / "hl")) == 1
    assert main(_args(demo_dir, two_plugins, [cases], tmp_path / "ray.json", tmp_path / "hr", *RAY_FLAGS)) == 1
    local = validate_records(json.loads((tmp_path / "local.json").read_text(encoding="utf-8")))
    remote = validate_records(json.loads((tmp_path / "ray.json").read_text(encoding="utf-8")))
    assert [r["image"] for r in remote] == [r["image"] for r in local] and len(local) == 5
    assert [r["status"] for r in local].count("error") == 2
    for a, b in zip(local, remote):
        assert (a["status"], a["error"], a["slicing_axis"], a["num_slices"]) == \
               (b["status"], b["error"], b["slicing_axis"], b["num_slices"])
        assert [r["plugin"] for r in a["results"]] == [r["plugin"] for r in b["results"]]
        for ra, rb in zip(a["results"], b["results"]):
            assert ra["labels"] == rb["labels"] and ra["decisions"] == rb["decisions"]
            np.testing.assert_allclose([rb["probabilities"][k] for k in rb["labels"]],
                                       [ra["probabilities"][k] for k in ra["labels"]], rtol=0, atol=1e-5)
            np.testing.assert_allclose(rb["slice_importance"], ra["slice_importance"], rtol=0, atol=1e-5)
            assert os.path.basename(rb["heatmap"]) == os.path.basename(ra["heatmap"])
            np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(rb["heatmap"])),
                                       sitk.GetArrayFromImage(sitk.ReadImage(ra["heatmap"])), rtol=0, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "hr").iterdir()) == sorted(p.name for p in (tmp_path / "hl").iterdir())
    assert len(list((tmp_path / "hr").iterdir())) == 3 * 2


@pytest.fixture(scope="module")
def killed_run(local_ray, demo_dir, tmp_path_factory):
    """A run of 8 cases during which the test SIGKILLs one model-worker process once a first case is committed."""
    root = tmp_path_factory.mktemp("killed")
    cases = root / "cases"
    _write_cases(cases, good=8, bad=False)
    out, run_dir = root / "r.json", root / "r.json.parts"
    killed = {}

    def kill_one_worker():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            commits = [p for p in run_dir.glob("*.json") if p.name != "run.json"]
            workers = sorted((run_dir / ".workers").glob("*.json"))
            if commits and workers:
                pid = json.loads(workers[-1].read_text(encoding="utf-8"))["pid"]
                killed.update(pid=pid, commits=len(commits))
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    thread = threading.Thread(target=kill_one_worker, daemon=True)
    thread.start()
    code = main(_args(demo_dir, [demo_dir / "plugin.anymc3d"], [cases], out, root / "heat", *RAY_FLAGS))
    thread.join(timeout=5)
    return {"root": root, "code": code, "killed": killed, "cases": cases, "out": out, "run_dir": run_dir}


def test_a_killed_worker_is_retried_and_every_case_is_written_once(killed_run):
    run = killed_run
    assert run["killed"] and run["killed"]["commits"] < 8  # the kill came mid-run
    with pytest.raises(ProcessLookupError):
        os.kill(run["killed"]["pid"], 0)  # the process really died
    assert run["code"] == 0
    records = validate_records(json.loads(run["out"].read_text(encoding="utf-8")))
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in run["cases"].iterdir())
    assert all(r["status"] == "ok" for r in records)
    heat = run["root"] / "heat"
    assert sorted(p.name for p in heat.iterdir()) == sorted(f"g{i}__demo_findings.nii.gz" for i in range(8))


def test_resume_after_a_halfway_stop_runs_only_the_missing_cases(killed_run, demo_dir, tmp_path, capsys):
    """A run that committed 5 of 8 cases (3 record files gone, a temporary file left by a killed write): --resume
    runs exactly the 3 missing cases, leaves the committed records untouched and lists every case once."""
    root = tmp_path / "copy"
    shutil.copytree(killed_run["root"], root, symlinks=True)
    run_dir = root / "r.json.parts"
    (root / "r.json").unlink()
    # the copy's record files name the original paths: point the run at the original cases and heatmap folder
    cases, heat = killed_run["cases"], killed_run["root"] / "heat"
    commits = sorted(p for p in run_dir.glob("*.json") if p.name != "run.json")
    for path in commits[:3]:
        path.unlink()
    (run_dir / ".x.json.123.partial").write_text("half")
    before = {p.name: p.stat().st_mtime_ns for p in commits[3:]}
    args = _args(demo_dir, [demo_dir / "plugin.anymc3d"], [cases], root / "r.json", heat, *RAY_FLAGS, "--resume")
    args[args.index("--progress") + 1] = "json"
    capsys.readouterr()
    assert main(args) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert events[0] == {"event": "start", "cases": 3, "skipped": 5}
    assert len([e for e in events if e["event"] == "case_done"]) == 3
    assert {p.name: p.stat().st_mtime_ns for p in commits[3:]} == before
    assert sorted(p.name for p in run_dir.glob("*.json")) == sorted([p.name for p in commits] + ["run.json"])
    assert not list(run_dir.glob("*.partial"))
    records = validate_records(json.loads((root / "r.json").read_text(encoding="utf-8")))
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in cases.iterdir())
    # a second --resume has nothing left to run (and needs no Ray workers)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"event": "start", "cases": 0, "skipped": 8}


def test_a_run_folder_of_an_earlier_run_needs_resume(demo_dir, tmp_path, caplog):
    run_dir = tmp_path / "r.json.parts"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    args = _args(demo_dir, [demo_dir / "plugin.anymc3d"], [demo_dir / "volume.nii.gz"], tmp_path / "r.json",
                 tmp_path / "h", "--ray")
    assert main(args) == 2
    assert f"{run_dir}: holds an earlier run; pass --resume" in caplog.text
    assert main(args + ["--resume"]) == 2
    assert "--resume with other options than the earlier run (backbone, embedding, ensemble" in caplog.text


def test_without_ray_installed_the_flag_says_how_to_install_it(demo_dir, tmp_path, caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    args = _args(demo_dir, [demo_dir / "plugin.anymc3d"], [demo_dir / "volume.nii.gz"], tmp_path / "r.json",
                 tmp_path / "h", "--ray")
    assert main(args) == 2
    assert "--ray needs Ray Data: pip install 'anymc3d[ray]'" in caplog.text


def test_a_plugin_made_for_another_backbone_is_a_usage_error_before_any_worker_starts(demo_dir, tmp_path, caplog):
    from anymc3d.backbone import save_backbone
    from anymc3d.demo import DEMO_SPEC, demo_backbone

    save_backbone(demo_backbone(seed=5), DEMO_SPEC, tmp_path / "other.safetensors")
    args = _args(demo_dir, [demo_dir / "plugin.anymc3d"], [demo_dir / "volume.nii.gz"], tmp_path / "r.json",
                 tmp_path / "h", "--ray")
    args[args.index("--backbone") + 1] = str(tmp_path / "other.safetensors")
    assert main(args) == 2
    assert "plugin was made for backbone DINOv2-architecture demo, 6 blocks, width 192, random weights (weights" in caplog.text
    assert not (tmp_path / "r.json.parts").exists() and not (tmp_path / "r.json").exists()


pytestmark = pytest.mark.slow  # a Ray cluster: left out of the quick tier
