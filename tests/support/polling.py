"""The one polling helper tests use: wait until a condition holds, for state that changes
elsewhere (a fake server's thread, the job engine, another process)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], seconds: float = 20.0, interval: float = 0.01
) -> None:
    """Wait until ``check()`` (a predicate or a coroutine function) is true; fails the test
    (TimeoutError) after ``seconds``."""
    async with asyncio.timeout(seconds):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)
