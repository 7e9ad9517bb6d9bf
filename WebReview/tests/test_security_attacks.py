"""Attacks on the review page and its readers beyond the first six probes (test_security.py): the key leaking to
other local servers, terminal escapes, key holders' RPCs that could crash or disrupt the server, hostile folders.
Each server attack ran successfully against the server before these changes (the issue's reproductions)."""

import asyncio
import http.server
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time

import msgpack
import psutil
import pytest
from anymc3d_review.guard import (
    MAX_ABS_NUMBER,
    MAX_MESSAGE_BYTES,
    MAX_PENDING_BYTES,
    MAX_RENDER_SIDE,
    LogScrubber,
    _CappedUnChunker,
    finite_float,
    interaction_event,
    render_size,
)
from anymc3d_review.testing import (
    ReviewServer,
    WslinkClient,
    free_port,
    http_status,
    open_page,
    run_async,
    view_box,
    wait_frames,
    wait_state,
)

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;cHduZWQ=\x07"

# Quick: the checks themselves ---------------------------------------------------------------------------------


MOUSE = {"type": "LeftButtonPress", "x": 10, "y": 20.5, "w": 300, "h": 200, "ctrlKey": 0, "altKey": 0, "shiftKey": 1,
         "buttonLeft": 1, "action": "down"}


@pytest.mark.parametrize("bad", [{"x": math.nan}, {"x": math.inf}, {"y": -math.inf}, {"x": "1"}, {"x": None},
                                 {"w": 0}, {"h": -3}, {"x": 1e308}, {"type": "Explode"}, {"type": 7}])
def test_interaction_events_with_anything_but_finite_bounded_numbers_are_refused(bad):
    with pytest.raises(ValueError):
        interaction_event({**MOUSE, **bad})
    with pytest.raises(ValueError):
        interaction_event({k: v for k, v in MOUSE.items() if k != "w"})  # VTK would read a missing field


def test_a_valid_event_is_rebuilt_with_what_vtk_reads_and_nothing_else():
    clean = interaction_event({**MOUSE, "extra": "\x1b[2J", "positions": [1] * 10_000})
    assert clean == {"type": "LeftButtonPress", "x": 10.0, "y": 20.5, "w": 300.0, "h": 200.0, "ctrlKey": 0,
                     "altKey": 0, "shiftKey": 1, "metaKey": 0, "controlKey": 0, "buttonLeft": 1, "buttonMiddle": 0,
                     "buttonRight": 0}
    json.dumps(clean, allow_nan=False)  # what VTK parses: strict JSON
    pinch = interaction_event({"type": "Pinch", "w": 10, "h": 10, "factor": 1.5,
                               "positions": {"0": {"x": 1, "y": 2}, "1": {"x": 3, "y": 4}}})
    assert pinch["positions"] == [{"x": 1.0, "y": 2.0}, {"x": 3.0, "y": 4.0}]
    for positions in ([], [{"x": 1, "y": 2}] * 11, [{"x": math.nan, "y": 0}]):
        with pytest.raises(ValueError):
            interaction_event({"type": "Pinch", "w": 10, "h": 10, "factor": 1.5, "positions": positions})


def test_render_sizes_and_numbers_are_bounded():
    assert render_size({"w": 8192, "h": 8192, "p": 4}) == {"w": MAX_RENDER_SIDE, "h": MAX_RENDER_SIDE, "p": 1.0}
    size = render_size({"w": 800, "h": 600, "p": 2})
    assert size == {"w": 800, "h": 600, "p": 2.0}  # a real view is left as it is
    assert max(size["w"], size["h"]) * size["p"] <= MAX_RENDER_SIDE
    for bad in ({"w": math.nan}, {"w": "8192"}, {"p": math.inf}, {"h": -1}, []):
        with pytest.raises(ValueError):
            render_size(bad)
    check = finite_float()
    assert check(1e308) == MAX_ABS_NUMBER and check(-1e308) == -MAX_ABS_NUMBER
    with pytest.raises(ValueError):
        check(math.nan)


def test_chunk_headers_cannot_make_the_server_allocate():
    """wslink's UnChunker allocates what each header declares (4 GB allowed after the hello): 13 bytes declaring
    256 MB cost 256 MB. The capped one refuses before allocating."""
    from wslink.chunking import _encode_header

    unchunker = _CappedUnChunker()
    unchunker.set_max_message_size(4 * 1024 ** 3)  # what wslink does after the hello
    assert unchunker.max_message_size == MAX_MESSAGE_BYTES
    with pytest.raises(ValueError):
        unchunker.process_chunk(_encode_header(1, 0, 256 * 1024 ** 2) + b"x")
    count = 0
    with pytest.raises(ValueError, match="unfinished wslink messages over the limit"):
        for message_id in range(100):
            unchunker.process_chunk(_encode_header(message_id, 0, MAX_MESSAGE_BYTES) + b"x")
            count += 1
    assert count == MAX_PENDING_BYTES // MAX_MESSAGE_BYTES and not unchunker.pending_messages
    whole = msgpack.packb({"id": "rpc:c0:1"})
    assert unchunker.process_chunk(_encode_header(7, 0, len(whole)) + whole) == {"id": "rpc:c0:1"}


