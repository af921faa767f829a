"""Wildcard model routing end to end: ``model_patterns`` in the settings route slugs no model
has to an OpenAI-compatible upstream (``anthropic/{slug}``) or to a hosted Hypereal account
(the slug itself), over real HTTP to the fakes; a pattern job runs in the worker; patterns are
listed as such by /v1/models; a pattern whose backend is not configured answers 503."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.app import app_client, bearer, funded_key
from tests.support.hypereal_server import HyperealFake
from tests.support.openai_server import OpenAIFake
from tests.support.sample_media import image_bytes
from tests.support.servers import serve_app

CHAT_PRICE = {"base_credits": 1, "input_usd_per_million": 1.0, "output_usd_per_million": 1.0}
PATTERNS: list[dict[str, Any]] = [
    {
        "pattern": "claude-*",
        "backend": "openrouter",
        "upstream_model": "anthropic/{slug}",
        "price": CHAT_PRICE,
    },
    {"pattern": "veo-*", "backend": "hypereal", "template": "video-i2v", "price": {"credits": 9}},
    {"pattern": "mistral-*", "backend": "nowhere", "price": CHAT_PRICE},
    {"pattern": "*", "backend": "hypereal", "price": CHAT_PRICE},
]


@pytest.fixture
def hosted() -> Iterator[tuple[HyperealFake, str]]:
    fake = HyperealFake()
    with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
def openrouter() -> Iterator[tuple[OpenAIFake, str]]:
    fake = OpenAIFake()
    with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
async def services(
    tmp_path: Path, hosted: tuple[HyperealFake, str], openrouter: tuple[OpenAIFake, str]
) -> AsyncIterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        backends={
            "hypereal": {
                "type": "hypereal",
                "api_key": hosted[0].api_key,
                "base_url": hosted[1],
                "poll_interval": 0.01,
            },
            "openrouter": {
                "type": "openai",
                "api_key": "sk-test",
                "base_url": openrouter[1] + "/v1",
            },
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


async def auth(services: Services) -> dict[str, str]:
    return bearer((await funded_key(services, 1000, "patterns"))[0])


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


async def test_slugs_route_by_pattern_to_their_upstreams(
    client: httpx.AsyncClient,
    services: Services,
    hosted: tuple[HyperealFake, str],
    openrouter: tuple[OpenAIFake, str],
) -> None:
    headers = await auth(services)
    answer = await client.post("/v1/chat/completions", json=chat("claude-haiku-9"), headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "claude-haiku-9"
    assert openrouter[0].requests[-1].body["model"] == "anthropic/claude-haiku-9"
    answer = await client.post("/v1/chat/completions", json=chat("qwen-next-72b"), headers=headers)
    assert answer.status_code == 200, answer.text
    assert hosted[0].submissions[-1].body["model"] == "qwen-next-72b"
    # The exact slug is served by its own entry (hosted, under its own name), not the pattern.
    answer = await client.post(
        "/v1/chat/completions", json=chat("claude-opus-4-7"), headers=headers
    )
    assert answer.status_code == 200, answer.text
    assert hosted[0].submissions[-1].body["model"] == "claude-opus-4-7"


async def test_a_pattern_video_job_runs_in_the_worker(
    client: httpx.AsyncClient, services: Services, hosted: tuple[HyperealFake, str]
) -> None:
    headers = await auth(services)
    image = "data:image/png;base64," + base64.b64encode(image_bytes(8, 8, "png")).decode()
    body = {"model": "veo-9-i2v", "input": {"image": image, "prompt": "waves"}}
    accepted = await client.post("/v1/videos/generate", json=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["creditsUsed"] == 9
    async with asyncio.timeout(30):
        while True:
            job = (await client.get(f"/v1/jobs/{accepted.json()['jobId']}", headers=headers)).json()
            if job["status"] != "processing":
                break
            await asyncio.sleep(0.02)
    assert job["status"] == "completed", job
    assert hosted[0].submissions[-1].body["model"] == "veo-9-i2v"
    # The catch-all is a chat pattern: it does not make an unknown video slug valid.
    body = {"model": "kling-3-0-i2v-pro", "input": {"image": image}}
    refused = await client.post("/v1/videos/generate", json=body, headers=headers)
    assert refused.status_code == 400


async def test_models_lists_patterns_as_such(client: httpx.AsyncClient, services: Services) -> None:
    headers = await auth(services)
    listed = (await client.get("/v1/models", headers=headers)).json()["data"]
    patterns = {m["id"]: m for m in listed if m.get("pattern")}
    assert list(patterns) == ["claude-*", "veo-*", "mistral-*", "*"]
    assert patterns["claude-*"]["upstreamModel"] == "anthropic/{slug}"
    assert patterns["claude-*"]["available"] is True
    assert patterns["claude-*"]["backend"] == "openrouter"
    assert patterns["veo-*"]["modality"] == "video"
    assert patterns["mistral-*"]["available"] is False
    one = await client.get("/v1/models/claude-haiku-9", headers=headers)
    assert one.status_code == 200
    assert one.json()["id"] == "claude-haiku-9"


async def test_a_pattern_without_its_backend_answers_503(
    client: httpx.AsyncClient, services: Services
) -> None:
    headers = await auth(services)
    answer = await client.post("/v1/chat/completions", json=chat("mistral-large"), headers=headers)
    assert answer.status_code == 503
    assert "nowhere" in answer.json()["error"]["message"]
