"""CoalescingTransport (api/http_protocol.py): the writes of one event-loop turn leave as one
write, in order; close sends what is pending first; abort drops it."""

from __future__ import annotations

import asyncio
from typing import cast

from hypereal.api.http_protocol import CoalescingTransport


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


async def test_writes_of_one_turn_leave_as_one() -> None:
    raw = Recording()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"")
    transport.write(bytearray(b"ok"))
    assert raw.writes == []  # nothing sent within the turn
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    transport.writelines([b"a", b"b"])
    await asyncio.sleep(0)
    transport.write(b"c")
    await asyncio.sleep(0)
    assert raw.writes[1:] == [b"ab", b"c"]
    assert transport.is_closing() is False  # the rest is the wrapped transport's


async def test_close_sends_pending_writes_first_and_abort_drops_them() -> None:
    raw = Recording()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"last words")
    transport.close()
    assert raw.writes == [b"last words"] and raw.closed
    await asyncio.sleep(0)
    assert raw.writes == [b"last words"]  # the scheduled flush finds nothing left

    raw = Recording()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"too late")
    raw.closed = True  # the connection closed under the pending write (the client left)
    await asyncio.sleep(0)
    assert raw.writes == []  # dropped: uvloop's transport would raise on it

    raw = Recording()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())
    transport.write(b"never")
    transport.abort()
    await asyncio.sleep(0)
    assert raw.writes == [] and raw.aborted
    assert cast(Recording, transport._transport) is raw
