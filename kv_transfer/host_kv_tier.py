"""The host KV tier's bytes: a file of fixed slots, one engine block (every layer) per slot,
mapped into the worker. In /dev/shm it is host memory; in a local disk directory, a disk tier
paged by the kernel. Each slot's checksum stays in process memory, so a slot changed behind
the engine's back (a bad page, another process, a test) is caught when loaded, never used."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Sequence

import numpy as np
import torch

from pdcluster.kv_transfer.chunk_header import payload_checksum
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout, tensor_bytes

DEFAULT_DIR = "/dev/shm"
_PREFIX = "pdcluster-kv-tier-"


class HostKVTier:
    def __init__(self, layers: list[torch.Tensor], layout: PagedKVLayout, num_slots: int, directory: str, name: str) -> None:
        self._layers, self._layout = layers, layout
        directory = directory or DEFAULT_DIR
        _remove_orphans(directory)
        self.path = os.path.join(directory, f"{_PREFIX}{name}-{os.getpid()}")
        self._file = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(num_slots, layout.block_bytes * len(layers)))
        self._slots = torch.from_numpy(self._file)
        self._checksums = np.zeros(num_slots, dtype=np.uint64)

    def _pieces(self, slot: int):
        """Each layer with its piece of the slot."""
        row, bb = self._slots[slot], self._layout.block_bytes
        return ((layer, row[i * bb : (i + 1) * bb]) for i, layer in enumerate(self._layers))

    def store(self, block_ids: Sequence[int], slots: Sequence[int]) -> None:
        for block_id, slot in zip(block_ids, slots, strict=True):
            for layer, piece in self._pieces(slot):
                self._layout.pack(layer, [block_id], into=piece)
            self._checksums[slot] = payload_checksum(tensor_bytes(self._slots[slot]))

    def load(self, slots: Sequence[int], block_ids: Sequence[int]) -> set[int]:
        """Copy slots into engine blocks; returns the blocks left unwritten because their slot
        failed its checksum."""
        failed: set[int] = set()
        for slot, block_id in zip(slots, block_ids, strict=True):
            if payload_checksum(tensor_bytes(self._slots[slot])) != int(self._checksums[slot]):
                failed.add(block_id)
                continue
            for layer, piece in self._pieces(slot):
                self._layout.unpack(tensor_bytes(piece), layer, [block_id])
        return failed

    def close(self) -> None:
        del self._slots
        self._file._mmap.close()  # type: ignore[attr-defined]  # np.memmap keeps its mmap here
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _remove_orphans(directory: str) -> None:
    """Tier files of processes that are gone (killed before they could remove them)."""
    for path in glob.glob(os.path.join(directory, _PREFIX + "*")):
        pid = path.rsplit("-", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
