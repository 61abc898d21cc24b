"""How a process ends: the signals that stop a server gracefully, and a process's life tied to
its parent's, so a crashed or SIGKILLed worker leaves no engine processes behind (Linux
`PR_SET_PDEATHSIG`; a no-op elsewhere)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# What stops a server gracefully: Ctrl-C, a supervisor's SIGTERM, and the end of the terminal or
# SSH session that ran it (`ray exec ... pdcluster serve` ends with SIGHUP when its session does).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def on_stop_signals(stop: Callable[[], None]) -> None:
    """`stop()` on any of STOP_SIGNALS. After a SIGHUP the process's terminal is gone, and
    writing to it fails (EIO), which would cut the shutdown short: what went there goes to
    /dev/null from then on."""

    def handle(sig: int, _frame: object) -> None:
        if sig == signal.SIGHUP:
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                if os.isatty(fd):
                    os.dup2(devnull, fd)
            os.close(devnull)
        stop()

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """The calling process receives `sig` when the thread that started it exits."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
