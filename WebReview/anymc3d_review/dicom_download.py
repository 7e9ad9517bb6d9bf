"""Per-case download of the DICOM objects ``anymc3d predict --dicom`` wrote (the SR and the Parametric Maps).

``GET dicom/<case index>`` answers a zip of the files the case's record lists under ``"dicom"``. The route is added
to the review's aiohttp app, so the access guard's middleware (key or cookie, the server's own Origin) checks it like
every other request. A file is served only when it resolves inside the review folder, is a regular file (never a
symbolic link: it is opened with ``O_NOFOLLOW``) and ends in ``.dcm``; anything else is a 404 with nothing served.
The zip is built in a spooled temporary file (memory bounded), the files stored as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from aiohttp import web

ROUTE = "/dicom/{index}"
SPOOL_BYTES = 16 * 1024 * 1024  # above this the zip goes to disk
CHUNK = 1024 * 1024


class NotServed(LookupError):
    """A case or file that has no DICOM download; the message says why (one line, never the client's text)."""


def case_files(folder, index_text: str) -> tuple[str, list[Path]]:
    """(case name, its DICOM files) for a case index given as text; NotServed when there is nothing to serve."""
    if not index_text.isdigit() or int(index_text) >= len(folder.cases):
        raise NotServed("no such case")
    case = folder.cases[int(index_text)]
    record = case.record if isinstance(case.record, dict) else {}
    paths = record.get("dicom") if record.get("status") == "ok" else None
    if not isinstance(paths, list) or not paths:
        raise NotServed("this case has no DICOM files (predict --dicom)")
    files = []
    for path in paths:
        if not (isinstance(path, str) and os.path.isabs(path) and path.endswith(".dcm")):
            raise NotServed("the results name a DICOM file by an invalid path")
        if os.path.islink(path) or not folder.contains(Path(path)) or not os.path.isfile(path):
            raise NotServed("a DICOM file of this case is missing, a link, or outside the review folder")
        files.append(Path(path))
    return case.name, files


def write_zip(name: str, files: list[Path], target) -> None:
    """The case's files into ``target`` as ``<name>/<file name>``, each opened without following a link."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as source, archive.open(f"{name}/{path.name}", "w", force_zip64=True) as out:
                shutil.copyfileobj(source, out, CHUNK)


def handler(folder_of):
    """The aiohttp handler; ``folder_of()`` gives the review's current CaseFolder."""

    async def download(request: web.Request) -> web.StreamResponse:
        folder = folder_of()
        try:
            name, files = case_files(folder, request.match_info["index"])
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
            write_zip(name, files, spool)
        except (NotServed, OSError) as error:
            return web.Response(status=404, text=f"No DICOM download: {error if isinstance(error, NotServed) else 'unreadable file'}")
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "case"
        response = web.StreamResponse(headers={"Content-Type": "application/zip",
                                               "Content-Disposition": f'attachment; filename="{safe}_dicom.zip"'})
        response.content_length = spool.tell()
        spool.seek(0)
        await response.prepare(request)
        with spool:
            while chunk := spool.read(CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response

    return download


def install(server, folder_of) -> None:
    """Add the route when the server binds (before its app is frozen), like the guard's middleware."""
    server.controller.on_server_bind.add(lambda ws_server: ws_server.app.router.add_get(ROUTE, handler(folder_of)))


def link(html) -> None:
    """The page's link to the shown case's download (shown when the case has DICOM files)."""
    html.A("Download DICOM (SR + heatmap maps)", v_if="cases[case_index] && cases[case_index].dicom",
           href=("'dicom/' + case_index",), download=True, classes="dicom-download text-caption d-block my-1")
