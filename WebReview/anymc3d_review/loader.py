"""The review's reads: a case's files are read in threads (SimpleITK releases the GIL, the page is served
meanwhile) and only the MRML nodes are made on the event loop.

- a file is read once however many ask (the shown case, a neighbour's prefetch, a deferred heatmap);
- a cold case is shown with its image and, if it is in soon after, its first finding's heatmap; the other heatmaps
  are read after the frame, one at a time (``complete_pending``);
- a switch to another case drops the reads queued for the others (a read already running finishes);
- while the page is idle, the neighbours of the shown case are loaded (a keyboard step is then a warm switch).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time

from trame_server.utils.asynchronous import create_task

from .cases import RecordError
from .session import READ_WORKERS, logic_outputs

PREFETCH_IDLE_S = 1.2  # idle time of the page before neighbours are loaded
#: a cold case waits this long after its image for its first heatmap before it is shown without it (one frame
#: instead of two for a small heatmap; a 512x512x300 float heatmap takes more than a second to read)
HEATMAP_WAIT_S = 0.1
HEATMAP_WAIT_ENV = "ANYMC3D_REVIEW_HEATMAP_WAIT_S"  # sets it (tests: 0 shows every cold case's image first)


class CaseLoader:
    """Async reads of a review session's cases.

    Args:
        session: the ReviewSession (its ``read_file``, ``case_files``, ``complete_heatmap``, ``prefetch``).
        state: the trame state (``case_index``, ``loading``, ``running``, ``row``, ``loaded_cases``).
        views: a callable giving the views (their rendering is blocked while a neighbour's nodes are made).
        on_shown_heatmap: called (inside a state update) when the shown finding's pending heatmap is in.
        prefetch: load the neighbours while the page is idle.
    """

    def __init__(self, session, state, views, on_shown_heatmap, prefetch=True):
        self.session, self.state, self.views, self.on_shown_heatmap = session, state, views, on_shown_heatmap
        self.prefetch = prefetch
        self.server_ready = False
        self.last_activity = time.monotonic()
        self.prefetch_task = None
        self._reads = {}  # file path -> its pending read (a future): a file is read once however many ask
        self._read_pool = concurrent.futures.ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="review-read")
        self.complete_tasks = {}  # case index -> the task reading its pending heatmaps

    def close(self):
        self._read_pool.shutdown(wait=False, cancel_futures=True)

    def touch(self):
        """The page did something: background work (prefetch) waits until it has been idle for a while."""
        self.last_activity = time.monotonic()

    def complete_later(self, index):
        """Read case ``index``'s pending heatmaps in the background (once per case)."""
        loaded = self.session.loaded.get(index)
        if loaded is not None and loaded.pending_files() and index not in self.complete_tasks:
            self.complete_tasks[index] = create_task(self.complete_pending(index))

    def schedule_prefetch(self):
        """When the page is idle, load the next and previous cases (a keyboard step is then a warm switch)."""
        if not self.prefetch or not self.server_ready:
            return
        if self.prefetch_task is not None and not self.prefetch_task.done():
            self.prefetch_task.cancel()
        self.prefetch_task = create_task(self._prefetch_neighbours(self.state.case_index))

    async def _prefetch_neighbours(self, index):
        while time.monotonic() - self.last_activity < PREFETCH_IDLE_S:  # after the shown case's frames are out
            await asyncio.sleep(0.2)
        for neighbour in self.session.neighbours():
            if self.state.case_index != index or self.state.loading or self.state.running:
                return
            if neighbour in self.session.loaded or neighbour in self.session.prefetch_failed:
                continue
            # the files are read in threads (the page is served meanwhile); only the nodes are made here
            preread = await self._read_case(neighbour)
            if self.state.case_index != index or self.state.loading or self.state.running:
                return
            # no frame of the neighbour while it is imported (the Logic's import shows it; prefetch puts the shown
            # case back); trame-slicer's public render_blocked() schedules one render of the shown case after
            with contextlib.ExitStack() as blocked:
                for view in self.views():
                    blocked.enter_context(view.render_blocked())
                loaded = self.session.prefetch(neighbour, preread)
            if loaded:
                with self.state:
                    self.state.loaded_cases = sorted(self.session.loaded)
                await asyncio.sleep(0.2)

    def drop_reads_except(self, index):
        """Another case was asked for: reads queued for other cases (prefetch, deferred heatmaps) that have not
        started are dropped, so that this case's files are read next (a read already running finishes)."""
        try:
            keep = set(self.session.case_files(index))
        except (RecordError, ValueError, OSError, IndexError):
            keep = set()
        for other, task in list(self.complete_tasks.items()):
            if other != index:
                task.cancel()
        for path, future in list(self._reads.items()):
            if path not in keep:
                future.cancel()

    def read_file(self, path, image=False):
        """The pending read of one file (session.read_file in the read threads); a file already being read (a
        neighbour's prefetch, a deferred heatmap) is not read twice."""
        future = self._reads.get(path)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(self._read_pool, self.session.read_file, path, image)
            self._reads[path] = future
            future.add_done_callback(lambda done: self._reads.pop(path, None) if self._reads.get(path) is done else None)
        return future

    def _start_reads(self, index, first=False):
        """``(files, reads)``: the reads (shielded futures) of case ``index``'s files (``first``: the image and the
        heatmap shown first only), started in the read threads; the image is read with its window."""
        try:
            files = self.session.case_files(index, first)
        except (RecordError, ValueError, OSError, IndexError):
            return [], []
        return files, [asyncio.shield(self.read_file(path, image=n == 0)) for n, path in enumerate(files)]

    @staticmethod
    def _read_results(files, reads):
        """``{path: VolumeData}`` of the reads that are done and gave a volume."""
        return {path: read.result() for path, read in zip(files, reads)
                if read.done() and not read.cancelled() and read.result() is not None}

    async def _read_case(self, index):
        """``{path: VolumeData}`` of every file of case ``index``, read in the read threads (the page is served
        meanwhile)."""
        files, reads = self._start_reads(index)
        await asyncio.gather(*reads)
        return self._read_results(files, reads)


    async def read_first(self, index):
        """What a cold case is first shown with: its image, and its first finding's heatmap if that is read within
        HEATMAP_WAIT_S after the image (both read at once in the read threads: measured on two shared cores, this
        shows the heatmap 0.5 s sooner than reading the image alone first, and the image as soon). A heatmap not in
        by then is shown when it is (the page says it is loading): the reader sees the case without waiting for it."""
        files, reads = self._start_reads(index, first=True)
        if not reads:
            return {}
        await asyncio.wait(reads[:1])
        if reads[0].cancelled():
            raise asyncio.CancelledError
        if len(reads) > 1:
            await asyncio.wait(reads[1:], timeout=float(os.environ.get(HEATMAP_WAIT_ENV, HEATMAP_WAIT_S)))
        return self._read_results(files, reads)

    async def complete_pending(self, index):
        """Read the heatmaps a deferred load left pending (one at a time in the read threads; the shown finding's
        first, then in row order) and give them to their nodes; the page is told when the shown finding's arrives."""
        loaded = self.session.loaded.get(index)
        try:
            files = loaded.pending_files() if loaded is not None else []
            shown = logic_outputs.pendingHeatmapFile(self.session.shown_heatmap()) if self.session.current is loaded else None
            files.sort(key=lambda path: path != shown)
            for path in files:  # one at a time: two large reads at once slow the shown one down
                data = await asyncio.shield(self.read_file(path))
                if self.session.loaded.get(index) is not loaded:
                    return  # unloaded meanwhile
                with self.state:
                    shown = self.session.current is loaded and logic_outputs.pendingHeatmapFile(self.session.shown_heatmap()) == path
                    self.session.complete_heatmap(index, path, data)
                    if shown:
                        self.on_shown_heatmap()
        except asyncio.CancelledError:
            pass  # another case was asked for: the rest is read when this case is shown again
        finally:
            if self.complete_tasks.get(index) is asyncio.current_task():
                self.complete_tasks.pop(index)

    async def select_pending(self, row):
        """A finding whose heatmap is still being read: show it once its file is in (the page shows "loading")."""
        loaded = self.session.current
        path = logic_outputs.pendingHeatmapFile(self.session.logic.heatmapNodeForRow(loaded.table_node, row))
        self.state.loading = True
        self.state.flush()
        try:
            data = await asyncio.shield(self.read_file(path))
        except asyncio.CancelledError:
            data = None  # dropped for a case switch: read below if this case is still shown
        with self.state:
            if self.session.current is loaded:
                self.session.complete_heatmap(loaded.index, path, data)
                if self.state.row == row:
                    self.session.select_finding(row)
                    self.on_shown_heatmap()
            self.state.loading = False
