"""Tying a process's life to its parent's, so a crashed or SIGKILLed worker leaves no
engine processes behind (Linux `PR_SET_PDEATHSIG`; a no-op elsewhere)."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """The calling process receives `sig` when the thread that started it exits."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
