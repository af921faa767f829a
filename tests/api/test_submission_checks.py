"""What a request decides by itself is checked at submission, before any charge or costly
work: the balance for a chat turn's minimum charge before its prompt is tokenized, the
balance before input images are fetched, and an input image's dimensions (from its header,
no pixel decoded) before a job or an edit is charged."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from hypereal.app import create_app
from hypereal.domain import keys, ledger
from hypereal.media.images import header_size
from hypereal.services import Services
from tests.api.test_chat import bearer, make_services, new_key
from tests.conftest import MakeKey, auth
from tests.support.chat_backends import ScriptedChat


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20000) -> bytes:
    """A real decompression bomb: a 1-bit ``side`` x ``side`` PNG of zeros, a few dozen KiB
    that inflate to ``side`` squared pixels."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(bomb_png()).decode()


def test_header_size_reads_the_header_of_a_bomb_without_decoding_it() -> None:
    data = bomb_png(12000)  # 144M pixels: over the 40M default, under Pillow's own cap
    assert len(data) < 200_000
    assert header_size(data) == (12000, 12000)
    assert header_size(bomb_png(20000)) == (20000, 20000)  # over Pillow's own cap
    assert header_size(b"\x89PNG\r\n\x1a\nnot really") is None


async def _kinds(services: Services, key: str) -> list[str]:
    principal = await keys.authenticate(services.db, f"Bearer {key}")
    assert principal is not None
    return [entry.kind for entry in await ledger.entries(services.db, principal.account_id)]


@pytest.mark.parametrize(
    ("path", "model"),
    [("/v1/videos/generate", "camera-motion-i2v"), ("/api/v1/3d/generate", "relief-3d")],
)
async def test_a_decompression_bomb_on_a_job_is_a_400_at_submission_and_charges_nothing(
    client: httpx.AsyncClient,
    make_key: MakeKey,
    services: Services,
    bomb_uri: str,
    path: str,
    model: str,
) -> None:
    key = await make_key(credits=100)
    body = {"model": model, "input": {"prompt": "zoom in", "image": bomb_uri}}
    response = await client.post(path, json=body, headers=auth(key))
    assert response.status_code == 400, response.text
    assert "input.image" in response.json()["error"]
    assert "pixels" in response.json()["error"]
    assert await _kinds(services, key) == ["grant"]  # never debited
    listed = await client.get("/v1/jobs", headers=auth(key))
    assert listed.json()["data"] == []


@pytest.mark.parametrize("path", ["/v1/images/edit", "/api/v1/images/edit"])
async def test_a_decompression_bomb_on_an_image_edit_is_refused_before_any_charge(
    client: httpx.AsyncClient, make_key: MakeKey, services: Services, bomb_uri: str, path: str
) -> None:
    key = await make_key(credits=100)
    body = {"model": "image-transform", "prompt": "rotate 90", "image": bomb_uri}
    response = await client.post(path, json=body, headers=auth(key))
    assert response.status_code == 400, response.text
    assert "images[0]" in response.json()["error"]
    assert await _kinds(services, key) == ["grant"]  # no debit, no refund


async def test_an_image_over_the_configured_pixel_limit_is_refused_at_submission(
    tmp_path: Path,
) -> None:
    from hypereal.services import build_services
    from hypereal.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        max_input_pixels=100 * 100,
    )
    services = build_services(settings)
    await services.migrate()
    app = create_app(settings, services=services)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                account = await keys.create_account(services.db, "t")
                await ledger.grant(services.db, account, 100)
                key = (await keys.create_key(services.db, account)).secret
                png = bomb_png(101)  # 10,201 pixels: one row over
                uri = "data:image/png;base64," + base64.b64encode(png).decode()
                body = {"model": "image-transform", "prompt": "rotate 90", "image": uri}
                response = await client.post("/v1/images/edit", json=body, headers=auth(key))
                assert response.status_code == 400, response.text
                assert "101x101" in response.json()["error"]
                assert await ledger.balance(services.db, account) == 100
    finally:
        await services.close()


async def test_an_image_edit_without_the_balance_is_a_402_before_its_input_is_fetched(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = await make_key(credits=1)  # image-transform costs 2
    # A URL the SSRF guard refuses: fetched first, this would be its 400.
    body = {"model": "image-transform", "prompt": "rotate 90", "image": "http://10.1.2.3/a.png"}
    response = await client.post("/v1/images/edit", json=body, headers=auth(key))
    assert response.status_code == 402, response.text
    assert response.json() == {"error": "Insufficient credits", "required": 2, "available": 1}


@pytest.fixture
async def chat_client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    services = await make_services(tmp_path)
    app = create_app(services.settings, services=services)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield client, services
    finally:
        await services.close()


@pytest.mark.parametrize("path", ["/v1/chat", "/api/v1/chat/completions", "/v1/messages"])
async def test_a_0_credit_key_with_20000_messages_gets_its_402_without_tokenizing(
    chat_client: tuple[httpx.AsyncClient, Services], path: str
) -> None:
    client, services = chat_client
    key, account = await new_key(services, 0)
    messages = [{"role": "user", "content": "hi"} for _ in range(20_000)]
    before = ScriptedChat.counted.get("scripted", 0)
    body = {"model": "test-chat", "messages": messages, "max_tokens": 2, "stream": False}
    response = await client.post(path, headers=bearer(key), json=body)
    assert response.status_code == 402, response.text
    assert "40000" in response.text  # base_credits 2 x 20,000 messages
    assert ScriptedChat.counted.get("scripted", 0) == before  # never tokenized
    assert await ledger.balance(services.db, account) == 0


async def test_a_short_prompt_is_still_tokenized_then_refused_by_the_reservation(
    chat_client: tuple[httpx.AsyncClient, Services],
) -> None:
    client, services = chat_client
    key, _ = await new_key(services, 0)
    before = ScriptedChat.counted.get("scripted", 0)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": False}
    response = await client.post("/v1/chat", headers=bearer(key), json=body)
    assert response.status_code == 402
    assert ScriptedChat.counted.get("scripted", 0) == before + 1
