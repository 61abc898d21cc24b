"""The cluster token of processes started by hand, when none is configured.

`pdcluster serve` always hands its workers and routers a token. Workers and routers started
on their own never run open either: with a registry they share the token kept there (the
first one to need it makes it); without one they share this user's token for the cluster on
this machine, a file only this user can read. A cluster spanning machines without a registry
must be given its token (`--auth-token`, PDCLUSTER_KV_TOKEN).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path


def local_token_path(cluster_name: str) -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pdcluster" / f"{cluster_name}.token"


def local_cluster_token(cluster_name: str) -> str:
    """This user's token for `cluster_name` on this machine, made on first use."""
    path = local_token_path(cluster_name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        # Written whole, then linked into place: a racing process either wins or reads the winner's.
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by other users; remove it, or pass --auth-token")
    return path.read_text().strip()
