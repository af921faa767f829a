"""The taskiq broker from the settings: in-process by default, Redis Streams when
``broker_url`` is set. The queue only carries job ids; the database owns every state."""

from __future__ import annotations

from taskiq import AsyncBroker, InMemoryBroker

from hypereal.settings import Settings

# A killed worker can leave the stream's auto-claim lock behind; it expires after this.
AUTOCLAIM_LOCK_SECONDS = 10


def build_broker(settings: Settings) -> AsyncBroker:
    """``InMemoryBroker`` (jobs run inside ``hypereal serve``) or ``RedisStreamBroker``
    (jobs run in ``hypereal worker`` processes on any number of machines)."""
    if not settings.broker_url:
        return InMemoryBroker(max_async_tasks=max(1, settings.worker_concurrency))
    from taskiq_redis import RedisStreamBroker

    broker: AsyncBroker = RedisStreamBroker(
        settings.broker_url,
        queue_name=settings.broker_queue,
        consumer_group_name=settings.broker_queue,
        # Messages are acknowledged on receipt: a lost one is re-sent from the database
        # (see Engine.maintain), never by the stream, so there is one redelivery mechanism.
        unacknowledged_lock_timeout=AUTOCLAIM_LOCK_SECONDS,
        xread_block=1000,
        # Take one message at a time: a worker must not hoard jobs it cannot start yet.
        xread_count=1,
    )
    return broker
