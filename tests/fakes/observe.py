"""Helpers for tests that drive a backend against a fake: record the progress a job reports,
and wait for the fake's server thread to reach some state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ProgressRecorder:
    """A ``ProgressCallback`` that keeps every ``(fraction, message)`` it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    async def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))

    @property
    def messages(self) -> list[str]:
        """The messages, in order."""
        return [message for _, message in self.calls]

    @property
    def fractions(self) -> list[float]:
        """The fractions, in order."""
        return [fraction for fraction, _ in self.calls]


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition`` until true; fails the test after ``within`` seconds."""
    async with asyncio.timeout(within):
        # Polling, not an asyncio.Event: the state changes in the fake's own server thread.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
