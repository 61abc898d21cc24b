"""One transfer a producer is sending: the blocks announced so far and where it stands."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum

from opentelemetry.trace import Span

from pdcluster.common.tracing import NO_SPAN


class OutgoingState(StrEnum):
    COMPUTING = "computing"  # the prompt's layers are still being computed and announced
    ANNOUNCED = "announced"  # every block is announced; what is left is in flight
    SENT = "sent"  # the consumer took every block: vLLM may free them
    FAILED = "failed"  # refused, retries spent, past its deadline or its request ended; aborted at the consumer


@dataclass
class OutgoingTransfer:
    request_id: str
    transfer_id: str
    endpoint: str
    block_ids: list[int]  # the prompt's blocks computed so far
    prompt_blocks: int  # all of the prompt's
    deadline: float
    state: OutgoingState = OutgoingState.COMPUTING
    ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, first block, end block)
    cursor: int = 0  # ranges the current attempt has taken
    first_block: int = 0  # the consumer holds the blocks before this (it said so): they are not sent
    ask_first: bool = False  # the consumer is believed to hold a prefix: hear which blocks before sending
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a range was announced, or the last
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None
    transport: str = ""  # the data path of the last attempt
    moved: int = 0  # bytes that attempt moved
    abort_reason: str = ""  # why the producer cancelled it, when it did
    nixl_held: bool = False  # a NIXL attempt got the consumer's blocks: they stay held until told
    span: Span = NO_SPAN  # from the first layer to its end, in its request's trace

    @property
    def announced(self) -> bool:
        return self.state != OutgoingState.COMPUTING

    async def next_range(self) -> tuple[int, int, int] | None:
        """The next announced block range for the current attempt, waiting for one while the
        prompt is computed; None once every range is taken."""
        while self.cursor >= len(self.ranges) and not self.announced:
            self.changed.clear()
            await self.changed.wait()
        if self.cursor >= len(self.ranges):
            return None
        self.cursor += 1
        return self.ranges[self.cursor - 1]
