"""Helpers shared by the browser tests and the benchmark: start / stop a review server, drive Chromium.

Playwright drives Debian's ``/usr/bin/chromium`` (never ``playwright install``). A frame is counted when a view's
``<img>`` fires ``load`` (trame-rca swaps in a new blob image per frame); views are told apart by the
``data-view`` label the page puts in each view (Red = axial, Green = coronal, Yellow = sagittal, ThreeD).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

CHROMIUM = os.environ.get("ANYMC3D_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWS = ("Red", "Green", "Yellow", "ThreeD")
SLICE_VIEWS = ("Red", "Green", "Yellow")

FRAME_SCRIPT = """
window.__frames = [];
document.addEventListener('load', (e) => {
  const img = e.target;
  if (!img || !img.classList || !img.classList.contains('image-display-area')) return;
  let el = img, view = null;
  while (el && !view) { const label = el.querySelector && el.querySelector('.view-label[data-view]');
                        if (label) view = label.getAttribute('data-view'); el = el.parentElement; }
  window.__frames.push({t: performance.now(), view: view});
}, true);
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


URL_LINE = re.compile(r"open: (http://\S+)")


class ReviewServer:
    """``python -m anymc3d review FOLDER ...`` in its own process group; ``stop()`` kills the whole group.

    ``url`` is the address the server printed (with its access key), read from its output; ``base`` the same
    without the key; ``output()`` everything it printed.
    """

    def __init__(self, folder, *extra, host="127.0.0.1", port=None, env=None, log=None, log_level="WARNING",
                 command=None):
        """``command``: a whole command line to start instead (e.g. the one the demo prints); ``--port`` and
        ``--host`` are added to it."""
        self.port = port or free_port()
        self.host = host
        self.base = f"http://{host}:{self.port}/"
        self.url = None
        level = ["--log-level", log_level] if log_level else []  # None: the command's default
        command = [*command, "--port", str(self.port), "--host", host] if command else \
            [sys.executable, "-m", "anymc3d", *level, "review", str(folder),
             "--port", str(self.port), "--host", host, *[str(e) for e in extra]]
        self.log_path = log or tempfile.mkstemp(prefix="anymc3d-review-", suffix=".log")[1]
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                        start_new_session=True)
        self.started = time.perf_counter()

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def printed_urls(self) -> list[str]:
        return URL_LINE.findall(self.output())

    def wait_ready(self, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the review server exited with code {self.process.returncode}: "
                                   f"{self.output()[-2000:]}")
            urls = self.printed_urls()
            if urls:
                self.url = urls[0]
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(self.url, timeout=2) as response:
                        if response.status == 200:
                            return self
            time.sleep(0.2)
        raise TimeoutError(f"the review server did not print its address within {timeout} s: {self.output()[-2000:]}")

    @property
    def key(self) -> str:
        return self.url.split("secret=", 1)[1]

    def stop(self):
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # anything left in the group (a backend run)
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def __enter__(self):
        """Wait until the server answers; stopped on exit whatever happens."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


def http_status(url, headers=None) -> int:
    """The HTTP status of a GET (no redirect followed past the first answer's status for 4xx)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def run_async(coroutine):
    """Run ``coroutine`` to its end in a thread of its own (Playwright's sync API holds this thread's loop)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class WslinkClient:
    """A minimal wslink client (the protocol trame's page speaks) for attacking a server the way a foreign page
    or a script would: msgpack messages in wslink's chunk framing (wslink 2.6.0 ``wslink/chunking.py``).

    ``connect`` returns None when the websocket upgrade is refused (HTTP 403).
    """

    def __init__(self, ws, session):
        self.ws, self.session, self._next = ws, session, 0
        self.messages = []  # every decoded message received (results, errors, publications)

    @classmethod
    async def connect(cls, base_url, origin=None, cookie=None, query=""):
        import aiohttp

        session = aiohttp.ClientSession()
        headers = {"Origin": origin} if origin else {}
        if cookie:
            headers["Cookie"] = cookie
        parts = urllib.parse.urlsplit(base_url)  # the page's address; its ?secret= (if any) goes to the upgrade
        url = f"ws://{parts.netloc}/ws" + (f"?{parts.query}" if parts.query else query)
        try:
            ws = await session.ws_connect(url, headers=headers, autoping=True)
        except aiohttp.WSServerHandshakeError:
            await session.close()
            return None
        return cls(ws, session)

    async def call(self, method, args=(), kwargs=None, system=False, timeout=10.0):
        import msgpack
        from wslink.chunking import UnChunker, generate_chunks

        self._next += 1
        rpc_id = f"{'system' if system else 'rpc'}:c0:{self._next}"
        message = {"wslink": "1.0", "id": rpc_id, "method": method, "args": list(args), "kwargs": kwargs or {}}
        for chunk in generate_chunks(msgpack.packb(message), 4 * 1024 * 1024):
            await self.ws.send_bytes(chunk)
        unchunker = getattr(self, "_unchunker", None) or UnChunker()
        unchunker.set_max_message_size(1 << 30)
        self._unchunker = unchunker
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                received = await self.ws.receive(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            if received.type.name != "BINARY":
                return {"closed": True}
            full = unchunker.process_chunk(received.data)
            if full is None:
                continue
            decoded = msgpack.unpackb(full) if isinstance(full, (bytes, bytearray)) else full
            self.messages.append(decoded)
            if decoded.get("id") == rpc_id:
                return decoded
        return {"timeout": True}

    async def hello(self, secret):
        return await self.call("wslink.hello", [{"secret": secret}], system=True)

    async def close(self):
        await self.ws.close()
        await self.session.close()


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_page(browser, url, width=1400, height=900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.add_init_script(FRAME_SCRIPT)
    page.goto(url)
    return page


def now(page) -> float:
    return page.evaluate("() => performance.now()")


def state(page, key):
    return page.evaluate("(k) => window.trame && window.trame.state ? window.trame.state.get(k) : undefined", key)


def wait_state(page, expression, timeout=30.0):
    """Wait until ``expression`` (JS, with ``s`` = trame state getter) is true; returns performance.now()."""
    page.wait_for_function(f"() => {{ const s = (k) => window.trame && window.trame.state && window.trame.state.get(k);"
                           f" return ({expression}) ? performance.now() : false; }}", timeout=timeout * 1000)
    return now(page)


def wait_frames(page, since=0.0, views=VIEWS, timeout=30.0) -> float:
    """Wait until every view in ``views`` showed a frame after ``since`` (ms); returns the last such frame's time."""
    handle = page.wait_for_function(
        """([since, views]) => { const last = {};
             for (const f of window.__frames || []) if (f.t > since && f.view) last[f.view] = Math.min(last[f.view] || Infinity, f.t);
             return views.every(v => v in last) ? Math.max(...views.map(v => last[v])) : false; }""",
        arg=[since, list(views)], timeout=timeout * 1000)
    return handle.json_value()


def settle(page, views=VIEWS, quiet=0.6, timeout=20.0):
    """Wait until no view has received a frame for ``quiet`` s (the still-quality frame is in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = page.evaluate("(views) => Math.max(0, ...(window.__frames || []).filter(f => views.includes(f.view)).map(f => f.t))",
                             list(views))
        if now(page) - last > quiet * 1000:
            return
        time.sleep(0.1)


def change_scene(page, action):
    """Run ``action`` (a click, a key) and wait until the scene it changes is published and drawn."""
    version = state(page, "scene_version")
    action()
    wait_state(page, f"s('scene_version') > {version}")
    settle(page)


def show_case(page, name):
    """Click case ``name`` in the list (unless it is shown) and wait for its scene and heatmap; then move the mouse
    off the views (keys act on the page) and let the frames settle. Returns the case's index."""
    index = next(c["index"] for c in state(page, "cases") if c["name"] == name)
    if state(page, "shown_case") != index:
        version = state(page, "scene_version")
        page.locator(".case-item", has_text=name).click()
        wait_state(page, f"s('shown_case') === {index} && s('scene_version') > {version} && !s('heatmap_loading')")
    page.mouse.move(5, page.viewport_size["height"] - 5)
    settle(page)
    return index


def view_box(page, view):
    """Bounding box of the image of view ``view`` (Red, Green, Yellow, ThreeD)."""
    return page.evaluate(
        """(view) => { const label = document.querySelector(`.view-label[data-view="${view}"]`);
             let el = label; while (el && !el.querySelector('img.image-display-area')) el = el.parentElement;
             const r = el.querySelector('img.image-display-area').getBoundingClientRect();
             return {x: r.x, y: r.y, width: r.width, height: r.height}; }""", view)


def view_pixels(page, view):
    """RGB numpy array of a screenshot of view ``view``."""
    import io

    import numpy as np
    from PIL import Image

    box = view_box(page, view)
    png = page.screenshot(clip={k: float(v) for k, v in box.items()})
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def heatmap_fraction(pixels, saturation=30):
    """Share of pixels with a heatmap colour: coloured (max - min channel above ``saturation``), where CT grey has
    none. 30: inferno's purples blended at half opacity over grey spread about 40 (the rainbow's pure hues spread
    over 120; on the grey of the control case, JPEG chroma noise stays below 30: test_browser checks it)."""
    import numpy as np

    pixels = pixels.astype(np.int16)
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    return float((spread > saturation).mean())
