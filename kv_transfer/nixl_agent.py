"""This engine's NIXL agent: its KV layers registered once at start, one-sided WRITEs of
block ranges into a peer's registered blocks, and the peers whose metadata it holds.

NIXL's own progress thread spins a core (its Python API hard-codes `pthrDelay = 0`), so
none runs: the caller polls transfer states and notifications from its I/O loop, and
only while transfers are in flight, so an idle worker burns no CPU. The agent is not
thread-safe without that thread; every call after construction comes from the I/O loop.
"""

from __future__ import annotations

import importlib
import logging
import os
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout

logger = logging.getLogger(__name__)

# `nixl` is a meta package choosing one of these per CUDA major version.
_NIXL_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")


class NixlUnavailable(RuntimeError):
    """NIXL is not installed here, or its agent could not start."""


class NixlWriteFailed(RuntimeError):
    """A NIXL write could not be posted or ended in error."""


def nixl_api() -> Any | None:
    """The installed NIXL Python API module, or None."""
    for name in _NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def merge_runs(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge consecutive (address, bytes, device) rows that are contiguous on both sides,
    so a run of adjacent blocks is one descriptor."""
    if len(src) < 2:
        return src, dst
    joins = (src[1:, 0] == src[:-1, 0] + src[:-1, 1]) & (dst[1:, 0] == dst[:-1, 0] + dst[:-1, 1])
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    lengths = np.add.reduceat(src[:, 1], starts)
    merged = [rows[starts].copy() for rows in (src, dst)]
    for rows in merged:
        rows[:, 1] = lengths
    return merged[0], merged[1]


class NixlAgent:
    def __init__(self, layers: Sequence[torch.Tensor], layout: PagedKVLayout, *, loopback_only: bool) -> None:
        api = nixl_api()
        if api is None:
            raise NixlUnavailable("NIXL is not installed here (pip install '.[nixl]'; scripts/install.sh does)")
        if loopback_only:
            # UCX listens on every network device it finds; a local cluster stays on loopback.
            # Same-host writes still go by cma (shared memory), which needs no device.
            os.environ.setdefault("UCX_NET_DEVICES", "lo")
        # Unique per process: a restarted peer on the same address is a different agent,
        # so metadata of the one before can never be used for it.
        self.name = f"pdcluster-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            self._agent = api.nixl_agent(self.name, api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
            self._agent.register_memory(list(layers))
        except Exception as e:  # NIXL raises its own error types
            raise NixlUnavailable(f"NIXL agent could not start: {e}") from e
        self.layout = layout
        self.memory = "VRAM" if layers[0].is_cuda else "DRAM"
        self.spans = [layout.span(layer) for layer in layers]
        self.metadata: bytes = self._agent.get_agent_metadata()
        self._peer_of: dict[str, str] = {}  # consumer endpoint -> its agent we hold
        self._in_flight: Counter[str] = Counter()
        self._retired: set[str] = set()  # replaced agents, removed once their writes end

    # -- producer ---------------------------------------------------------------------

    def known_peer(self, endpoint: str) -> str:
        return self._peer_of.get(endpoint, "")

    def use_peer(self, endpoint: str, agent: str, metadata: bytes) -> None:
        """Hold `agent`'s metadata for writes to `endpoint`; an agent that answered there
        before (a process since restarted) is dropped and never written to again."""
        previous = self._peer_of.get(endpoint)
        if previous == agent:
            return
        if not metadata:
            raise NixlWriteFailed(f"no NIXL metadata for agent {agent} at {endpoint}")
        self._agent.add_remote_agent(metadata)
        self._peer_of[endpoint] = agent
        if previous:
            logger.info("KV consumer at %s restarted (NIXL agent %s replaces %s)", endpoint, agent, previous)
            self._retired.add(previous)
            self._drop_retired(previous)

    def write(self, peer: str, src: np.ndarray, dst: np.ndarray, notif: bytes):
        """Post one WRITE of `src` rows into `dst` rows of `peer`; `notif` reaches the peer
        once the data has landed. Returns the transfer handle."""
        src, dst = merge_runs(src, dst)
        try:
            handle = self._agent.initialize_xfer(
                "WRITE", self._agent.get_xfer_descs(src, self.memory), self._agent.get_xfer_descs(dst, self.memory), peer, notif
            )
        except Exception as e:  # a descriptor outside the peer's registered memory, or an unknown peer
            raise NixlWriteFailed(f"NIXL refused the write to {peer}: {e}") from None
        self._in_flight[peer] += 1
        try:
            state = self._agent.transfer(handle)
        except Exception as e:  # e.g. the peer disconnected
            state = f"ERR ({e})"
        if state.startswith("ERR"):
            self.release(peer, handle)
            raise NixlWriteFailed(f"NIXL could not post the write to {peer}: {state}")
        return handle

    def done(self, handle) -> bool:
        """Whether a posted write has completed; raises NixlWriteFailed if it failed."""
        try:
            state = self._agent.check_xfer_state(handle)
        except Exception as e:
            raise NixlWriteFailed(f"NIXL write ended in error: {e}") from None
        if state == "ERR":
            raise NixlWriteFailed("NIXL write ended in error")
        return state == "DONE"

    def release(self, peer: str, handle) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception as e:  # still active and not cancellable: NIXL keeps it
            logger.warning("NIXL could not release a write to %s: %s", peer, e)
        self._in_flight[peer] -= 1
        self._drop_retired(peer)

    def _drop_retired(self, peer: str) -> None:
        if peer in self._retired and self._in_flight[peer] <= 0:
            self._retired.discard(peer)
            del self._in_flight[peer]
            try:
                self._agent.remove_remote_agent(peer)
            except Exception as e:
                logger.warning("NIXL could not drop agent %s: %s", peer, e)

    # -- consumer ---------------------------------------------------------------------

    def notifications(self) -> dict[str, list[bytes]]:
        """Notifications since the last call, by sending agent; also progresses writes
        into this agent's memory (UCX over TCP needs the target to progress)."""
        return self._agent.get_new_notifs()
