"""Per-key rate limits on a rolling hour (``limits`` moving window; memory or Redis)."""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerHour
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

WINDOW_SECONDS = 3600


@dataclass(frozen=True)
class RateLimitDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_time: float  # unix time when a slot frees up (the oldest hit leaves the window)

    @property
    def reset_at(self) -> int:
        """``reset_time`` rounded up to whole unix seconds (the X-RateLimit-Reset header)."""
        return math.ceil(self.reset_time)

    @property
    def retry_after(self) -> int:
        """Whole seconds to wait, from the raw reset time (rounding twice could give 3601);
        never more than the window, even with a storage clock slightly ahead of ours."""
        return min(WINDOW_SECONDS, max(1, math.ceil(self.reset_time - time.time())))

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_at),
        }


class _MemoryStorage(MemoryStorage):
    """limits' in-process storage, with its expiry of old hits run at most once a second,
    inline on the event loop.

    The library starts an expiry task after almost every hit, and that task hops to a
    worker thread per key to find the cut-off: a thread hop per request, and the loop then
    waited for the GIL behind the thread (the largest single cost of a chat request in
    the bench's profile). The cut-off is a bisection of an ordered list: microseconds."""

    EXPIRE_EVERY_SECONDS = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._next_expiry = 0.0

    # Overrides the library's private ``__schedule_expiry`` (name-mangled in its class).
    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + self.EXPIRE_EVERY_SECONDS
            self._expire(time.time())

    def _expire(self, now: float) -> None:
        for key in list(self.events):
            events = self.events[key]  # newest first
            cutoff = bisect.bisect_left(events, -now, key=lambda event: -event.expiry)
            if cutoff:
                del events[cutoff:]
            else:
                del self.events[key]
                self.locks.pop(key, None)
        for key in [k for k, expires in self.expirations.items() if expires <= now]:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)
            self.locks.pop(key, None)


class RateLimiter:
    """Counts requests per API key in a moving one-hour window."""

    def __init__(self, storage_url: str, default_per_hour: int) -> None:
        options: dict[str, object] = {}
        if storage_url.startswith("async+redis"):
            import redis.asyncio

            # A blocking pool: under a burst, callers wait for a connection instead of
            # failing with "Too many connections".
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                storage_url.removeprefix("async+"), max_connections=200, timeout=30
            )
            options = {"implementation": "redispy", "connection_pool": pool}
        self.storage: Storage
        if storage_url.startswith("async+memory://"):
            self.storage = _MemoryStorage()
        else:
            self.storage = storage_from_string(storage_url, **options)  # type: ignore[arg-type,assignment]
        self.strategy = MovingWindowRateLimiter(self.storage)
        self.default_per_hour = default_per_hour

    async def hit(self, key_id: str, per_hour: int | None = None) -> RateLimitDecision:
        """Record one request for ``key_id`` unless its window is full."""
        limit = per_hour if per_hour is not None else self.default_per_hour
        item = RateLimitItemPerHour(limit)
        allowed = await self.strategy.hit(item, "key", key_id)
        stats = await self.strategy.get_window_stats(item, "key", key_id)
        return RateLimitDecision(
            allowed=allowed,
            limit=limit,
            remaining=max(0, stats.remaining),
            reset_time=stats.reset_time,
        )

    async def reset(self) -> None:
        await self.storage.reset()
