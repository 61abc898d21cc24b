"""Which KV blocks the host tier holds, and where: block hash → slot, least recently used
evicted first. Pure bookkeeping on the scheduler side; the worker side holds the bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class TierIndex:
    def __init__(self, num_slots: int) -> None:
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # oldest use first
        self._free = list(range(num_slots - 1, -1, -1))
        self._gone: list[bytes] = []  # evicted or dropped since `take_gone`

    def __len__(self) -> int:
        return len(self._slots)

    def leading_hits(self, hashes: Sequence[bytes]) -> int:
        """How many of `hashes`, from the first, the tier holds without a gap."""
        n = 0
        while n < len(hashes) and hashes[n] in self._slots:
            n += 1
        return n

    def take(self, hashes: Sequence[bytes]) -> list[int]:
        """The slots of blocks about to be loaded (all held), now the most recently used."""
        for h in hashes:
            self._slots.move_to_end(h)
        return [self._slots[h] for h in hashes]

    def place(self, block_hash: bytes) -> int | None:
        """A slot to store a new block in, evicting the least recently used block when full;
        None when the block is held already (it counts as used) or the tier has no slots."""
        if block_hash in self._slots:
            self._slots.move_to_end(block_hash)
            return None
        if self._free:
            slot = self._free.pop()
        elif self._slots:
            evicted, slot = self._slots.popitem(last=False)
            self._gone.append(evicted)
        else:
            return None
        self._slots[block_hash] = slot
        return slot

    def drop(self, block_hash: bytes) -> None:
        """Forget a block whose slot failed its checksum: the engine recomputes it, and the next
        request that computes it stores it anew."""
        slot = self._slots.pop(block_hash, None)
        if slot is not None:
            self._free.append(slot)
            self._gone.append(block_hash)

    def take_gone(self) -> list[bytes]:
        """Blocks the tier stopped holding since the last call."""
        gone, self._gone = self._gone, []
        return gone
