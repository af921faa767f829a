"""A deadline for reading each request, for ``hypereal serve``.

uvicorn bounds how long an idle kept-alive connection stays open (``timeout_keep_alive``) but
not how slowly a client may send a request: a connection that sends one header byte every
few seconds, or a body a byte at a time, or nothing at all after connecting, stays open for
ever (slowloris). :class:`RequestReadTimeoutProtocol` is uvicorn's httptools protocol with
one timer per request: it starts when the connection opens (or, on a kept-alive connection,
at the first byte of the next request) and is cancelled once the whole request, headers and
body, has arrived. When it fires first the connection is closed: with a JSON 408 when the
headers were not complete (no request was handed to the app), silently otherwise (the app
sees the client disconnect). Time while the server itself has stopped reading the connection
(flow control) does not count against the client. Other connections are not affected.

The protocol also writes through :class:`CoalescingTransport`: uvicorn writes a response's
status line and headers and then its body as two writes, two system calls and two TCP
segments on a kept-alive connection; writes made in one turn of the event loop go out as one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_MESSAGE = json.dumps({"error": "Request timeout: the request was not received in time"})
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_MESSAGE)).encode() + b"\r\n"
    b"connection: close\r\n"
    b"\r\n" + _MESSAGE.encode()
)


class CoalescingTransport:
    """A transport whose writes of one event-loop turn are sent as one write, at the end of
    the turn (``call_soon``); ``close`` sends what is pending first, ``abort`` drops it.
    Everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending = self._pending
        if pending:
            self._pending = []
            # The connection may have closed since the writes (the client left): uvloop's
            # transport raises on a write then, asyncio's ignores it. Nobody reads them now.
            if not self._transport.is_closing():
                self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class RequestReadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline of ``read_timeout`` seconds for each
    request to arrive whole (see the module doc). Use :func:`with_read_timeout`."""

    read_timeout: float = 60.0
    _read_timer: asyncio.TimerHandle | None = None
    _headers_done = False

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = cast(asyncio.Transport, CoalescingTransport(transport, self.loop))
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_done = False
        self._arm()

    def on_headers_complete(self) -> None:
        self._headers_done = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            # The server stopped reading (a pipelined request waits for the one before it,
            # or the app has not taken the body buffered so far): not the client's delay.
            self._arm()
            return
        if not self._headers_done:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def with_read_timeout(seconds: float) -> type[RequestReadTimeoutProtocol]:
    """The protocol class to give uvicorn (``http=``) for a deadline of ``seconds``."""

    class Protocol(RequestReadTimeoutProtocol):
        read_timeout = seconds

    return Protocol
