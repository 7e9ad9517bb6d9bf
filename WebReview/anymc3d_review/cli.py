"""``anymc3d review FOLDER [--plugin P ...] [--backbone WEIGHTS] [--port N] [--host 127.0.0.1]``.

Registered with the backend CLI through the entry-point group ``anymc3d.commands`` (see pyproject.toml).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

logger = logging.getLogger("anymc3d.review")

DEFAULT_HOST = "127.0.0.1"
HEATMAP_METHODS = ("attention", "rollout", "grad_rollout", "grad_last")


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
    review.add_argument("--heatmap-method", default="attention", choices=HEATMAP_METHODS,
                        help="Heatmap method of runs from the page (default: attention).")
    review.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="Device of runs from the page (default: auto).")
    review.add_argument("--port", type=int, default=8080, help="Port to listen on (default: 8080; 0: any free port).")
    review.add_argument("--host", default=DEFAULT_HOST,
                        help="Address to listen on (default: 127.0.0.1, this machine only). Anything else lets "
                             "other machines see the cases: a warning is printed.")
    review.set_defaults(handler=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    if not 0 <= args.port <= 65535:
        logger.error("bad port %s", args.port)
        return 2
    if not is_loopback(args.host):
        logger.warning("listening on %s: other machines can open this page and see the cases in %s "
                       "(the default, 127.0.0.1, keeps it to this machine)", args.host, folder.resolve())

    from .app import ReviewApp  # heavy imports (slicer, vtk, trame) only for this command

    app = ReviewApp(folder, backbone=args.backbone.resolve() if args.backbone else None,
                    plugins=[p.resolve() for p in args.plugin], heatmap_method=args.heatmap_method, device=args.device)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], "--server"]  # trame parses sys.argv itself: give it nothing of ours
    try:
        app.server.start(port=args.port, host=args.host, open_browser=False, timeout=0, show_connection_info=True)
    finally:
        sys.argv = saved_argv
    return 0


def main(argv=None) -> int:
    """``python -m anymc3d_review FOLDER ...`` (the same as ``anymc3d review``)."""
    parser = argparse.ArgumentParser(prog="anymc3d-review")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["review", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)
