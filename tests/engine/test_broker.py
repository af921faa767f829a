"""The Redis Streams broker of the scaled-out mode, on the real Redis server: messages are
read with NOACK (nothing left pending) and the stream is trimmed as messages are added."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from taskiq import AsyncBroker, BrokerMessage

from hypereal.engine import broker as broker_module
from hypereal.settings import Settings
from tests.support.infra import ensure_redis

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def stream(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[AsyncBroker, str]]:
    if not ensure_redis():
        pytest.fail("Redis is not reachable on 127.0.0.1:6379 and could not be started")
    monkeypatch.setattr(broker_module, "STREAM_MAXLEN", 100)
    queue = f"hypereal-test-{uuid.uuid4().hex[:10]}"
    broker = broker_module.build_broker(
        Settings(broker_url=REDIS_URL, broker_queue=queue, worker_concurrency=8)
    )
    await broker.startup()
    try:
        yield broker, queue
    finally:
        await broker.shutdown()
        async with Redis.from_url(REDIS_URL) as redis:
            await redis.delete(queue)


def _doorbell(index: int) -> BrokerMessage:
    return BrokerMessage(
        task_id=str(index), task_name="run_job", message=f"job-{index}".encode(), labels={}
    )


async def test_messages_are_read_in_batches_and_left_nothing_pending(
    stream: tuple[AsyncBroker, str],
) -> None:
    broker, queue = stream
    for index in range(20):
        await broker.kick(_doorbell(index))
    received: list[bytes] = []
    async for message in broker.listen():
        assert isinstance(message, bytes)  # no AckableMessage: nothing to acknowledge
        received.append(message)
        if len(received) == 20:
            break
    assert received == [f"job-{index}".encode() for index in range(20)]
    async with Redis.from_url(REDIS_URL) as redis:
        pending = await redis.xpending(queue, queue)
    assert pending["pending"] == 0


async def test_the_stream_is_trimmed_as_messages_are_added(
    stream: tuple[AsyncBroker, str],
) -> None:
    broker, queue = stream
    for index in range(1000):
        await broker.kick(_doorbell(index))
    async with Redis.from_url(REDIS_URL) as redis:
        length = await redis.xlen(queue)
    # MAXLEN ~ 100 trims whole nodes of the stream: about 100 are kept, never all 1,000.
    assert 100 <= length < 300
