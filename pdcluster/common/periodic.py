"""Background loops that run a coroutine every few seconds until cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable


def run_periodically(
    step: Callable[[], Awaitable[None]], interval_s: float, logger: logging.Logger, *, wait_first: bool = False
) -> asyncio.Task:
    """A task calling `step` every `interval_s` (after one interval when `wait_first`). A step
    that raises is logged and the loop goes on: one bad round must not stop the next."""

    async def loop() -> None:
        if wait_first:
            await asyncio.sleep(interval_s)
        while True:
            try:
                await step()
            except Exception as e:
                logger.warning("%s failed: %s", getattr(step, "__qualname__", step), e)
            await asyncio.sleep(interval_s)

    return asyncio.create_task(loop())


async def cancel_all(tasks: Iterable[asyncio.Task | None]) -> None:
    """Cancel the tasks and wait until each has ended."""
    tasks = [t for t in tasks if t is not None]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
