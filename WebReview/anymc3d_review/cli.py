"""``anymc3d review FOLDER [--plugin P ...] [--backbone WEIGHTS] [--port N] [--host 127.0.0.1]``.

Registered with the backend CLI through the entry-point group ``anymc3d.commands`` (see pyproject.toml).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from anymc3d.contract import AUTO_HEATMAP, DEVICES, HEATMAP_CHOICES

from .quiet import quiet_loggers, quiet_vtk

logger = logging.getLogger("anymc3d.review")

DEFAULT_HOST = "127.0.0.1"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def register(subparsers) -> None:
    review = subparsers.add_parser(
        "review", help="Review the cases of a folder in the browser (findings, heatmaps, 3D); run cases from the page.",
        description="Serve a local web page that lists the images in FOLDER with their 'anymc3d predict' results "
                    "(FOLDER/results/*.json, see docs/review.md) and shows them in slice and 3D views.")
    review.add_argument("folder", type=Path, help="Folder of images (NIfTI, NRRD, MHA); results in FOLDER/results/.")
    review.add_argument("--plugin", type=Path, action="append", default=[],
                        help="Plugin for runs from the page; repeat for several (default: none, runs disabled).")
    review.add_argument("--backbone", type=Path, default=None,
                        help="Backbone weights for runs from the page (default: none, runs disabled).")
    review.add_argument("--heatmap-method", default=AUTO_HEATMAP, choices=HEATMAP_CHOICES,
                        help="Heatmap method of runs from the page (default: auto, each plugin's best measured map).")
    review.add_argument("--device", default="auto", choices=DEVICES,
                        help="Device of runs from the page (default: auto).")
    review.add_argument("--port", type=int, default=8080, help="Port to listen on (default: 8080; 0: any free port).")
    review.add_argument("--host", default=DEFAULT_HOST,
                        help="Address to listen on (default: 127.0.0.1, this machine only). Anything else lets "
                             "other machines open the page: anyone with the printed address (it carries the "
                             "access key) can read the cases; a warning is printed.")
    review.set_defaults(handler=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reachable_hosts(host: str) -> list[str]:
    """Addresses another machine can use for a server bound to ``host`` (the machine's own addresses for a
    wildcard bind; ``0.0.0.0`` itself is not an address a browser can open)."""
    if host not in WILDCARD_HOSTS:
        return [host]
    found = []
    families = [(socket.AF_INET, "192.0.2.1")] + ([(socket.AF_INET6, "2001:db8::1")] if host == "::" else [])
    for family, documentation_address in families:  # "::" also binds IPv6: its addresses are printed too
        with socket.socket(family, socket.SOCK_DGRAM) as probe:  # no packet is sent: only the route is asked
            try:
                probe.connect((documentation_address, 9))
                found.append(probe.getsockname()[0])
            except OSError:
                pass
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None, family):
                found.append(info[4][0])
        except OSError:
            pass
    addresses = {a: ipaddress.ip_address(a.split("%")[0]) for a in found}
    found = [a for a, ip in addresses.items() if not (ip.is_loopback or ip.is_link_local)]
    return found or [socket.gethostname()]


def print_addresses(guard, host: str, port: int, folder: Path) -> None:
    """The intended stdout of the command: where to open the page (with its access key), and who can."""
    print(f"AnyMC3D review of {folder}", flush=False)
    for address in reachable_hosts(host):
        print(f"  open: {guard.url(address, port)}")
    if is_loopback(host):
        print("  (this machine only; the address carries this launch's access key)", flush=True)
    else:
        print(f"  WARNING: anyone who has this address can read every case in {folder} and its results"
              f": share it only with people allowed to see them.", flush=True)


def run(args) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        logger.error("not a folder: %s", folder)
        return 2
    if bool(args.backbone) != bool(args.plugin):
        logger.error("runs from the page need both --backbone and --plugin (or neither, to only review results)")
        return 2
    for path in [args.backbone, *args.plugin] if args.backbone else []:
        if not Path(path).exists():
            logger.error("no such file: %s", path)
            return 2
    if not args.host.strip():  # "" would bind every IPv4 and IPv6 address while printing only some
        logger.error("--host needs an address: 127.0.0.1 (this machine), 0.0.0.0 (every IPv4 address) or :: (IPv6)")
        return 2
    if not 0 <= args.port <= 65535:
        logger.error("bad port %s", args.port)
        return 2
    if not is_loopback(args.host):
        logger.warning("listening on %s: other machines can open this page; anyone with its address can read the "
                       "cases in %s (the default, 127.0.0.1, keeps it to this machine)", args.host, folder.resolve())
    quiet = not logging.getLogger().isEnabledFor(logging.DEBUG)
    if quiet:
        quiet_loggers()  # trame/wslink/aiohttp internals: warnings only, unless --log-level DEBUG
        quiet_vtk()
    if args.port and not port_free(args.host, args.port):
        logger.error("port %s on %s is in use: choose another with --port (0: any free port)", args.port, args.host)
        return 2

    missing = missing_requirements()
    if missing:
        logger.error("%s", missing)
        return 2
    from .app import ReviewApp  # heavy imports (slicer, vtk, trame) only for this command

    app = ReviewApp(folder, backbone=args.backbone.resolve() if args.backbone else None,
                    plugins=[p.resolve() for p in args.plugin], heatmap_method=args.heatmap_method, device=args.device,
                    quiet_vtk=quiet)
    app.guard.scrubber.install()  # every log line from now on: no key, no control characters (any --log-level)
    app.server.controller.on_server_ready.add(
        lambda **_: print_addresses(app.guard, args.host, app.server.port, folder.resolve()))
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], "--server"]  # trame parses sys.argv itself: give it nothing of ours
    try:
        app.server.start(port=args.port, host=args.host, open_browser=False, timeout=0, show_connection_info=False)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        logger.error("port %s on %s is in use: choose another with --port (0: any free port)", args.port, args.host)
        return 2
    finally:
        sys.argv = saved_argv
        app.close()  # Ctrl-C / SIGTERM end here: the backend is killed and the run folders removed
    return 0


#: what the page needs beyond this package's own dependencies: (import name, the command that installs it)
REQUIREMENTS = (("AnyMC3DSlicerLogic", "python -m pip install -e Logic"),
                ("trame_slicer", "python -m pip install -e WebReview"))


def missing_requirements() -> str:
    """'' when the review can start; else one line naming what is missing and the command that installs it (the
    Logic is a package of this checkout, not of PyPI: the review's pyproject cannot name it)."""
    import importlib.util

    for module, command in REQUIREMENTS:
        if importlib.util.find_spec(module) is None:
            return (f"the review needs {module}, which is not installed: from the checkout, {command} "
                    f"(into this Python: {sys.executable})")
    return ""


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host if host not in ("",) else "0.0.0.0", port))
        except OSError:
            return False
    return True


def main(argv=None) -> int:
    """``python -m anymc3d_review FOLDER ...`` (the same as ``anymc3d review``)."""
    parser = argparse.ArgumentParser(prog="anymc3d-review")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["review", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)
