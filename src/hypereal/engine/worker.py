"""``hypereal worker``: a process that runs jobs from the Redis Streams queue.

Start any number, on any machines sharing the database, the media store and the broker.
Each claims jobs with a conditional UPDATE, renews their leases while they run, and on
SIGINT/SIGTERM gives its running jobs back to the queue before exiting. SIGKILL is safe
too: the lease runs out and another worker's maintenance re-queues the job.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from contextlib import suppress

from taskiq.acks import AcknowledgeType
from taskiq.receiver import Receiver

from hypereal.engine.context import JobServices
from hypereal.engine.engine import Engine
from hypereal.settings import Settings

log = logging.getLogger("hypereal.worker")

SHUTDOWN_SECONDS = 15


async def run_worker(
    settings: Settings,
    build: Callable[[Settings], JobServices],
    *,
    concurrency: int | None = None,
) -> None:
    """Consume jobs until SIGINT/SIGTERM. Raises ValueError without a ``broker_url``."""
    if not settings.broker_url:
        raise ValueError(
            "hypereal worker needs a shared queue: set HYPEREAL_BROKER_URL "
            "(e.g. redis://127.0.0.1:6379/0). Without one, jobs run inside `hypereal serve`."
        )
    services = build(settings)
    engine = Engine(services, consume=True)
    assert engine.broker is not None  # a broker_url is set
    engine.broker.is_worker_process = True
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await engine.start()
    receiver = Receiver(
        engine.broker,
        max_async_tasks=concurrency or settings.worker_concurrency,
        # The message is only a doorbell; the database says what to run (see broker.py).
        ack_type=AcknowledgeType.WHEN_RECEIVED,
        run_startup=False,
        propagate_exceptions=False,
    )
    finish = asyncio.Event()
    listening = asyncio.create_task(receiver.listen(finish))
    log.info("worker %s consuming %s", engine.worker_id, settings.broker_queue)
    print(f"hypereal worker {engine.worker_id}: consuming {settings.broker_queue}", flush=True)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({listening, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await engine.runner.release_all()
        finish.set()
        with suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(listening, SHUTDOWN_SECONDS)
        stopping.cancel()
        await engine.stop()
        await services.close()
    if listening.done() and not listening.cancelled() and listening.exception() is not None:
        raise RuntimeError("the queue listener stopped") from listening.exception()
