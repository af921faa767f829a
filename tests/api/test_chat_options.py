"""OpenAI chat fields that change how the model generates (``stop``, ``seed``,
``response_format``) reach an OpenAI-compatible upstream as sent, driven by the official
``openai`` SDK over real HTTP; a backend that cannot honour one (hosted Hypereal: ``seed``,
``tools``, ``n``...) is a 400 naming the field, before any charge (``tools`` and ``n`` on an
OpenAI-compatible upstream: ``test_chat_tools.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hypereal.domain import ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.app import funded_key, live_app
from tests.support.hypereal_server import HyperealFake
from tests.support.openai_server import OpenAIFake
from tests.support.servers import free_port, serve_app

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Give me JSON"}]
PRICE = {"base_credits": 1, "input_usd_per_million": 1.0, "output_usd_per_million": 1.0}


@pytest.fixture
def upstream() -> Iterator[tuple[OpenAIFake, str]]:
    fake = OpenAIFake()
    with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
def hosted() -> Iterator[tuple[HyperealFake, str]]:
    fake = HyperealFake()
    with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
async def services(
    tmp_path: Path, upstream: tuple[OpenAIFake, str], hosted: tuple[HyperealFake, str]
) -> AsyncIterator[Services]:
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url=f"http://127.0.0.1:{port}",
        port=port,
        backends={
            "openai": {"type": "openai", "api_key": "sk-test", "base_url": upstream[1] + "/v1"},
            "hypereal": {"type": "hypereal", "api_key": hosted[0].api_key, "base_url": hosted[1]},
        },
        # gpt-5.5 is served by the hosted account here (its first binding): "oa-*" slugs go to
        # the OpenAI-compatible upstream.
        model_patterns=[{"pattern": "oa-*", "backend": "openai", "price": PRICE}],
    )
    services = build_services(settings)
    await services.migrate()
    yield services
    await services.close()


@pytest.fixture
def live_url(services: Services) -> Iterator[str]:
    with live_app(services, port=services.settings.port) as url:
        yield url


async def sdk(services: Services, live_url: str) -> tuple[Any, str]:
    key, account = await funded_key(services, 1000, "options")
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key=key, max_retries=0), account


async def test_stop_seed_and_response_format_reach_the_upstream(
    services: Services, live_url: str, upstream: tuple[OpenAIFake, str]
) -> None:
    client, _ = await sdk(services, live_url)

    def call() -> tuple[Any, list[Any]]:
        whole = client.chat.completions.create(
            model="oa-gpt-5.5",
            messages=MESSAGES,
            stop=["END"],
            seed=7,
            response_format={"type": "json_object"},
        )
        chunks = list(
            client.chat.completions.create(
                model="oa-gpt-5.5", messages=MESSAGES, stop="END", seed=8, stream=True
            )
        )
        return whole, chunks

    whole, chunks = await asyncio.to_thread(call)
    assert whole.choices[0].message.content
    assert any(chunk.choices and chunk.choices[0].delta.content for chunk in chunks)
    first, second = (r.body for r in upstream[0].requests if r.path.endswith("/completions"))
    assert (first["stop"], first["seed"], first["response_format"]) == (
        ["END"],
        7,
        {"type": "json_object"},
    )
    assert (second["stop"], second["seed"], second["stream"]) == ("END", 8, True)
    assert "response_format" not in second


async def test_fields_the_backend_cannot_honour_are_a_400_naming_them(
    services: Services, live_url: str, hosted: tuple[HyperealFake, str]
) -> None:
    client, account = await sdk(services, live_url)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("seed", {"model": "gpt-5.5", "seed": 1}),  # served by hosted Hypereal: no seed
        (
            "response_format",
            {"model": "gemini-3.1-pro", "response_format": {"type": "json_object"}},
        ),
        ("tools", {"model": "gpt-5.5", "tools": [tool]}),
        ("tool_choice", {"model": "gpt-5.5", "tool_choice": "required"}),
        ("n", {"model": "gpt-5.5", "n": 2}),
        ("stop", {"model": "oa-gpt-5.5", "stop": ["a", "b", "c", "d", "e"]}),
        ("response_format", {"model": "oa-gpt-5.5", "response_format": {"type": "xml"}}),
    ]

    def call(arguments: dict[str, Any]) -> Any:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(messages=MESSAGES, **arguments)
        return refused.value

    for name, arguments in cases:
        error = await asyncio.to_thread(call, arguments)
        assert f"'{name}'" in error.message, (name, error.message)
    assert hosted[0].submissions == []
    assert await ledger.balance(services.db, account) == 1000
