"""The rate limiter shared by the processes of `hypereal serve --processes N`: decisions over
the Unix socket are the in-process limiter's, several clients share one window, and a limiter
that cannot be reached answers a 503 error (never an allowed request)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hypereal.domain.ratelimit import RateLimiter
from hypereal.domain.ratelimit_shared import LimiterUnavailable, serving, socket_url


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "limiter.sock"


async def test_decisions_match_the_in_process_limiter(socket_path: Path) -> None:
    local = RateLimiter("async+memory://", 1000)
    with serving(socket_path, default_per_hour=1000):
        shared = RateLimiter(socket_url(socket_path), 1000)
        try:
            for _ in range(5):
                mine = await shared.hit("key_a", 3)
                theirs = await local.hit("key_a", 3)
                assert (mine.allowed, mine.limit, mine.remaining) == (
                    theirs.allowed,
                    theirs.limit,
                    theirs.remaining,
                )
                assert abs(mine.reset_time - theirs.reset_time) < 1
            default = await shared.hit("key_b")  # no per-key limit: the default
            assert (default.allowed, default.limit, default.remaining) == (True, 1000, 999)
        finally:
            shared.close()


async def test_clients_share_one_window(socket_path: Path) -> None:
    with serving(socket_path, default_per_hour=1000):
        clients = [RateLimiter(socket_url(socket_path), 1000) for _ in range(3)]
        try:
            decisions = await asyncio.gather(
                *(clients[n % 3].hit("key_shared", 10) for n in range(25))
            )
        finally:
            for client in clients:
                client.close()
    assert sum(d.allowed for d in decisions) == 10
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))


async def test_an_unreachable_limiter_is_a_503(socket_path: Path) -> None:
    with serving(socket_path, default_per_hour=1000):
        shared = RateLimiter(socket_url(socket_path), 1000)
        assert (await shared.hit("key_c", 5)).allowed
    # The parent is gone: the open connection is lost, and a new one is refused.
    with pytest.raises(LimiterUnavailable) as lost:
        await shared.hit("key_c", 5)
    assert lost.value.status == 503
    with pytest.raises(LimiterUnavailable):
        await shared.hit("key_c", 5)
    shared.close()
