"""The lean endpoint path (api/routing.py) answers exactly as FastAPI's own handler does:
the same requests, good and bad, sent to the app with and without it, get the same status,
headers and body (ids and times aside), and the hot routes do take it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from hypereal.api.routing import IndexedRouter, LeanEndpoint
from hypereal.app import create_app
from hypereal.services import Services
from tests.conftest import MakeKey

VOLATILE = {"id", "jobId", "created", "createdAt", "updatedAt", "requestId", "url", "outputUrl"}


async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


@pytest.fixture
async def both(services: Services) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    lean_app = create_app(services.settings, services=services, lifespan_hooks=())
    plain_app = create_app(services.settings, services=services, lifespan_hooks=())
    assert isinstance(plain_app.router, IndexedRouter)
    plain_app.router.lean_endpoints = False
    async for lean in _client(lean_app):
        async for plain in _client(plain_app):
            yield lean, plain


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<v>" if k in VOLATILE else _stable(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _answer(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {
        k: v
        for k, v in response.headers.items()
        if k not in ("date", "x-ratelimit-reset", "x-ratelimit-remaining", "x-request-id")
    }
    try:
        body: Any = _stable(response.json())
    except json.JSONDecodeError:
        body = response.text
    return response.status_code, headers, body


JSON = {"content-type": "application/json"}


def _cases(key: str, poor: str) -> list[tuple[str, str, dict[str, str], bytes | None]]:
    auth = {"authorization": f"Bearer {key}", **JSON}
    broke = {"authorization": f"Bearer {poor}", **JSON}
    chat = {"model": "test-chat", "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[str, str, dict[str, str], bytes | None]] = []
    for prefix in ("/v1", "/api/v1"):
        cases += [
            ("GET", f"{prefix}/credits", auth, None),
            ("GET", f"{prefix}/credits", {}, None),
            ("POST", f"{prefix}/chat/completions", auth, b""),
            ("POST", f"{prefix}/chat/completions", auth, b"{not json"),
            ("POST", f"{prefix}/chat/completions", auth, b"[1, 2]"),
            ("POST", f"{prefix}/chat/completions", auth, b'"text"'),
            ("POST", f"{prefix}/chat/completions", auth, b'{"messages": "x"}'),
            (
                "POST",
                f"{prefix}/chat/completions",
                auth,
                json.dumps({**chat, "stream": "no"}).encode(),
            ),
            (
                "POST",
                f"{prefix}/chat/completions",
                auth,
                json.dumps({**chat, "max_tokens": 0}).encode(),
            ),
            (
                "POST",
                f"{prefix}/chat/completions",
                {**auth, "content-type": "text/plain"},
                json.dumps(chat).encode(),
            ),
            (
                "POST",
                f"{prefix}/chat/completions",
                {**auth, "content-type": "application/vnd.x+json"},
                json.dumps({**chat, "model": "nope"}).encode(),
            ),
            ("POST", f"{prefix}/chat/completions", broke, json.dumps(chat).encode()),
            (
                "POST",
                f"{prefix}/chat",
                auth,
                json.dumps({**chat, "model": "unknown-model"}).encode(),
            ),
            ("POST", f"{prefix}/images/generate", auth, b'{"prompt": 5}'),
            ("POST", f"{prefix}/images/generate", auth, b'{"model": "nope", "prompt": "x"}'),
            ("POST", f"{prefix}/videos/generate", auth, b'{"model": "nope"}'),
            ("POST", f"{prefix}/videos/generate", broke, b"{}"),
            ("POST", f"{prefix}/3d/generate", auth, b"null"),
            ("POST", f"{prefix}/audio/generate", auth, b'{"model": 1}'),
            ("POST", f"{prefix}/webhooks/secret/rotate", {}, None),
        ]
    return cases


async def test_lean_and_fastapi_handlers_answer_alike(
    both: tuple[httpx.AsyncClient, httpx.AsyncClient], make_key: MakeKey
) -> None:
    lean, plain = both
    key, poor = await make_key(credits=1000), await make_key(credits=0)
    for method, path, headers, content in _cases(key, poor):
        got = _answer(await lean.request(method, path, headers=headers, content=content))
        want = _answer(await plain.request(method, path, headers=headers, content=content))
        assert got == want, (method, path, content)
        assert got[0] != 500, (method, path, content)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat"),
        ("POST", "/v1/spicy-chat"),
        ("GET", "/v1/credits"),
        ("POST", "/v1/images/generate"),
        ("POST", "/v1/videos/generate"),
        ("POST", "/api/v1/3d/generate"),
        ("POST", "/v1/messages"),
    ],
)
async def test_hot_routes_take_the_lean_path(services: Services, method: str, path: str) -> None:
    app = create_app(services.settings, services=services, lifespan_hooks=())
    routes = [
        r
        for r in app.router.routes
        if isinstance(r, APIRoute) and r.path == path and method in r.methods
    ]
    assert len(routes) == 1
    assert LeanEndpoint.build(routes[0]) is not None
