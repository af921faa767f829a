"""LeanCORSMiddleware answers exactly as Starlette's CORSMiddleware does, with and without an
``Origin`` header, and never changes a response object that is sent again."""

from __future__ import annotations

import pytest
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from hypereal.api.cors import LeanCORSMiddleware

OPTIONS = {
    "allow_origins": ["https://app.example"],
    "allow_methods": ["*"],
    "allow_headers": ["*"],
    "expose_headers": ["X-Request-Id"],
}


def _app(response: Response):  # type: ignore[no-untyped-def]
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await response(scope, receive, send)

    return app


async def _answer(
    middleware: type[CORSMiddleware], response: Response, headers: list[tuple[bytes, bytes]]
) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/credits",
        "headers": headers,
        "query_string": b"",
    }
    await middleware(_app(response), **OPTIONS)(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    "request_headers",
    [
        [(b"authorization", b"Bearer ck_x")],
        [(b"origin", b"https://app.example")],
        [(b"origin", b"https://elsewhere.example")],
    ],
)
@pytest.mark.parametrize(
    "vary", [[], [(b"vary", b"Accept-Encoding")], [(b"vary", b"A"), (b"vary", b"B")]]
)
async def test_the_same_answer_as_starlettes(
    request_headers: list[tuple[bytes, bytes]], vary: list[tuple[bytes, bytes]]
) -> None:
    def response() -> Response:
        built = Response(b"{}", media_type="application/json")
        built.raw_headers.extend(vary)
        return built

    ours = await _answer(LeanCORSMiddleware, response(), request_headers)
    theirs = await _answer(CORSMiddleware, response(), request_headers)
    assert ours == theirs
    assert any(name == b"vary" and value.endswith(b"Origin") for name, value in ours[0]["headers"])


async def test_a_response_sent_twice_is_not_changed() -> None:
    shared = Response(b"{}", media_type="application/json")
    before = list(shared.raw_headers)
    first = await _answer(LeanCORSMiddleware, shared, [])
    second = await _answer(LeanCORSMiddleware, shared, [])
    assert shared.raw_headers == before
    assert first[0]["headers"] == second[0]["headers"]
    assert [value for name, value in second[0]["headers"] if name == b"vary"] == [b"Origin"]