def test_log_lines_lose_control_characters_and_the_key():
    import logging

    record = logging.LogRecord("aiohttp.access", logging.INFO, __file__, 1, '"GET /?secret=%s%s HTTP/1.1" %s',
                               ("KEY123", ESCAPES, "\u202e"), None)
    assert LogScrubber("KEY123").filter(record)
    line = record.getMessage()
    assert "KEY123" not in line and "\x1b" not in line and "\x07" not in line and "\u202e" not in line
    assert "\\x1b]0;pwned\\x07" in line and "<key>" in line


# Slow: a real server -------------------------------------------------------------------------------------------


class _CookieCatcher(http.server.BaseHTTPRequestHandler):
    """Another web server on this host (another user's Jupyter, a forwarded port): it records what the browser
    sends it."""
    seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>another server</html>")

    def log_message(self, *_):
        pass


@pytest.mark.slow
def test_another_server_on_this_host_gets_no_key_and_its_cookie_reads_no_case(server, browser):
    catcher = http.server.HTTPServer(("127.0.0.1", free_port()), _CookieCatcher)
    threading.Thread(target=catcher.serve_forever, daemon=True).start()
    page = open_page(browser, server.url)
    try:
        wait_frames(page, 0, timeout=60)
        page.goto(f"http://127.0.0.1:{catcher.server_address[1]}/")  # cookies ignore ports: it gets ours
        cookie = next(h["Cookie"] for h in _CookieCatcher.seen if "anymc3d_review_" in h.get("Cookie", ""))
        assert server.key not in json.dumps(_CookieCatcher.seen)
    finally:
        page.close()
        catcher.shutdown()

    async def replay():
        client = await WslinkClient.connect(server.base, origin=server.base.rstrip("/"), cookie=cookie)
        assert client is not None  # the upgrade passes (own Origin, the cookie) ...
        replies = [await client.hello(secret) for secret in ("wslink-secret", cookie.split("=", 1)[1], "")]
        got = await client.call("trame.state.get")
        await client.close()
        return replies, got

    replies, got = run_async(replay())
    assert all("error" in reply for reply in replies), replies  # ... but no hello, so no case
    assert "result" not in got and "volume.nii.gz" not in json.dumps(got)
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(server.base, headers={"Cookie": cookie}), timeout=10) as reply:
        assert "volume.nii.gz" not in reply.read().decode("utf-8", "replace")  # the static page only


@pytest.mark.slow
def test_a_reload_keeps_working_without_the_key_in_the_address(server, browser):
    """The key lives in the tab's sessionStorage (per origin, port included), so trame's client, which removes it
    from the address, still has it after a reload; a fresh tab without the address gets nothing."""
    refusals = server.output().count("refused:")
    page = open_page(browser, server.url)
    try:
        wait_frames(page, 0, timeout=60)
        assert "secret=" not in page.url  # trame's client took it out of the address bar
        page.reload()
        wait_frames(page, 0, timeout=60)
        wait_state(page, "s('cases') && s('cases').length > 0")
        box = view_box(page, "Red")  # a reader's mouse over a view: its events pass the checks
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 + 20, box["y"] + box["height"] / 2 + 10)
        page.mouse.up()
        page.mouse.wheel(0, 120)
        page.wait_for_timeout(1500)
    finally:
        page.close()
    assert server.output().count("refused:") == refusals, server.output()[-3000:]  # nothing a real page does


@pytest.mark.slow
def test_control_characters_from_anyone_never_reach_the_log(server):
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # no key: a plain <img> could do this
    raw.sendall(b"GET /%1b]0;pwned%07%1b[2J/\x1b[31mraw HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status = raw.recv(100).split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.") and status.split()[1].startswith(b"4"), status
    raw.close()
    assert http_status(server.base + "%1b]52;c;cHduZWQ=%07") == 403

    async def key_holder():
        client = await WslinkClient.connect(server.url)
        assert "result" in await client.hello(server.key)
        await client.call("trame.error.client", [ESCAPES + "client-error-text"])
        await client.call("trame.trigger", [ESCAPES, [], {}])
        await client.call("trame.state.update", [[{"key": ESCAPES, "value": ESCAPES}]])
        await client.call("trame.lifecycle.update", [ESCAPES])
        await client.close()

    run_async(key_holder())
    time.sleep(1.0)
    log = server.output()
    assert "\x1b" not in log and "\x07" not in log
    assert "client-error-text" not in log  # a page's error report is never logged, even escaped
    assert "\\x1b" in log  # the refusals name what came, escaped


