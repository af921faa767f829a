"""The taskiq broker of the scaled-out mode: Redis Streams when ``broker_url`` is set (the
in-process mode runs jobs from a plain asyncio queue, see engine.py). The queue only carries
job ids; the database owns every state."""

from __future__ import annotations

from taskiq import AsyncBroker

from hypereal.settings import Settings

# Messages read from the stream at once: a worker takes a batch per round trip.
XREAD_COUNT = 32
# The stream keeps about this many messages (trimmed as messages are added, ``MAXLEN ~``):
# read messages are never looked at again, and one trimmed before it was read is a lost
# doorbell, which the database re-sends (Engine.maintain). Without a bound, every job ever
# submitted stayed in Redis's memory.
STREAM_MAXLEN = 100_000


def build_broker(settings: Settings) -> AsyncBroker:
    """``RedisStreamBroker`` (jobs run in ``hypereal worker`` processes on any number of
    machines). Raises ValueError without a ``broker_url``."""
    if not settings.broker_url:
        raise ValueError("the Redis broker needs HYPEREAL_BROKER_URL")
    from hypereal.engine.redis_stream import DoorbellStreamBroker

    broker: AsyncBroker = DoorbellStreamBroker(
        settings.broker_url,
        queue_name=settings.broker_queue,
        consumer_group_name=settings.broker_queue,
        # Messages are acknowledged as they are read: a lost one is re-sent from the database
        # (see Engine.maintain), never by the stream, so there is one redelivery mechanism.
        xread_block=1000,
        # A batch per read, no more than the worker runs at once: a job it reads but cannot
        # start waits in its process, and one whose model is busy waits queued in the
        # database for whichever worker frees a slot.
        xread_count=min(XREAD_COUNT, max(1, settings.worker_concurrency)),
        maxlen=STREAM_MAXLEN,
        approximate=True,
    )
    return broker
