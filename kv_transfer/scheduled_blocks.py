"""Requests' engine blocks, followed across scheduler steps."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import CachedRequestData


class HasBlocks(Protocol):
    block_ids: list[int]


S = TypeVar("S", bound=HasBlocks)


def running_on(states: Mapping[str, S], cached: CachedRequestData) -> Iterator[tuple[str, S, int]]:
    """Each request of `states` that runs on in this step, with its blocks brought up to date
    (vLLM names only the new ones, or all of them for a request resumed after preemption), and
    its tokens computed before the step."""
    for i, req_id in enumerate(cached.req_ids):
        state = states.get(req_id)
        if state is None:
            continue
        new_blocks = cached.new_block_ids[i]
        if new_blocks is not None:
            resumed = req_id in cached.resumed_req_ids
            state.block_ids = list(new_blocks[0]) if resumed else [*state.block_ids, *new_blocks[0]]
        yield req_id, state, cached.num_computed_tokens[i]
