"""The Redis Streams broker of ``hypereal worker`` (imported only when a ``broker_url`` is
set, see broker.py)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from redis.asyncio import Redis
from taskiq_redis import RedisStreamBroker


class DoorbellStreamBroker(RedisStreamBroker):
    """``RedisStreamBroker`` whose workers read with ``NOACK``.

    A message is only a doorbell: the database says what to run, and re-sends a job whose
    message was lost (``Engine.maintain``). So a message is acknowledged as it is read, in the
    same command, and nothing is ever pending to auto-claim. taskiq-redis's own reader
    acknowledged each message with a command (and a client object) of its own, and after every
    read took a lock, auto-claimed and let it go: three more round trips per read, which cost
    more per job the more workers share the stream (each read is smaller)."""

    async def listen(self) -> AsyncGenerator[bytes]:  # type: ignore[override]
        # taskiq's receiver takes plain bytes as well as AckableMessage: nothing to ack.
        async with Redis(connection_pool=self.connection_pool) as redis_conn:
            while True:
                fetched: Any = await redis_conn.xreadgroup(
                    self.consumer_group_name,
                    self.consumer_name,
                    {self.queue_name: ">"},
                    block=self.block,
                    noack=True,
                    count=self.count,
                )
                for _stream, messages in fetched:
                    for _id, message in messages:
                        yield message[b"data"]
