"""Files other processes poll for (ready files, the KV endpoint file): written whole or not at all."""

from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
    """A reader sees the old file or the complete new one, never a partial write."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
