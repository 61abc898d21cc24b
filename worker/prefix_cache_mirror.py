"""A prefill worker's prefix cache, mirrored from its engine's KV events for the routers.

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
from pdcluster.protos import worker_pb2

logger = logging.getLogger("pdcluster.worker.prefix_cache")

REPLAY_TIMEOUT_S = 5.0
WATCH_BACKLOG = 1024  # updates a watching router may lag behind before it is dropped (it re-syncs)


class PrefixCacheMirror:
    def __init__(self) -> None:
        self._names: dict[object, int] = {}  # vLLM block hash -> our name
        self._held: collections.Counter[int] = collections.Counter()  # our name -> vLLM blocks of that name (salted twins)
        self._watchers: set[asyncio.Queue] = set()
        self._next_seq = 0  # the publisher numbers its batches from 0
        self.block_size = 0
        self.missed_batches = 0  # event batches lost on the socket (the mirror may then be stale)

    @property
    def names(self) -> list[int]:
        """The names of the blocks the engine holds now."""
        return list(self._held)

    # -- events -> names ------------------------------------------------------------

    def apply(self, batch) -> worker_pb2.PrefixCacheUpdate | None:
        """Fold one vLLM `KVEventBatch` in; the update routers need, or None for no change."""
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        held_before: dict[int, bool] = {}  # each name that came or went: whether routers knew it
        reset = False
        for event in batch.events:
            if isinstance(event, BlockStored):
                came, went = self._store(event), []
            elif isinstance(event, BlockRemoved):
                came, went = [], self._remove(event.block_hashes)
            else:  # AllBlocksCleared
                self._names.clear()
                self._held.clear()
                came, went, reset = [], [], True
            for name in came:
                held_before.setdefault(name, False)
            for name in went:
                held_before.setdefault(name, True)
        if reset:
            return self.snapshot()
        stored = [n for n, before in held_before.items() if not before and n in self._held]
        removed = [n for n, before in held_before.items() if before and n not in self._held]
        if not stored and not removed:
            return None
        return worker_pb2.PrefixCacheUpdate(block_size=self.block_size, stored=stored, removed=removed)

    def _store(self, event) -> list[int]:
        if event.parent_block_hash is None:
            parent = chain_root(event.lora_name)
        elif (parent := self._names.get(event.parent_block_hash)) is None:
            return []  # its prefix was stored before this mirror listened: it cannot be named
        size = self.block_size = event.block_size
        new = []
        for i, vllm_hash in enumerate(event.block_hashes):
            parent = block_name(event.token_ids[i * size : (i + 1) * size], parent)
            if vllm_hash not in self._names:
                self._names[vllm_hash] = parent
                self._held[parent] += 1
                if self._held[parent] == 1:
                    new.append(parent)
        return new

    def _remove(self, vllm_hashes) -> list[int]:
        gone = []
        for vllm_hash in vllm_hashes:
            name = self._names.pop(vllm_hash, None)
            if name is None:
                continue
            self._held[name] -= 1
            if self._held[name] == 0:
                del self._held[name]
                gone.append(name)
        return gone

    def snapshot(self) -> worker_pb2.PrefixCacheUpdate:
        return worker_pb2.PrefixCacheUpdate(reset=True, block_size=self.block_size, stored=self.names)

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
