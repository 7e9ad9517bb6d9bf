"""Helpers shared by the browser tests and the benchmark: start / stop a review server, drive Chromium.

Playwright drives Debian's ``/usr/bin/chromium`` (never ``playwright install``). A frame is counted when a view's
``<img>`` fires ``load`` (trame-rca swaps in a new blob image per frame); views are told apart by the
``data-view`` label the page puts in each view (Red = axial, Green = coronal, Yellow = sagittal, ThreeD).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
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


class ReviewServer:
    """``python -m anymc3d review FOLDER ...`` in its own process group; ``stop()`` kills the whole group."""

    def __init__(self, folder, *extra, host="127.0.0.1", port=None, env=None, log=None):
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}/"
        command = [sys.executable, "-m", "anymc3d", "--log-level", "WARNING", "review", str(folder),
                   "--port", str(self.port), "--host", host, *[str(e) for e in extra]]
        self.log = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, start_new_session=True)
        self.started = time.perf_counter()

    def wait_ready(self, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the review server exited with code {self.process.returncode}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return self
            time.sleep(0.2)
        raise TimeoutError(f"the review server did not answer on {self.url} within {timeout} s")

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


def heatmap_fraction(pixels, saturation=60):
    """Share of pixels with a heatmap colour: strongly coloured (max - min channel), where CT grey has none."""
    import numpy as np

    pixels = pixels.astype(np.int16)
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    return float((spread > saturation).mean())