def _area_names(client):
    names = set()
    for message in client.messages:
        result = message.get("result") if isinstance(message, dict) else None
        if isinstance(result, dict) and isinstance(result.get("name"), str):
            names.add(result["name"])
    return names


async def _first_close(ws, seconds):
    """The first close-type message on ``ws`` within ``seconds`` (image frames and other pushes before it are
    skipped), or the last message seen when none came."""
    deadline, message = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        message = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if message.type.name in ("CLOSE", "CLOSING", "CLOSED", "ERROR"):
            break
    return message


@pytest.mark.slow
def test_key_holders_cannot_crash_freeze_or_forge(server):
    """The issue's attacks by a key holder: events with NaN, Infinity, strings or zero sizes (each aborted the
    process in VTK's C++), a forged frame for every tab, a frozen view, an 8192² render, chunk headers declaring
    256 MB each, a slider at 1e308. The server keeps answering, nothing forged reaches another tab, memory stays."""
    process = psutil.Process(server.process.pid)
    rss_before = process.memory_info().rss
    forged = b"\x89PNG forged frame"

    async def attack():
        watcher = await WslinkClient.connect(server.url)
        assert "result" in await watcher.hello(server.key)
        client = await WslinkClient.connect(server.url)
        assert "result" in await client.hello(server.key)
        for bad in ({"x": math.nan}, {"x": math.inf}, {"x": "1"}, {"w": 0}, {"type": "MouseWheel"},
                    {"type": "Pinch", "positions": []}):
            for area in ("Red", "ThreeD"):
                await client.call("trame.rca.event", [area, "attacker", {**MOUSE, **bad}], timeout=3)
        await client.call("trame.rca.event", ["Red", "attacker", {**MOUSE, "type": "MouseMove"}], timeout=3)
        await client.call("trame.rca.push", ["Red", {"type": "image/png"}, forged], timeout=3)
        await client.call("trame.rca.drop", ["Red", -1], timeout=3)
        await client.call("trame.rca.size", ["Red", "attacker", {"w": 8192, "h": 8192, "p": 4}], timeout=3)
        await client.call("trame.state.update", [[{"key": "Red__SliderState__value", "value": 1e308}]], timeout=3)
        await client.call("trame.rca.event", ["No such view \x1b[2J", "attacker", MOUSE], timeout=3)
        from wslink.chunking import _encode_header

        bomber = await WslinkClient.connect(server.url)
        assert "result" in await bomber.hello(server.key)
        for message_id in range(10):
            await bomber.ws.send_bytes(_encode_header(1000 + message_id, 0, 256 * 1024 ** 2) + b"x")
        closed = await _first_close(bomber.ws, seconds=10)  # frames the server pushed before cutting it off pass by
        await bomber.session.close()
        await asyncio.sleep(2.0)
        state = (await watcher.call("trame.state.get"))["result"]["state"]
        await client.call("trame.rca.size", ["Red", "page", {"w": 400, "h": 400, "p": 1}], timeout=3)
        await asyncio.sleep(1.0)
        await watcher.call("trame.state.get")
        await client.close()
        await watcher.close()
        return state, watcher.messages, closed

    state, seen, closed = run_async(attack())
    assert server.process.poll() is None and http_status(server.url) == 200
    assert closed.type.name in ("CLOSE", "CLOSING", "CLOSED", "ERROR")  # the chunk bomber was cut off
    assert forged not in msgpack.packb(seen)  # no other tab got the forged frame
    assert abs(state["Red__SliderState__value"]) <= MAX_ABS_NUMBER
    assert process.memory_info().rss - rss_before < 300 * 1024 ** 2
    log = server.output()
    for refused in ("trame.rca.push from a client", "trame.rca.drop from a client", "not a number",
                    "trame.rca.event: not a view of this page"):
        assert refused in log, refused


# Hostile folders ----------------------------------------------------------------------------------------------


def _plugin_with(path, json_bytes, weights=None, inflated_size=0):
    """A plugin zip: ``weights`` stored, or ``inflated_size`` zero bytes deflated (streamed: never in memory)."""
    from anymc3d.testing import write_plugin_zip

    return write_plugin_zip(path, json_bytes, weights, inflated_size=inflated_size)


def _huge_heatmap(path):
    """A gzipped NIfTI heatmap of about 1 KB whose header declares 1024x1024x520 = 545 M float voxels."""
    import gzip

    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 520))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    header["qform_code"] = header["sform_code"] = 1
    path.write_bytes(gzip.compress(header.binaryblock + bytes(4) + bytes(1024 * 1024)))


