"""``python -m anymc3d_review.backend_child PARENT_PID -- COMMAND...``: run the backend so it dies with the server.

The Logic's SubprocessRunner starts the backend in its own session (Cancel kills its whole group), so a review
server that is killed would leave it running. On Linux this asks the kernel to kill this process when its parent
(the review server) dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, kept across ``exec``), checks that the parent is
still the server, then replaces itself with COMMAND. Elsewhere it only execs COMMAND (the server still cancels
its run when it stops normally). Hand-written: a few lines of ``ctypes``; no maintained package offers it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the server died before the request above took effect
        raise SystemExit(1)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        raise SystemExit("usage: python -m anymc3d_review.backend_child PARENT_PID -- COMMAND...")
    die_with_parent(int(argv[0]))
    command = argv[2:]
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
