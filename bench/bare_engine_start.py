"""The bare vLLM engine's own cold start, the ceiling `bench coldstart` compares with: a fresh
process imports vLLM, starts AsyncLLM on the given engine arguments (pdcluster's engine
arguments without its connector) and generates one token. Prints, as JSON, the seconds from
the process's start to its imports' end and to the first token.

Run as `python -m pdcluster.bench.bare_engine_start '<engine kwargs as JSON>'`, with the
environment the workers' engines get."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import psutil


async def first_token(kwargs: dict) -> tuple[float, float]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    imported = time.time()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    try:
        async for _ in engine.generate({"prompt_token_ids": list(range(10, 74))}, SamplingParams(max_tokens=1), "first"):
            pass
        return imported, time.time()
    finally:
        engine.shutdown()


def main() -> None:
    began = psutil.Process().create_time()
    imported, done = asyncio.run(first_token(json.loads(sys.argv[1])))
    print(json.dumps({"imports_s": round(imported - began, 2), "first_token_s": round(done - began, 2)}), flush=True)


if __name__ == "__main__":  # vLLM's CPU backend spawns processes
    main()
