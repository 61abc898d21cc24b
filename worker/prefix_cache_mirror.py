"""A worker's prefix cache, mirrored from its engine's KV events for the routers.

vLLM publishes BlockStored / BlockRemoved / AllBlocksCleared (msgpack over ZMQ) from its
scheduler. The worker subscribes on a private IPC socket, names each block as routers name
a prompt's blocks (`prompt_block_hashes`: vLLM's own hashes are salted per process), and
streams the set to every router that watches: a snapshot, then what changed. Routers then
route by the prefixes a worker really holds, not by where they sent prompts before.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from pdcluster.common.prefix_hashes import block_name, chain_root
from pdcluster.kv_transfer.tier_scheduler import TIER_MEDIUM  # the engine's own events say "GPU", even on a CPU
from pdcluster.protos import worker_pb2

logger = logging.getLogger("pdcluster.worker.prefix_cache")

REPLAY_TIMEOUT_S = 5.0
WATCH_BACKLOG = 1024  # updates a watching router may lag behind before it is dropped (it re-syncs)


class _HeldBlocks:
    """What one medium holds: each vLLM block's name, and how many blocks hold each name
    (salted twins); and, within one batch of events, the names that came or went."""

    def __init__(self) -> None:
        self.names: dict[object, int] = {}  # vLLM block hash -> our name
        self.held: collections.Counter[int] = collections.Counter()
        self._known_before: dict[int, bool] = {}  # each name that came or went: whether routers knew it

    def add(self, vllm_hash: object, name: int) -> None:
        if vllm_hash in self.names:
            return
        self.names[vllm_hash] = name
        if not self.held[name]:
            self._known_before.setdefault(name, False)
        self.held[name] += 1

    def remove(self, vllm_hashes) -> None:
        for vllm_hash in vllm_hashes:
            name = self.names.pop(vllm_hash, None)
            if name is None:
                continue
            self.held[name] -= 1
            if self.held[name] == 0:
                del self.held[name]
                self._known_before.setdefault(name, True)

    def clear(self) -> None:
        self.names.clear()
        self.held.clear()
        self._known_before.clear()

    def changes(self) -> tuple[list[int], list[int]]:
        """Names routers must learn, and names they must forget, since the last call: within a
        batch only the end counts."""
        before, self._known_before = self._known_before, {}
        stored = [n for n, known in before.items() if not known and n in self.held]
        return stored, [n for n, known in before.items() if known and n not in self.held]


class PrefixCacheMirror:
    def __init__(self) -> None:
        self._engine = _HeldBlocks()
        self._tier = _HeldBlocks()  # the host KV tier under the engine (its connector's events)
        self._watchers: set[asyncio.Queue] = set()
        self._next_seq = 0  # the publisher numbers its batches from 0
        self.block_size = 0
        self.missed_batches = 0  # event batches lost on the socket (the mirror may then be stale)

    @property
    def names(self) -> list[int]:
        """The names of the blocks the engine holds now."""
        return list(self._engine.held)

    @property
    def tier_names(self) -> list[int]:
        """The names of the blocks its host KV tier holds now."""
        return list(self._tier.held)

    # -- events -> names ------------------------------------------------------------

    def apply(self, batch) -> worker_pb2.PrefixCacheUpdate | None:
        """Fold one vLLM `KVEventBatch` in; the update routers need, or None for no change."""
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        reset = False
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._store(event, self._medium(event.medium))
            elif isinstance(event, BlockRemoved):
                self._medium(event.medium).remove(event.block_hashes)
            else:  # AllBlocksCleared: the engine's cache was reset
                self._engine.clear()
                reset = True
        stored, removed = self._engine.changes()
        tier_stored, tier_removed = self._tier.changes()
        if reset:
            return self.snapshot()
        if not (stored or removed or tier_stored or tier_removed):
            return None
        return worker_pb2.PrefixCacheUpdate(
            block_size=self.block_size, stored=stored, removed=removed, tier_stored=tier_stored, tier_removed=tier_removed
        )

    def _medium(self, medium: str | None) -> _HeldBlocks:
        return self._tier if medium == TIER_MEDIUM else self._engine

    def _store(self, event, medium: _HeldBlocks) -> None:
        if event.parent_block_hash is None:
            parent = chain_root(event.lora_name)
        else:  # the parent may be in either medium: the engine evicts what the tier keeps
            h = event.parent_block_hash
            parent = next((m.names[h] for m in (self._engine, self._tier) if h in m.names), None)
            if parent is None:
                return  # its prefix was stored before this mirror listened: it cannot be named
        size = self.block_size = event.block_size
        for i, vllm_hash in enumerate(event.block_hashes):
            parent = block_name(event.token_ids[i * size : (i + 1) * size], parent)
            medium.add(vllm_hash, parent)

    def snapshot(self) -> worker_pb2.PrefixCacheUpdate:
        return worker_pb2.PrefixCacheUpdate(reset=True, block_size=self.block_size, stored=self.names, tier_stored=self.tier_names)

    # -- routers watching -------------------------------------------------------------

    def publish(self, update: worker_pb2.PrefixCacheUpdate) -> None:
        for queue in list(self._watchers):
            if queue.qsize() >= WATCH_BACKLOG:  # too far behind: end its stream; it re-syncs from a snapshot
                self._watchers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(update)

    async def watch(self):
        """A router's stream: the snapshot, then each change, until it falls too far behind."""
        queue: asyncio.Queue = asyncio.Queue()
        self._watchers.add(queue)
        try:
            yield self.snapshot()
            while (update := await queue.get()) is not None:
                yield update
        finally:
            self._watchers.discard(queue)

    # -- the engine's event socket ------------------------------------------------------

    async def follow(self, endpoint: str, replay_endpoint: str | None = None) -> None:
        """Read the engine's event publisher at `endpoint` until cancelled. Batches a late
        subscription or a full socket lost are asked for again at `replay_endpoint`."""
        import msgspec
        import zmq
        import zmq.asyncio
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        context = zmq.asyncio.Context.instance()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(endpoint)

        async def catch_up(end: int | None) -> None:
            if replay_endpoint:
                for seq, payload in await _replayed(context, replay_endpoint, self._next_seq, end):
                    self._take(seq, decoder.decode(payload))

        try:
            await catch_up(None)  # what the engine published before this subscription took hold
            while True:
                _topic, seq_bytes, payload = await socket.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big")
                if seq > self._next_seq:
                    await catch_up(seq)
                if seq >= self._next_seq:
                    self._take(seq, decoder.decode(payload))
        finally:
            socket.close(linger=0)

    def _take(self, seq: int, batch) -> None:
        if seq > self._next_seq:
            self.missed_batches += seq - self._next_seq
            logger.warning("missed %d KV event batches: routers may see blocks already evicted", seq - self._next_seq)
        self._next_seq = seq + 1
        if (update := self.apply(batch)) is not None:
            self.publish(update)


async def _replayed(context, endpoint: str, start: int, end: int | None) -> list[tuple[int, bytes]]:
    """Batches [start, end) (end None: all from start) from vLLM's replay socket, as far as its
    buffer still holds them."""
    import zmq

    socket = context.socket(zmq.DEALER)
    socket.connect(endpoint)
    try:
        await socket.send_multipart([b"", start.to_bytes(8, "big")])
        batches: list = []
        while True:
            _empty, _topic, seq_bytes, payload = await asyncio.wait_for(socket.recv_multipart(), REPLAY_TIMEOUT_S)
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq < 0:  # vLLM's end-of-replay marker
                return batches
            if end is None or seq < end:
                batches.append((seq, payload))
    except TimeoutError:
        logger.warning("no replay of KV event batches from %d at %s", start, endpoint)
        return []
    finally:
        socket.close(linger=0)
