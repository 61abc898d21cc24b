"""What the scheduler-side connector tells the worker-side connector each step, and the
keys of `kv_transfer_params` by which a request asks for KV to be produced or consumed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

# kv_transfer_params keys (set by the workers on the SamplingParams they submit).
TRANSFER_ID = "pd_transfer_id"
PRODUCE_TO = "pd_produce_to"  # consumer KV endpoint: this engine prefills and sends
CONSUME = "pd_consume"  # this engine waits for the KV instead of computing the prompt
CONSUME_FROM = "pd_consume_from"  # the producer's KV endpoint, watched while the KV is awaited
CONSUMER_HOLDS = "pd_consumer_holds"  # prompt tokens the consumer is believed to hold: ask it before sending
# A peer pull: this engine loads the prompt's first PULL_TOKENS tokens (whole blocks) from a peer
# that holds them, under their own transfer id, and computes only the rest.
PULL_ID = "pd_pull_id"
PULL_TOKENS = "pd_pull_tokens"
PULL_FROM = "pd_pull_from"  # the peer's KV endpoint, watched while the KV is awaited


@dataclass(frozen=True)
class SaveSpec:
    """Send blocks [start, end) (indexes into `block_ids`) of every layer once this
    step has computed them. A block is sent when full, the last one when the prompt ends."""

    request_id: str
    transfer_id: str
    endpoint: str
    block_ids: list[int]
    start: int
    end: int
    first: bool  # the first step of this request's transfer
    final: bool  # `end` is the prompt's last block
    prompt_blocks: int  # blocks of the whole prompt (a chunked prompt's first steps hold fewer in `block_ids`)
    trace: Mapping[str, str] = field(default_factory=dict)  # the request's W3C trace headers (first step)
    consumer_holds: int = 0  # prompt tokens the consumer is believed to hold (first step)


@dataclass(frozen=True)
class LoadSpec:
    """Expect the KV of blocks [first_block, len(block_ids)) into `block_ids`; earlier
    blocks are already in the local prefix cache."""

    request_id: str
    transfer_id: str
    block_ids: list[int]
    first_block: int
    producer: str = ""  # its KV endpoint; empty: not watched
    trace: Mapping[str, str] = field(default_factory=dict)  # the request's W3C trace headers


@dataclass(frozen=True)
class TierCopy:
    """Engine blocks and host tier slots, pairwise: copied one way or the other."""

    block_ids: list[int]
    slots: list[int]


@dataclass
class PdConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    tier_loads: list[TierCopy] = field(default_factory=list)  # before this step's forward pass
    tier_stores: list[TierCopy] = field(default_factory=list)  # after it
    idle: bool = False  # nothing computes this step: wait for transfers, don't spin
