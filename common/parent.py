"""A process started for a parent that must not outlive it: `exo-tools up`
starts the broker and the nodes with EXO_PARENT_PID set, and a parent that dies
(even SIGKILLed, with no chance to stop them) takes them along, instead of
leaving them behind holding their ports. (Linux signals the death of the parent
*thread* that started the child: set it only where the main thread starts them.)"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def follow_parent() -> None:
    """On Linux, ask for SIGTERM when the parent named by EXO_PARENT_PID dies; if
    it is already gone, exit now. Elsewhere nothing (the parent stops them)."""
    wanted = os.environ.pop("EXO_PARENT_PID", None)  # (not for this one's own children)
    if not wanted or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # (a parent gone before the call above: this process was handed to init)
    if str(os.getppid()) != wanted:
        sys.exit(0)
