"""Retry-After on a 429: a whole number of seconds between 1 and the one-hour window."""

from __future__ import annotations

import time

import pytest

from hypereal.domain.ratelimit import WINDOW_SECONDS, RateLimitDecision, RateLimiter


def decision(reset_in: float) -> RateLimitDecision:
    return RateLimitDecision(allowed=False, limit=3, remaining=0, reset_time=time.time() + reset_in)


@pytest.mark.parametrize(
    ("reset_in", "low", "high"),
    [
        (3599.6, 3600, 3600),  # rounds up to the window, not past it
        (3600.0, 3600, 3600),
        (3600.9, 3600, 3600),  # a storage clock slightly ahead of ours
        (10**7, 3600, 3600),
        (0.2, 1, 1),
        (-5.0, 1, 1),  # already free: never 0 or negative
        (42.3, 43, 44),
    ],
)
def test_retry_after_is_an_integer_within_the_window(reset_in: float, low: int, high: int) -> None:
    made = decision(reset_in)
    assert type(made.retry_after) is int
    assert low <= made.retry_after <= high <= WINDOW_SECONDS
    assert type(made.reset_at) is int


async def test_a_full_window_gives_a_retry_after_of_at_most_an_hour() -> None:
    limiter = RateLimiter("async+memory://", default_per_hour=2)
    results = [await limiter.hit("k") for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False]
    assert 3590 <= results[-1].retry_after <= 3600
    assert results[-1].headers()["X-RateLimit-Remaining"] == "0"


async def test_memory_limiter_expires_old_hits_inline_without_thread_hops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from hypereal.domain.ratelimit import RateLimiter

    hops: list[object] = []

    async def no_threads(*args: object, **kwargs: object) -> None:
        hops.append(args)

    monkeypatch.setattr(asyncio, "to_thread", no_threads)
    limiter = RateLimiter("async+memory://", 3)
    assert [(await limiter.hit("k")).allowed for _ in range(5)] == [True] * 3 + [False] * 2
    assert hops == []
    storage = limiter.storage
    assert [len(hits) for hits in storage.windows.values()] == [3]  # type: ignore[attr-defined]
    storage._expire(time.time() + 3601)  # type: ignore[attr-defined]
    assert storage.windows == {}  # type: ignore[attr-defined]


async def test_memory_limiter_answers_like_the_library_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Differential: the same hits at the same (fake) times get the same decisions and
    window stats from our storage and from limits' own MemoryStorage."""
    import random

    import limits.aio.storage.memory as library_memory
    from limits import RateLimitItemPerMinute
    from limits.aio.storage import MemoryStorage
    from limits.aio.strategies import MovingWindowRateLimiter

    from hypereal.domain import ratelimit

    clock = [1_000_000.0]
    monkeypatch.setattr(library_memory.time, "time", lambda: clock[0])
    monkeypatch.setattr(ratelimit.time, "time", lambda: clock[0])
    ours = MovingWindowRateLimiter(ratelimit._MemoryStorage())
    theirs = MovingWindowRateLimiter(MemoryStorage())
    item = RateLimitItemPerMinute(5)
    rng = random.Random(7)
    decisions = []
    for _ in range(400):
        clock[0] += rng.choice([0.0, 0.5, 3.0, 11.0, 61.0])
        key = rng.choice(["a", "b"])
        mine = await ours.hit(item, key)
        assert mine == await theirs.hit(item, key)
        mine_stats = await ours.get_window_stats(item, key)
        assert mine_stats == await theirs.get_window_stats(item, key)
        decisions.append(mine)
    assert True in decisions and False in decisions  # both answers were exercised
