"""What the scheduler-side connector tells the worker-side connector each step, and the
keys of `kv_transfer_params` by which a request asks for KV to be produced or consumed."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

# kv_transfer_params keys (set by the workers on the SamplingParams they submit).
TRANSFER_ID = "pd_transfer_id"
PRODUCE_TO = "pd_produce_to"  # consumer KV endpoint: this engine prefills and sends
CONSUME = "pd_consume"  # this engine waits for the KV instead of computing the prompt


@dataclass(frozen=True)
class SaveSpec:
    """Send tokens [start, end) of every layer of a request computed in this step."""

    request_id: str
    transfer_id: str
    endpoint: str
    block_ids: list[int]
    start: int
    end: int
    first: bool  # the first step of this request's transfer
    final: bool  # `end` is the end of the prompt


@dataclass(frozen=True)
class LoadSpec:
    """Expect the KV of tokens [first_token, num_tokens) into `block_ids`."""

    request_id: str
    transfer_id: str
    block_ids: list[int]
    first_token: int
    num_tokens: int


@dataclass
class PdConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    idle: bool = False  # nothing computes this step: wait for transfers, don't spin
