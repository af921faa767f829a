"""Slow clients against a real `hypereal serve` on 127.0.0.1: a client that trickles its
headers or its body, or connects and sends nothing, is dropped once
HYPEREAL_REQUEST_READ_TIMEOUT_SECONDS pass (a 408 while the headers are incomplete), and
other clients are served meanwhile; a kept-alive connection gets a new deadline per request."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from hypereal.api.http_protocol import with_read_timeout
from tests.engine.test_distributed import HYPEREAL, create_key, process
from tests.support.servers import free_port

READ_TIMEOUT = 1.0
# How slowly the slow clients send: one byte per PACE seconds, for at most MAX_BYTES bytes
# (ten times the deadline); a server without a deadline never closes them.
PACE = 0.25
MAX_BYTES = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, str]]:
    """The server's address and an API key."""
    tmp_path = tmp_path_factory.mktemp("slow")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HYPEREAL_")},
        "HYPEREAL_DATA_DIR": str(tmp_path / "data"),
        "HYPEREAL_BOOTSTRAP_ADMIN": "false",
        "HYPEREAL_REQUEST_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
    }
    args = [HYPEREAL, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with process(args, env, tmp_path / "serve.log") as proc:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield "127.0.0.1", port, create_key(env, credits=0)


def address(server: tuple[str, int, str]) -> tuple[str, int]:
    return server[0], server[1]


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def trickle(address: tuple[str, int], head: bytes, slow: bytes) -> bytes | None:
    """Send ``head`` at once, then ``slow`` one byte per PACE seconds; what the server sent
    before it closed the connection, or None if it was still open after MAX_BYTES bytes."""
    with socket.create_connection(address) as sock:
        sock.sendall(head)
        for byte in slow[:MAX_BYTES]:
            readable, _, _ = select.select([sock], [], [], PACE)
            if readable:
                return read_until_closed(sock)
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return read_until_closed(sock)
        return None


def test_a_client_trickling_its_headers_gets_a_408_and_is_dropped(
    server: tuple[str, int, str],
) -> None:
    answer = trickle(address(server), b"GET /health HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100)
    assert answer is not None, "the connection was still open"
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b'{"error": "Request timeout: the request was not received in time"}')


def test_a_client_trickling_its_body_is_dropped(server: tuple[str, int, str]) -> None:
    # An authorised request, so that the app waits for its body.
    head = (
        b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + server[2].encode() + b"\r\nContent-Length: 200\r\n\r\n"
    )
    answer = trickle(address(server), head, b" " * 200)
    assert answer is not None, "the connection was still open"
    assert answer == b""  # the app had the request (it sees the client go): no answer


def test_a_client_that_sends_nothing_is_dropped(server: tuple[str, int, str]) -> None:
    with socket.create_connection(address(server)) as sock:
        readable, _, _ = select.select([sock], [], [], READ_TIMEOUT * 10)
        assert readable, "the connection was still open"
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_kept_alive_connection_has_a_deadline_per_request(server: tuple[str, int, str]) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
    with socket.create_connection(address(server)) as sock:
        for _ in range(2):  # requests sent at once are each answered
            sock.sendall(request)
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        # Then the next request, trickled, is dropped.
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for byte in (b"X-Slow: " + b"a" * 100)[:MAX_BYTES]:
            readable, _, _ = select.select([sock], [], [], PACE)
            if readable:
                break
            sock.sendall(bytes([byte]))
        else:
            pytest.fail("the connection was still open")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_slow_clients_do_not_hold_up_the_others(server: tuple[str, int, str]) -> None:
    """Ten connections trickling headers; other clients are answered meanwhile, and each slow
    one is dropped."""
    slow = [socket.create_connection(address(server)) for _ in range(10)]
    try:
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        base = "http://{}:{}".format(*address(server))
        for _ in range(5):
            assert httpx.get(f"{base}/health").status_code == 200
        closed: set[socket.socket] = set()
        for _ in range(MAX_BYTES):
            readable, _, _ = select.select([s for s in slow if s not in closed], [], [], PACE)
            for sock in readable:
                assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
                closed.add(sock)
            if len(closed) == len(slow):
                break
            for sock in slow:
                if sock not in closed:
                    sock.sendall(b"a")
        assert len(closed) == len(slow), "slow connections were still open"
    finally:
        for sock in slow:
            sock.close()


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False
        self.closed_event = asyncio.Event()
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True
        self.closed_event.set()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def test_time_the_server_is_not_reading_does_not_count_against_the_client() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("no request is complete")

    protocol = with_read_timeout(0.05)(
        config=uvicorn.Config(app, lifespan="off"), server_state=ServerState(), app_state={}
    )
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.flow.pause_reading()  # e.g. a pipelined request waiting for the one before it
    await asyncio.sleep(0.3)
    assert not transport.closed
    protocol.flow.resume_reading()
    await asyncio.wait_for(transport.closed_event.wait(), 5)
    assert transport.written.startswith(b"HTTP/1.1 408 ")
