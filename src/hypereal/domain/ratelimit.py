"""Per-key rate limits on a rolling hour (``limits`` moving window; memory or Redis).

Several server processes of one ``hypereal serve --processes N`` share one in-memory limiter kept
by their parent (a ``hypereal+unix://`` storage URL, see ``ratelimit_shared.py``)."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from limits import RateLimitItemPerHour
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

if TYPE_CHECKING:
    from hypereal.domain.ratelimit_shared import LimiterClient

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
    """limits' in-process storage with its moving windows kept as deques of hit times.

    The library keeps a key's hits in a list, newest first, and inserts each hit at the
    front: a copy of the whole list per hit, and a key allowed a million requests an hour
    holds up to a million entries. It also starts an expiry task after almost every hit that
    hops to a worker thread (a thread hop per request, and the loop then waited for the GIL
    behind it). Here a hit is an ``appendleft``, hits that left the window are dropped from
    the old end as they are met, and idle keys are swept inline at most once a second. The
    answers are the library's: the same window start and count, the same refusals. Fixed
    windows (``incr``) stay the library's, with the same once-a-second expiry."""

    EXPIRE_EVERY_SECONDS = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._next_expiry = 0.0
        self.windows: dict[str, deque[float]] = {}  # hit times, newest first

    # Overrides the library's private ``__schedule_expiry`` (name-mangled in its class).
    async def _MemoryStorage__schedule_expiry(self) -> None:
        self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + self.EXPIRE_EVERY_SECONDS
            self._expire(time.time())

    def _expire(self, now: float) -> None:
        """Drop every key whose hits all left their window (an hour) and expired counters."""
        for key in [k for k, hits in self.windows.items() if not hits or hits[0] < now - 3600]:
            del self.windows[key]
        for key in [k for k, expires in self.expirations.items() if expires <= now]:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)
            self.locks.pop(key, None)

    def _window(self, key: str, start: float) -> deque[float]:
        hits = self.windows.get(key)
        if hits is None:
            hits = self.windows[key] = deque()
        while hits and hits[-1] < start:  # the oldest hits left the window
            hits.pop()
        return hits

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        self._sweep()
        now = time.time()
        hits = self._window(key, now - expiry)
        if len(hits) + amount > limit:
            return False
        hits.extendleft([now] * amount)
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        start = now - expiry
        hits = self._window(key, start)
        # As the library counts here: a hit exactly ``expiry`` old is out of the window
        # (while acquire_entry still counts it in).
        edge = 0
        while edge < len(hits) and hits[-1 - edge] == start:
            edge += 1
        if edge == len(hits):
            return now, 0
        return hits[-1 - edge], len(hits) - edge

    async def clear(self, key: str) -> None:
        await super().clear(key)
        self.windows.pop(key, None)

    async def reset(self) -> int | None:
        cleared = await super().reset()
        cleared = max(cleared or 0, len(self.windows))
        self.windows.clear()
        return cleared


class RateLimiter:
    """Counts requests per API key in a moving one-hour window."""

    def __init__(self, storage_url: str, default_per_hour: int) -> None:
        self.default_per_hour = default_per_hour
        self.shared: LimiterClient | None = None
        if storage_url.startswith("hypereal+unix://"):
            from hypereal.domain.ratelimit_shared import SCHEME, LimiterClient

            self.shared = LimiterClient(storage_url.removeprefix(SCHEME))
            storage_url = "async+memory://"  # unused: every hit goes to the shared limiter
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

    async def hit(self, key_id: str, per_hour: int | None = None) -> RateLimitDecision:
        """Record one request for ``key_id`` unless its window is full."""
        limit = per_hour if per_hour is not None else self.default_per_hour
        if self.shared is not None:
            return await self.shared.hit(key_id, limit)
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
        if self.shared is not None:
            await self.shared.reset()
        else:
            await self.storage.reset()

    def close(self) -> None:
        """Close the connection to a shared limiter (nothing to do for the others)."""
        if self.shared is not None:
            self.shared.close()