@pytest.mark.slow
def test_a_hostile_folder_starts_and_says_why_in_one_line(review_folder, tmp_path):
    """Records naming a plugin of deeply nested JSON (the review exited at start with a RecursionError, its run
    folder left behind) and a 1 MB plugin deflating to 1 GiB (inflated on the event loop), and a heatmap declaring
    545 M voxels: the page opens, each says why in one line, memory stays small, no run folder is left."""
    from anymc3d.plugin_file import read_members

    folder, temp = tmp_path / "hostile", tmp_path / "tmp"
    folder.mkdir()
    temp.mkdir()
    for name in ("volume.nii.gz", "second.nii.gz"):
        shutil.copy(review_folder / name, folder / name)
    shutil.copytree(review_folder / "results", folder / "results")
    raw, weights = read_members(review_folder / "plugin.anymc3d")
    _plugin_with(folder / "nested.anymc3d", b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", weights)
    _plugin_with(folder / "bomb.anymc3d", raw, inflated_size=1024 ** 3)
    assert (folder / "bomb.anymc3d").stat().st_size < 2 * 1024 ** 2
    text = (folder / "results" / "predictions.json").read_text(encoding="utf-8").replace(str(review_folder), str(folder))
    records = json.loads(text)
    for record, plugin in zip(records, ("nested.anymc3d", "bomb.anymc3d")):
        for result in record["results"]:
            result["plugin_path"] = str(folder / plugin)
    second = next(r for r in records if r["image"].endswith("second.nii.gz"))
    for path in second["results"][0]["finding_heatmaps"].values():
        _huge_heatmap(folder / "results" / "heatmaps" / path.rsplit("/", 1)[1])
    (folder / "results" / "predictions.json").write_text(json.dumps(records))
    with ReviewServer(folder, env={"TMPDIR": str(temp)}) as srv:
        process = psutil.Process(srv.process.pid)

        async def look():
            client = await WslinkClient.connect(srv.url)
            assert "result" in await client.hello(srv.key)
            states = []
            for index in (0, 1):
                await client.call("trame.state.update", [[{"key": "case_index", "value": index}]])
                for _ in range(100):
                    await asyncio.sleep(0.2)
                    state = (await client.call("trame.state.get"))["result"]["state"]
                    if state["shown_case"] == index or state["case_error"] or state["heatmap_error"]:
                        break
                await asyncio.sleep(1.0)
                states.append((await client.call("trame.state.get"))["result"]["state"])
            await client.close()
            return states

        states = run_async(look())
        peak = process.memory_info().rss
        problems = {m["path"].rsplit("/", 1)[1]: m["problem"] for s in states for m in s["model_info"]}
        assert "nested deeper than 64 levels" in problems["nested.anymc3d"] and "\n" not in problems["nested.anymc3d"]
        assert "is compressed" in problems["bomb.anymc3d"]
        index = next(c["index"] for c in states[0]["cases"] if c["name"] == "second.nii.gz")
        shown = states[index]["case_error"] + states[index]["heatmap_error"]
        assert "second" in shown and "is too large" in shown and "545259520 voxels" in shown, shown
        assert "\n" not in shown
        assert peak < 3 * 1024 ** 3, peak  # neither 1 GiB inflated nor 545 M voxels read
    assert not list(temp.glob("AnyMC3D-*")), list(temp.iterdir())


@pytest.mark.slow
def test_every_printed_address_is_bound_and_no_key_in_a_debug_log(review_folder):
    completed = subprocess.run([sys.executable, "-m", "anymc3d", "review", str(review_folder), "--host", ""],
                               capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert completed.returncode == 2 and "--host needs an address" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
    with ReviewServer(review_folder, log_level="DEBUG") as srv:
        assert http_status(srv.url) == 200 and http_status(srv.base + "index.html?secret=" + srv.key) == 200
        log = srv.output()
        assert log.count(srv.key) == len(srv.printed_urls()) == 1  # in the printed address only
        assert "GET" in log  # the DEBUG access log is there, without the key


def test_heatmap_headers_are_checked_against_the_voxel_limit_before_reading(tmp_path):
    """Both ways the review reads a heatmap (its read threads and the Logic's import) refuse a 1 KB file that
    declares 545 M voxels from its header, in one line naming the file."""
    from AnyMC3DSlicerLogic import outputs

    path = tmp_path / "h.nii.gz"
    _huge_heatmap(path)
    assert path.stat().st_size < 4096
    for read in (outputs.readVolumeFile, lambda p: outputs._checkedHeatmapNode(p, None, "h")):
        with pytest.raises(ValueError, match=r"h\.nii\.gz is too large: \(1024, 1024, 520\) = 545259520 voxels"):
            read(path)
