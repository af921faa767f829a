"""Pass-through to a hosted Hypereal account (a ``pass_through`` model pattern), end to end over
real HTTP against the fake account: an unknown slug is forwarded under its own name, the
pattern's ``max_credits`` is reserved, and the charge settles to the account's ``creditsUsed``
x ``markup`` (rounded up) for chat, images and jobs; the ledger agrees with what is reported."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hypereal.domain import ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.app import app_client, bearer, funded_key
from tests.support.hypereal_server import HyperealFake
from tests.support.sample_media import image_bytes
from tests.support.servers import serve_app

MARKUP = 1.5
PATTERNS: list[dict[str, Any]] = [
    {
        "pattern": "img-*",
        "backend": "hosted",
        "template": "image-t2i",
        "pass_through": {"max_credits": 30, "markup": MARKUP},
    },
    {
        "pattern": "vid-*",
        "backend": "hosted",
        "template": "video-i2v",
        "pass_through": {"max_credits": 200, "markup": MARKUP},
    },
    {"pattern": "*", "backend": "hosted", "pass_through": {"max_credits": 50, "markup": MARKUP}},
]


@pytest.fixture
def hosted() -> Iterator[HyperealFake]:
    fake = HyperealFake(prices={"chat": 2, "image": 5, "video": 69, "audio": 7, "3d": 45})
    with serve_app(fake.app) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake


@pytest.fixture
async def services(tmp_path: Path, hosted: HyperealFake) -> AsyncIterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        backends={
            "hosted": {
                "type": "hypereal",
                "api_key": hosted.api_key,
                "base_url": hosted.url,  # type: ignore[attr-defined]
                "poll_interval": 0.01,
            }
        },
        model_patterns=PATTERNS,
    )
    services = build_services(settings)
    await services.migrate()
    yield services
    await services.close()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(services) as c:
        yield c


async def account(services: Services, credits: int = 1000) -> tuple[str, dict[str, str]]:
    secret, account_id = await funded_key(services, credits, "pass-through")
    return account_id, bearer(secret)


async def test_chat_settles_to_the_upstream_bill_times_markup(
    client: httpx.AsyncClient, services: Services, hosted: HyperealFake
) -> None:
    account_id, headers = await account(services)
    body = {"model": "brand-new-llm", "messages": [{"role": "user", "content": "hi"}]}
    answer = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert hosted.submissions[-1].body["model"] == "brand-new-llm"
    assert await ledger.balance(services.db, account_id) == 1000 - 3  # 2 x 1.5
    streamed = await client.post(
        "/v1/chat/completions", json={**body, "stream": True}, headers=headers
    )
    assert streamed.status_code == 200
    assert "data: [DONE]" in streamed.text
    assert await ledger.balance(services.db, account_id) == 1000 - 6


async def test_a_short_balance_is_402_against_the_maximum(
    client: httpx.AsyncClient, services: Services
) -> None:
    _, headers = await account(services, credits=10)
    body = {"model": "brand-new-llm", "messages": [{"role": "user", "content": "hi"}]}
    answer = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert answer.status_code == 402


async def test_images_settle_to_the_upstream_bill_times_markup(
    client: httpx.AsyncClient, services: Services, hosted: HyperealFake
) -> None:
    account_id, headers = await account(services)
    body = {"model": "img-future-2", "prompt": "a fox"}
    answer = await client.post("/v1/images/generate", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["creditsUsed"] == 8  # 5 x 1.5, rounded up
    assert hosted.submissions[-1].body["model"] == "img-future-2"
    assert await ledger.balance(services.db, account_id) == 1000 - 8


async def test_jobs_reserve_the_maximum_and_settle_when_they_end(
    client: httpx.AsyncClient, services: Services, hosted: HyperealFake
) -> None:
    account_id, headers = await account(services)
    image = "data:image/png;base64," + base64.b64encode(image_bytes(8, 8, "png")).decode()
    body = {"model": "vid-next-1", "input": {"image": image, "prompt": "waves"}}
    accepted = await client.post("/v1/videos/generate", json=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["creditsUsed"] == 200  # reserved
    async with asyncio.timeout(30):
        while True:
            job = (await client.get(f"/v1/jobs/{accepted.json()['jobId']}", headers=headers)).json()
            if job["status"] != "processing":
                break
            await asyncio.sleep(0.02)
    assert job["status"] == "completed", job
    assert job["creditsUsed"] == 104  # 69 x 1.5, rounded up
    assert await ledger.balance(services.db, account_id) == 1000 - 104


async def test_models_shows_the_pass_through_rule(
    client: httpx.AsyncClient, services: Services
) -> None:
    _, headers = await account(services)
    listed = (await client.get("/v1/models", headers=headers)).json()["data"]
    catch_all = next(m for m in listed if m["id"] == "*")
    assert catch_all["pattern"] is True
    assert catch_all["price"] == {"kind": "pass_through", "max_credits": 50, "markup": MARKUP}
