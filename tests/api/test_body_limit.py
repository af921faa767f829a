"""The overall request body limit (HYPEREAL_MAX_REQUEST_BYTES), on the real app served by
uvicorn on 127.0.0.1: a declared Content-Length over it and a chunked body that grows past it
are both a JSON 413, nothing is charged, and bodies within it are served as usual."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from hypereal.app import create_app
from hypereal.domain import keys, ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.servers import serve_app

LIMIT = 4096


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        max_request_bytes=LIMIT,
    )
    services = build_services(settings)
    await services.migrate()
    yield services
    await services.close()


@pytest.fixture
def base_url(services: Services) -> Iterator[str]:
    with serve_app(create_app(services.settings, services=services)) as url:
        yield url


async def user(services: Services, credits: int) -> tuple[dict[str, str], str]:
    account = await keys.create_account(services.db, "body-limit")
    await ledger.grant(services.db, account, credits)
    key = (await keys.create_key(services.db, account)).secret
    return {"Authorization": f"Bearer {key}"}, account


def png_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def edit_body(padding: int) -> bytes:
    """A valid local edit request, padded with an ignored field to the size wanted."""
    body = {"prompt": "upscale 2x", "model": "image-transform", "image": png_uri()}
    body["pad"] = "x" * padding
    return json.dumps(body).encode()


async def chunks(body: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def balance(services: Services, account: str) -> int:
    return await ledger.balance(services.db, account)


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_declared_length_over_the_limit_is_413(
    services: Services, base_url: str, prefix: str
) -> None:
    headers, account = await user(services, 10)
    body = edit_body(LIMIT)
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post(
            f"{prefix}/images/generate",
            headers={**headers, "Content-Type": "application/json"},
            content=body,
        )
    assert response.status_code == 413
    assert response.json() == {"error": f"Request body too large: the limit is {LIMIT} bytes"}
    assert await balance(services, account) == 10


async def test_declared_length_is_refused_before_authentication(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post("/v1/images/generate", content=b"{" + b" " * LIMIT + b"}")
    assert response.status_code == 413
    assert response.json()["error"].startswith("Request body too large")


async def test_chunked_body_growing_past_the_limit_is_413(
    services: Services, base_url: str
) -> None:
    headers, account = await user(services, 10)
    body = edit_body(LIMIT)
    async with httpx.AsyncClient(base_url=base_url) as http:
        # A generator body is sent chunked: no Content-Length to judge up front.
        request = http.build_request(
            "POST",
            "/v1/images/generate",
            headers={**headers, "Content-Type": "application/json"},
            content=chunks(body),
        )
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        response = await http.send(request)
    assert response.status_code == 413
    assert response.json() == {"error": f"Request body too large: the limit is {LIMIT} bytes"}
    assert await balance(services, account) == 10


@pytest.mark.parametrize("chunked", [False, True])
async def test_bodies_within_the_limit_are_served(
    services: Services, base_url: str, chunked: bool
) -> None:
    headers, account = await user(services, 10)
    body = edit_body(LIMIT - 600)
    assert len(body) <= LIMIT
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post(
            "/v1/images/generate",
            headers={**headers, "Content-Type": "application/json"},
            content=chunks(body) if chunked else body,
        )
    assert response.status_code == 200, response.text
    assert response.json()["creditsUsed"] == 2
    assert await balance(services, account) == 8


def test_default_leaves_room_for_a_data_uri_image_at_the_fetch_cap() -> None:
    settings = Settings()
    encoded = (settings.fetch_max_bytes + 2) // 3 * 4 + len("data:image/png;base64,")
    assert settings.max_request_bytes > encoded + 64 * 1024
