"""One streamed completion against an OpenAI-compatible server, timed as vLLM's benchmark
times it: TTFT, each gap between streamed chunks, TPOT and end-to-end (the load generators
and `pdcluster profile`'s serving-path measurement)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    tpot_s: float = 0.0  # mean time per output token after the first
    gaps_s: list[float] = field(default_factory=list)  # between consecutive streamed chunks
    e2e_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens the prefix cache served (servers with --enable-prompt-tokens-details)
    error: str = ""


async def stream_request(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int, api_key: str, traceparent: str = ""
) -> RequestResult:
    """`traceparent`: W3C trace context to send (the request's spans join that trace)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if traceparent:
        headers["traceparent"] = traceparent
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens, cached = 0, None
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as response:
            if response.status != 200:
                return RequestResult(False, error=f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return RequestResult(False, error=event["error"].get("message", "error"))
                if event.get("choices"):
                    now = time.perf_counter()
                    first = first or now
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                if usage := event.get("usage"):
                    tokens = usage["completion_tokens"]
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
    except aiohttp.ClientError as e:
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    first = first or end
    tpot = (end - first) / (tokens - 1) if tokens > 1 else 0.0
    return RequestResult(True, first - start, tpot, gaps, end - start, tokens, len(prompt), cached)


async def served_model(url: str, api_key: str = "") -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models", headers=headers) as response:
        return (await response.json())["data"][0]["id"]
