"""Per-key moving-window limits: exact counts, headers, Retry-After, overrides, Redis."""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import pytest

from hypereal.domain.ratelimit import RateLimiter
from tests.conftest import MakeKey, auth
from tests.support.infra import ensure_redis


async def test_burst_of_1500_accepts_exactly_1000(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = auth(await make_key())
    sem = asyncio.Semaphore(50)

    async def one() -> httpx.Response:
        async with sem:
            return await client.get("/v1/credits", headers=key)

    responses = await asyncio.gather(*(one() for _ in range(1500)))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 1000
    assert codes.count(429) == 500
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"].startswith("Rate limit exceeded")
    assert 0 < int(limited.headers["retry-after"]) <= 3600
    assert limited.headers["x-ratelimit-remaining"] == "0"


async def test_every_response_carries_rate_limit_headers(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = auth(await make_key())
    first = await client.get("/v1/credits", headers=key)
    second = await client.get("/v1/nope", headers=key)  # errors carry them too
    assert first.headers["x-ratelimit-limit"] == "1000"
    assert first.headers["x-ratelimit-remaining"] == "999"
    assert second.status_code == 404 and second.headers["x-ratelimit-remaining"] == "998"
    reset = int(first.headers["x-ratelimit-reset"])
    assert time.time() < reset <= time.time() + 3601


async def test_per_key_override(client: httpx.AsyncClient, make_key: MakeKey) -> None:
    key = auth(await make_key(rate_limit=3))
    codes = [(await client.get("/v1/credits", headers=key)).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    other = auth(await make_key())
    assert (await client.get("/v1/credits", headers=other)).status_code == 200


async def test_redis_storage_is_exact_too() -> None:
    if not ensure_redis():
        pytest.fail("Redis is not reachable on 127.0.0.1:6379 and could not be started")
    limiter = RateLimiter("async+redis://127.0.0.1:6379/0", default_per_hour=1000)
    key_id = f"test-{secrets.token_hex(6)}"
    results = await asyncio.gather(*(limiter.hit(key_id, 100) for _ in range(150)))
    assert sum(r.allowed for r in results) == 100
    assert min(r.remaining for r in results) == 0
    await limiter.storage.clear(f"LIMITS:LIMITER/key/{key_id}/100/1/hour")  # tidy up
