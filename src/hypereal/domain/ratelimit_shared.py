"""One in-memory rate limiter for the server processes of ``hypereal serve --processes N``.

With several server processes on one machine and no Redis, the moving windows live in the
parent process (:class:`LimiterServer`, the same :class:`~hypereal.domain.ratelimit.RateLimiter`
a single process runs) and every server process asks it over a Unix socket
(:class:`LimiterClient`): the limit is exact across the processes, and each decision is the one
a single process would make. A hit is one line each way on a connection the process keeps
open; hits of one event-loop turn go out in one write, and their answers come back in one.

The protocol, one ASCII line per message (key ids are ``key_...`` tokens without spaces):
``<id> <key id> <limit>`` → ``<id> <1|0> <limit> <remaining> <reset unix time>``, and
``<id> reset`` → ``<id> ok``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from hypereal.domain.errors import HyperealError
from hypereal.domain.ratelimit import RateLimitDecision, RateLimiter

log = logging.getLogger("hypereal.ratelimit")

SCHEME = "hypereal+unix://"
T = TypeVar("T")


class LimiterUnavailable(HyperealError):
    """The shared rate limiter cannot be reached (its parent process is gone)."""

    status = 503


def socket_url(path: Path) -> str:
    """The rate-limit storage URL (``HYPEREAL_RATE_LIMIT_STORAGE_URL``) for a server's socket."""
    return SCHEME + str(path)


# ----------------------------------------------------------------------------- server


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, limiter: RateLimiter, connections: set[_ServerProtocol]) -> None:
        self.limiter = limiter
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)

    def data_received(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        if lines and self.transport is not None:
            # Answered here, in order, in one write: the in-memory limiter never waits.
            self.transport.write(
                b"".join(self._one(line.decode("ascii", "replace").split()) for line in lines)
            )

    def _one(self, parts: list[str]) -> bytes:
        if len(parts) == 2 and parts[1] == "reset":
            _run_now(self.limiter.reset())
            return f"{parts[0]} ok\n".encode()
        if len(parts) != 3 or not parts[2].isdigit():
            return f"{parts[0] if parts else '?'} error\n".encode()
        decision = _run_now(self.limiter.hit(parts[1], int(parts[2])))
        return (
            f"{parts[0]} {int(decision.allowed)} {decision.limit} {decision.remaining} "
            f"{decision.reset_time!r}\n"
        ).encode()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.connections.discard(self)


def _run_now(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (the in-memory limiter's), without a
    task or a turn of the event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coroutine.close()
    raise RuntimeError("the in-memory rate limiter suspended")


class LimiterServer:
    """The parent's limiter, served on a Unix socket from a thread of its own (the parent's
    main thread supervises the server processes)."""

    def __init__(self, path: Path, default_per_hour: int) -> None:
        self.path = path
        self.limiter = RateLimiter("async+memory://", default_per_hour)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerProtocol] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen on the socket (in a daemon thread); returns once it accepts connections."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def serve() -> None:
            loop = _new_loop()
            self._loop = loop
            try:
                # Kept: uvloop closes the socket of a server object that is collected.
                self._server = loop.run_until_complete(
                    loop.create_unix_server(
                        lambda: _ServerProtocol(self.limiter, self._connections), str(self.path)
                    )
                )
            except BaseException as exc:  # reported to start()'s caller
                failed.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=serve, name="hypereal-limiter", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    def stop(self) -> None:
        """Stop listening and close every connection (their processes see the loss)."""
        loop = self._loop
        if loop is not None and self._thread is not None and self._thread.is_alive():

            def close() -> None:
                if self._server is not None:
                    self._server.close()
                for protocol in list(self._connections):
                    if protocol.transport is not None:
                        protocol.transport.close()
                loop.call_soon(loop.stop)

            loop.call_soon_threadsafe(close)
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@contextlib.contextmanager
def serving(path: Path, default_per_hour: int) -> Iterator[LimiterServer]:
    server = LimiterServer(path, default_per_hour)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- client


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: LimiterClient) -> None:
        self.client = client
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            self.client._answered(line.decode("ascii").split())

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost()


class LimiterClient:
    """A server process's side: one connection, opened on first use and again after a loss."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Lock | None = None
        self._pending: dict[str, asyncio.Future[list[str]]] = {}
        self._outgoing: list[bytes] = []
        self._next_id = 0

    async def _connection(self) -> asyncio.Transport:
        if self._transport is not None:
            return self._transport
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._transport is None:
                loop = asyncio.get_running_loop()
                try:
                    transport, _ = await loop.create_unix_connection(
                        lambda: _ClientProtocol(self), self.path
                    )
                except OSError as exc:
                    log.error("the shared rate limiter at %s is unreachable: %s", self.path, exc)
                    raise LimiterUnavailable(
                        "Service unavailable: the rate limiter cannot be reached"
                    ) from exc
                self._transport = transport  # (uvloop's is no asyncio.Transport subclass)
            return self._transport

    async def _ask(self, message: str) -> list[str]:
        transport = await self._connection()
        self._next_id += 1
        request_id = str(self._next_id)
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush, transport)
        self._outgoing.append(f"{request_id} {message}\n".encode())
        try:
            return await future
        finally:
            self._pending.pop(request_id, None)

    def _flush(self, transport: asyncio.Transport) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if not transport.is_closing():
            transport.write(b"".join(outgoing))

    def _answered(self, parts: list[str]) -> None:
        future = self._pending.get(parts[0]) if parts else None
        if future is not None and not future.done():
            future.set_result(parts[1:])

    def _lost(self) -> None:
        self._transport = None
        self._outgoing = []
        for future in self._pending.values():
            if not future.done():
                future.set_exception(
                    LimiterUnavailable("Service unavailable: the rate limiter connection was lost")
                )

    async def hit(self, key_id: str, limit: int) -> RateLimitDecision:
        answer = await self._ask(f"{key_id} {limit}")
        if len(answer) != 4:
            raise LimiterUnavailable("Service unavailable: the rate limiter refused the request")
        allowed, answered_limit, remaining, reset_time = answer
        return RateLimitDecision(
            allowed=allowed == "1",
            limit=int(answered_limit),
            remaining=int(remaining),
            reset_time=float(reset_time),
        )

    async def reset(self) -> None:
        await self._ask("reset")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
