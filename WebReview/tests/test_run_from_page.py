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
    results = json.loads((run_folder / "results" / "a_small.json").read_text())
    assert results[0]["status"] == "ok" and results[0]["image"] == str(run_folder / "a_small.nii.gz")
    heatmap = results[0]["results"][0]["heatmap"]
    assert heatmap.startswith(str(run_folder / "results" / "heatmaps")) and (run_folder / "results" / "heatmaps").is_dir()
    texts = [t.strip() for t in page.locator("td.finding-probability").all_inner_texts()]
    probabilities = results[0]["results"][0]["probabilities"]
    assert texts == [f"{probabilities[label]:.4f}" for label in results[0]["results"][0]["labels"]]
    assert state(page, "cases")[0]["status"] == "results"
    assert heatmap_fraction(view_pixels(page, "Red")) > 0.02


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
    assert json.loads(json_path.read_text())[0]["status"] == "ok"


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
