"""A case without results is run from the page (the Logic + the real backend process), with progress; a failing
case shows its error and the list goes on."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time

import psutil
import pytest
from anymc3d_review.testing import (
    VIEWS,
    ReviewServer,
    WslinkClient,
    heatmap_fraction,
    http_status,
    open_page,
    run_async,
    settle,
    state,
    view_pixels,
    wait_frames,
    wait_state,
)

from .conftest import write_volume


@pytest.fixture(scope="module")
def run_folder(demo_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    for name in ("backbone.safetensors", "plugin.anymc3d"):
        shutil.copy(demo_source / name, folder / name)
    write_volume(folder / "a_small.nii.gz", (48, 48, 12), seed=3)
    (folder / "b_broken.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    return folder


@pytest.fixture(scope="module")
def run_server(run_folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "run-server.log"
    with ReviewServer(run_folder, "--backbone", run_folder / "backbone.safetensors", "--plugin",
                      run_folder / "plugin.anymc3d", "--device", "cpu", log=log) as srv:
        yield srv


@pytest.fixture
def run_page(browser, run_server):
    page = open_page(browser, run_server.url)
    wait_frames(page, 0, timeout=60)
    yield page
    page.close()


def test_run_case_from_page_writes_results_and_shows_them(run_page, run_folder):
    page = run_page
    assert state(page, "shown_case") == 0 and state(page, "cases")[0]["status"] == "none"
    assert heatmap_fraction(view_pixels(page, "Red")) < 0.002
    page.locator(".run-button").click()
    wait_state(page, "s('running') === true", timeout=20)
    assert page.locator(".run-progress").count() == 1
    progress_seen = set()
    while state(page, "running"):
        progress_seen.add(state(page, "run_progress"))
        page.wait_for_timeout(200)
    assert state(page, "run_message") == "Done", state(page, "run_message")
    assert len(progress_seen) >= 2, progress_seen  # the bar moved
    wait_state(page, "s('shown_case') === 0 && s('rows').length > 0")
    settle(page, VIEWS, quiet=1.0)
    # results written in the folder's convention, and shown
    results = json.loads((run_folder / "results" / "a_small.json").read_text(encoding="utf-8"))
    assert results[0]["status"] == "ok" and results[0]["image"] == str(run_folder / "a_small.nii.gz")
    heatmap = results[0]["results"][0]["heatmap"]
    assert heatmap.startswith(str(run_folder / "results" / "heatmaps")) and (run_folder / "results" / "heatmaps").is_dir()
    texts = [t.strip() for t in page.locator("td.finding-probability").all_inner_texts()]
    probabilities = results[0]["results"][0]["probabilities"]
    assert texts == [f"{probabilities[label]:.2f}" for label in results[0]["results"][0]["labels"]]  # as a reader reads it
    assert state(page, "cases")[0]["status"] == "results"
    assert heatmap_fraction(view_pixels(page, "Red")) > 0.01  # additive overlay: from black at the threshold


def test_failing_case_shows_error_and_list_goes_on(run_page):
    page = run_page
    cases = state(page, "cases")
    broken = next(c["index"] for c in cases if c["name"] == "b_broken.nii.gz")
    page.locator(".case-item", has_text="b_broken.nii.gz").click()
    wait_state(page, f"s('case_index') === {broken} && !s('loading') && s('case_error') !== ''")
    assert page.locator(".case-error").is_visible()
    # the other case still opens
    page.locator(".case-item", has_text="a_small.nii.gz").click()
    wait_state(page, "s('shown_case') === 0 && s('case_error') === ''")


def test_forced_rerun_is_refused_and_results_are_kept(run_page, run_server, run_folder):
    """The run trigger sent directly (the page hides the button) on a case with results: nothing is overwritten."""
    page = run_page
    wait_state(page, "s('shown_case') === 0 && s('rows').length > 0")
    json_path = run_folder / "results" / "a_small.json"
    files = sorted((run_folder / "results").rglob("*"))
    before = {path: (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else None) for path in files}

    async def force():
        client = await WslinkClient.connect(run_server.url)
        assert "result" in await client.hello(run_server.key)
        await client.call("trame.trigger", ["review_run", [], {}])
        await asyncio.sleep(3)
        got = (await client.call("trame.state.get"))["result"]["state"]
        await client.close()
        return got

    got = run_async(force())
    assert got["running"] is False
    assert "already has results" in got["run_message"]
    assert sorted((run_folder / "results").rglob("*")) == files
    assert {path: (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else None) for path in files} == before
    assert json.loads(json_path.read_text(encoding="utf-8"))[0]["status"] == "ok"


def test_rescan_lists_a_file_added_while_the_server_runs(run_page, run_folder):
    page = run_page
    before = [case["name"] for case in state(page, "cases")]
    shown = before[state(page, "shown_case")]
    write_volume(run_folder / "c_added.nii.gz", (32, 32, 8), seed=11)
    page.locator(".rescan-button").click()
    wait_state(page, f"s('cases').length === {len(before) + 1}")
    after = [case["name"] for case in state(page, "cases")]
    assert "c_added.nii.gz" in after and set(before) < set(after)
    assert after[state(page, "shown_case")] == shown  # the shown case stays shown
    assert next(c for c in state(page, "cases") if c["name"] == "c_added.nii.gz")["status"] == "none"


def _backend_of(server, timeout=40.0):
    """The backend process a run started (a descendant of the server), once it exists: ``anymc3d standby``, which
    the Logic hands the ``predict`` command line on stdin (docs/cli-contract.md)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(server.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "standby" in child.cmdline():
                    return child
        time.sleep(0.1)
    raise AssertionError("no backend process appeared")


def _gone(process, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_backend_and_run_folders_end_with_the_server(demo_source, tmp_path):
    """A server killed mid-run (SIGKILL: the backend dies with it; its folder is swept by the next server) or
    stopped (SIGTERM, Ctrl-C: backend killed, run folders removed at once) leaves nothing running or behind."""
    folder, temp = tmp_path / "cases", tmp_path / "tmp"
    folder.mkdir()
    temp.mkdir()
    for name in ("backbone.safetensors", "plugin.anymc3d"):
        shutil.copy(demo_source / name, folder / name)
    write_volume(folder / "big.nii.gz", (96, 96, 40), seed=5)
    killed_roots = []
    for sig in (signal.SIGKILL, signal.SIGTERM):
        with ReviewServer(folder, "--backbone", folder / "backbone.safetensors", "--plugin", folder / "plugin.anymc3d",
                          "--device", "cpu", env={"TMPDIR": str(temp)}) as srv:
            for root in killed_roots:  # the previous (killed) server's run folders were swept at this start
                assert not root.exists(), root

            async def start():
                client = await WslinkClient.connect(srv.url)
                assert "result" in await client.hello(srv.key)
                await client.call("trame.trigger", ["review_run", [], {}])
                await client.close()

            run_async(start())
            backend = _backend_of(srv)
            roots = list(temp.glob("AnyMC3D-review-*"))
            assert len(roots) == 1 and list(roots[0].glob("AnyMC3D-*")), "no run folder"
            os.kill(srv.process.pid, sig)  # the server only, not its process group
            srv.process.wait(30)
            assert _gone(backend), f"the backend outlived the server ({sig.name})"
            if sig == signal.SIGTERM:
                assert not list(temp.glob("AnyMC3D-*")), list(temp.iterdir())
            else:
                killed_roots = roots
    assert not list(folder.glob("results/*.json"))  # no half-written results either


def test_wildcard_host_prints_a_reachable_address_with_its_key(run_folder):
    with ReviewServer(run_folder, host="0.0.0.0") as srv:  # ready = the first printed address answered 200
        urls = srv.printed_urls()
        assert urls and not any("0.0.0.0" in url for url in urls)
        assert all("?secret=" in url for url in urls)
        assert http_status(urls[0].split("?")[0]) == 403
        assert "anyone who has this address can read every case" in srv.output()


@pytest.fixture(scope="module")
def lifted_plugin(demo_source, tmp_path_factory):
    """A lifted-feature plugin (the kind that gives ``contribution`` maps) fitted on the demo backbone with
    ``anymc3d fit-lifted`` on 12 small synthetic cases."""
    import csv
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("lifted")
    rows = []
    for i in range(12):
        write_volume(folder / f"c{i}.nii.gz", (40, 40, 10), seed=100 + i, lesion=bool(i % 2))
        rows.append([f"c{i}.nii.gz", i % 2, "train" if i < 8 else "val"])
    with open(folder / "m.csv", "w", newline="") as file:
        csv.writer(file).writerows([["image", "lesion", "split"], *rows])
    subprocess.run([sys.executable, "-m", "anymc3d", "fit-lifted", str(folder / "m.csv"), "--backbone",
                    str(demo_source / "backbone.safetensors"), "--out", str(folder / "lifted.anymc3d"),
                    "--log-level", "WARNING"], check=True, capture_output=True, timeout=600)
    return folder / "lifted.anymc3d"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["attention", "rollout", "grad_rollout", "grad_last", "contribution"])
def test_run_from_the_page_with_every_heatmap_method(method, request, demo_source, browser, tmp_path):
    """Every heatmap method runs from the page and puts each heatmap file in place once: gradient and
    contribution maps, where a result's map is also its first finding's, no longer collide with themselves."""
    from anymc3d.contract import FINDING_METHODS, HEATMAP_METHODS

    assert method in HEATMAP_METHODS
    folder = tmp_path / "cases"
    folder.mkdir()
    plugin = request.getfixturevalue("lifted_plugin") if method == "contribution" else demo_source / "plugin.anymc3d"
    shutil.copy(demo_source / "backbone.safetensors", folder / "backbone.safetensors")
    shutil.copy(plugin, folder / "plugin.anymc3d")
    write_volume(folder / "a_small.nii.gz", (48, 48, 12), seed=3)
    with ReviewServer(folder, "--backbone", folder / "backbone.safetensors", "--plugin", folder / "plugin.anymc3d",
                      "--device", "cpu", "--heatmap-method", method) as srv:
        page = open_page(browser, srv.url)
        try:
            wait_frames(page, 0, timeout=60)
            page.locator(".run-button").click()
            wait_state(page, "s('running') === true", timeout=30)
            wait_state(page, "s('running') === false", timeout=400)
            assert state(page, "run_message") == "Done", state(page, "run_message")
            wait_state(page, "s('shown_case') === 0 && s('rows').length > 0")
            record = json.loads((folder / "results" / "a_small.json").read_text(encoding="utf-8"))[0]
            result = record["results"][0]
            assert record["status"] == "ok" and result["heatmap_method"] == method
            named = {result["heatmap"], *(result.get("finding_heatmaps") or {}).values()} - {None}
            if method in FINDING_METHODS:
                assert set(result["finding_heatmaps"]) == set(result["labels"])
            heatmaps = folder / "results" / "heatmaps"
            assert {str(p) for p in heatmaps.iterdir()} == named  # each file once: no orphan, no partial
            assert not [p for p in (folder / "results").rglob("*") if p.name.startswith(".")]
            labels = [t.strip() for t in page.locator("td.finding-label").all_inner_texts()]
            assert labels == result["labels"]
        finally:
            page.close()


CORRUPTING_BACKEND = '''
import json, os, sys
from anymc3d.cli import main
args = sys.argv[1:]
if args == ["standby"]:
    args = json.loads(sys.stdin.readline())
code = main(args)
if code == 0:  # the backend succeeded; its heatmaps are then made unreadable: the Logic's import must fail
    folder = args[args.index("--heatmap") + 1]
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "wb") as file:
            file.write(b"not an image")
sys.exit(code)
'''


@pytest.mark.slow
def test_a_failed_import_leaves_no_file_behind_and_the_case_can_run_again(demo_source, tmp_path):
    """The real Logic and backend; a wrapper spoils the backend's heatmaps after it succeeded, so the outputs are
    copied into results/ and then the Logic's import fails: every file the run put in place is removed, the
    case says why, and it can be run again (no orphan makes a retry fail)."""
    import sys

    from anymc3d_review.cases import CaseFolder
    from anymc3d_review.session import ReviewSession
    from trame_slicer.core import SlicerApp

    folder = tmp_path / "cases"
    folder.mkdir()
    write_volume(folder / "a_small.nii.gz", (48, 48, 12), seed=3)
    wrapper = tmp_path / "corrupting_backend.py"
    wrapper.write_text(CORRUPTING_BACKEND)
    (tmp_path / "runs").mkdir()
    app = SlicerApp()
    listing = CaseFolder(folder)
    session = ReviewSession(app.scene, app.volumes_logic, app.app_logic.GetModuleLogic("VolumeRendering"), listing,
                            backbone=demo_source / "backbone.safetensors", plugins=[demo_source / "plugin.anymc3d"],
                            backend_command=[sys.executable, str(wrapper)], heatmap_method="grad_rollout",
                            device="cpu", temp_root=str(tmp_path / "runs"))
    finished = []
    progress = []
    try:
        session.start_run(0, on_progress=progress.append, on_finished=finished.append)
        deadline = time.monotonic() + 400
        while session.poll() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert finished and finished[0].status == "failed", finished
        assert "Cannot import the results" in finished[0].message
        assert "importing" in [p.stage for p in progress]  # the outputs were put in place before the import
        assert sorted(str(p.relative_to(folder)) for p in (folder / "results").rglob("*")) == ["results/heatmaps"]
        assert "Cannot import the results" in session.case_error(0)
        job = session.start_run(0)  # not refused: nothing left claims the case has results
        assert job is not None
        session.cancel_run()
    finally:
        session.close()


pytestmark = pytest.mark.slow  # a real server, browser and backend runs: left out of the quick tier
