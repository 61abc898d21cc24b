"""Running a request's choices (n samples of each prompt) at once and merging their deltas."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pdcluster.router.request_flow import GenerationRequest, RequestFlow, TokenDelta, Usage


@dataclass
class Choice:
    index: int
    request: GenerationRequest
    usage: Usage = field(default_factory=Usage)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""

    def add(self, delta: TokenDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.finish_reason = delta.finish_reason or self.finish_reason


async def merged_deltas(flow: RequestFlow, choices: list[Choice]):
    """Yield (choice, delta) from every choice as they come; the first failure ends all."""
    if len(choices) == 1:
        async for delta in flow.generate(choices[0].request, choices[0].usage):
            yield choices[0], delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for delta in flow.generate(choice.request, choice.usage):
                queue.put_nowait((choice, delta))
            queue.put_nowait((choice, None))
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait((choice, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            choice, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                remaining -= 1
                continue
            yield choice, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def total_usage(choices: list[Choice], prompt_count: int) -> dict:
    """OpenAI counts each prompt once, however many samples it has."""
    per_prompt = len(choices) // prompt_count
    prompt_tokens = sum(c.usage.prompt_tokens for c in choices[::per_prompt])
    completion = sum(c.usage.completion_tokens for c in choices)
    cached = sum(c.usage.cached_tokens for c in choices[::per_prompt])
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
