"""Producer side of KV transfer: streams a request's KV to its consumer layer by layer.

The engine thread announces, per layer, which of the prompt's blocks were just computed;
the I/O loop reads those blocks out of the paged cache and pushes them while the engine computes
the next layer. The request's blocks stay allocated (vLLM's delayed free) until the
consumer has taken every chunk, the send deadline passes, or the consumer refuses the
transfer; then `poll` hands the request back so vLLM frees them. A failed attempt is
retried from the held blocks; a transfer that finally fails is aborted at the consumer so
it recomputes at once instead of waiting out its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

from pdcluster.common.tracing import PRODUCER, context_of, end_span, start_span
from pdcluster.kv_transfer.connector_metadata import SaveSpec
from pdcluster.kv_transfer.kv_io_loop import KVIOLoop
from pdcluster.kv_transfer.kv_transfer_service import KVClient, TransferFailed
from pdcluster.kv_transfer.nixl_producer import NixlProducer
from pdcluster.kv_transfer.outgoing_transfer import OutgoingState, OutgoingTransfer
from pdcluster.kv_transfer.paged_kv_layout import PagedKVLayout, split_block_range
from pdcluster.kv_transfer.settings import KVEndpointSettings
from pdcluster.kv_transfer.transfer_stats import TransferStats
from pdcluster.kv_transfer.transports import Transport

logger = logging.getLogger(__name__)


class KVSender:
    def __init__(
        self,
        io: KVIOLoop,
        client: KVClient,
        transports: Sequence[Transport],
        layout: PagedKVLayout,
        settings: KVEndpointSettings,
        stats: TransferStats,
        progress: threading.Event | None = None,
    ) -> None:
        self._progress = progress or threading.Event()  # set when a transfer ends
        self._io = io
        self._client = client  # for aborts
        self._transports = list(transports)  # tried in order: the first that can carries a transfer
        self._layout = layout
        self._settings = settings
        self._stats = stats
        self._transfers: dict[str, OutgoingTransfer] = {}  # touched on the I/O loop only
        self._lock = threading.Lock()
        self._open: set[str] = set()  # requests with a transfer not yet handed back
        self._done: set[str] = set()
        self._finished: set[str] = set()

    # -- engine thread ----------------------------------------------------------------

    def add_layer(self, save: SaveSpec, layer: int) -> None:
        """Blocks [save.start, save.end) of `layer` are computed and may be sent now.

        The first layer of a request's first step opens its transfer.
        """
        if save.first and layer == 0:
            with self._lock:
                self._open.add(save.request_id)
        self._io.call_soon(self._add_layer, save, layer)

    def fail(self, save: SaveSpec, reason: str) -> None:
        """Send none of this step's blocks of the request and fail its transfer at the
        consumer, which recomputes the prompt: the blocks are not what the prompt computes."""
        if save.first:
            with self._lock:
                self._open.add(save.request_id)
        self._io.call_soon(self._fail, save, reason)

    def finalize(self, request_id: str) -> None:
        """Every token of the prompt has been announced."""
        self._io.call_soon(self._finalize, request_id)

    def poll(self, finished_req_ids: set[str]) -> set[str]:
        """Requests whose blocks may be freed now (finished in vLLM and done sending)."""
        with self._lock:
            finished = finished_req_ids & self._open
            self._finished |= finished
            ready = self._done & self._finished
            self._done -= ready
            self._finished -= ready
            self._open -= ready
        for request_id in finished:
            self._io.call_soon(self._abort_if_unfinished, request_id)
        return ready

    @property
    def pending(self) -> int:
        """Transfers whose blocks are still held."""
        with self._lock:
            return len(self._open)

    # -- I/O loop ---------------------------------------------------------------------

    def _add_layer(self, save: SaveSpec, layer: int) -> None:
        t = self._transfers.get(save.request_id)
        if t is None:
            if not (save.first and layer == 0):
                return  # the transfer already ended (failed or aborted)
            t = self._open_transfer(save)
            t.task = asyncio.get_running_loop().create_task(self._drive(t))
        t.block_ids = save.block_ids
        for s, e in split_block_range(save.start, save.end, self._layout.block_bytes, self._settings.chunk_bytes):
            t.ranges.append((layer, s, e))
        t.changed.set()

    def _open_transfer(self, save: SaveSpec) -> OutgoingTransfer:
        t = OutgoingTransfer(
            request_id=save.request_id,
            transfer_id=save.transfer_id,
            endpoint=save.endpoint,
            block_ids=[],
            prompt_blocks=save.prompt_blocks,
            deadline=time.monotonic() + self._settings.send_timeout_s,
            ask_first=save.consumer_holds > 0,
            span=start_span(
                "kv_transfer.send",
                context_of(save.trace),
                PRODUCER,
                {"pdcluster.transfer_id": save.transfer_id, "server.address": save.endpoint},
            ),
        )
        self._transfers[save.request_id] = t
        return t

    def _fail(self, save: SaveSpec, reason: str) -> None:
        t = self._transfers.get(save.request_id)
        if t is None:
            if save.first:  # nothing sent yet: open it only to fail it
                t = self._open_transfer(save)
                t.task = asyncio.get_running_loop().create_task(self._finish(t, reason))
        elif t.task is not None:
            t.abort_reason = reason
            t.task.cancel()

    def _finalize(self, request_id: str) -> None:
        t = self._transfers.get(request_id)
        if t is not None:
            t.state = OutgoingState.ANNOUNCED
            t.span.add_event("prompt_computed")
            t.changed.set()

    def _abort_if_unfinished(self, request_id: str) -> None:
        # vLLM finished the request: a transfer never finalized will never be complete.
        t = self._transfers.get(request_id)
        if t is not None and not t.announced and t.task is not None:
            t.task.cancel()

    async def _drive(self, t: OutgoingTransfer) -> None:
        failure = ""
        try:
            for attempt in range(self._settings.send_retries + 1):
                try:
                    remaining = t.deadline - time.monotonic()
                    await asyncio.wait_for(self._attempt(t), timeout=max(remaining, 0.001))
                    failure = ""
                    break
                except TransferFailed as e:
                    failure = str(e)
                    if not e.retryable or attempt == self._settings.send_retries:
                        break
                    logger.warning("retrying KV transfer %s: %s", t.transfer_id, e)
                    self._stats.add(send_retries=1)
                    await asyncio.sleep(0.05 * (attempt + 1))
                except TimeoutError:
                    failure = f"not confirmed within {self._settings.send_timeout_s}s"
                    self._stats.add(expired_leases=1)
                    break
        except asyncio.CancelledError:
            failure = t.abort_reason or "request ended before its prompt was computed"
        except Exception as e:  # never count a transfer that broke as sent
            logger.exception("KV transfer %s broke", t.transfer_id)
            failure = f"unexpected error: {e!r}"
        finally:
            await self._finish(t, failure)

    async def _attempt(self, t: OutgoingTransfer) -> None:
        t.cursor = 0  # a retry resends everything from the held blocks
        for transport in self._transports:
            moved = await transport.send(t)
            if moved is not None:
                t.transport, t.moved = transport.name, moved
                break
        else:
            raise TransferFailed(f"no data path to {t.endpoint} carried the transfer", False)
        if t.nixl_held and t.transport != "nixl":  # another path carried what a NIXL attempt began
            await next(n for n in self._transports if isinstance(n, NixlProducer)).written(t)

    async def _finish(self, t: OutgoingTransfer, failure: str) -> None:
        self._transfers.pop(t.request_id, None)
        t.state = OutgoingState.FAILED if failure else OutgoingState.SENT
        t.span.set_attributes({"pdcluster.kv_transport": t.transport, "pdcluster.kv_bytes": t.moved})
        end_span(t.span, failure)
        if failure:
            logger.warning("KV transfer %s failed: %s", t.transfer_id, failure)
            self._stats.add(transfers_failed=1)
            await self._client.abort(t.endpoint, t.transfer_id, failure)
        else:
            self._stats.moved(t.transport, sent=t.moved)
            self._stats.transfer_done(t.transport, transfers_sent=1, send_seconds=time.monotonic() - t.started)
        with self._lock:
            self._done.add(t.request_id)
        self._progress.set()
