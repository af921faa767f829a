"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load generator.

httpx costs far more CPU per request than the servers measured here (on 2 cores it became the
bottleneck: ~130 req/s at concurrency 64 against a mock that serves 1,500+), so the load
generator speaks HTTP itself: one connection per worker, ``Content-Length`` and chunked bodies,
and a callback that sees a streamed body piece by piece as it arrives (for SSE timings).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive connection to ``http://host:port``; reconnects when the server closed."""

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        on_data: Callable[[bytes], None] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; returns (status, lower-cased headers, body). With ``on_data`` the
        body is handed over piece by piece as it arrives and the returned body is empty."""
        async with asyncio.timeout(self.timeout):
            return await self._request(method, path, headers or {}, body, on_data)

    async def _request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        on_data: Callable[[bytes], None] | None,
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        response_headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                response_headers[name.strip().lower()] = value.strip()
        pieces: list[bytes] = []
        sink = on_data or pieces.append
        if response_headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers expected
                    break
                sink(await reader.readexactly(size))
                await reader.readexactly(2)
        elif "content-length" in response_headers:
            length = int(response_headers["content-length"])
            if length:
                sink(await reader.readexactly(length))
        elif status not in (204, 304) and method != "HEAD":
            sink(await reader.read())  # until the server closes
            await self.close()
        if response_headers.get("connection", "").lower() == "close":
            await self.close()
        return status, response_headers, b"".join(pieces)
