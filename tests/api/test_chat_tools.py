"""Tool calls and ``n`` on ``/v1/chat/completions``, end to end over real HTTP: the official
``openai`` SDK against our server, which forwards to the fake OpenAI-compatible upstream.
Calls come back streamed (``delta.tool_calls`` pieces) and whole (``message.tool_calls``,
content null), a follow-up turn sends the tool's answer upstream, ``n`` choices stream with
their indexes and are billed for all their tokens; a local backend, and malformed fields, are
400s before any charge."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hypereal.domain import ledger
from hypereal.domain.pricing import chat_price
from hypereal.services import Services
from tests.api.test_chat import make_services
from tests.support.app import bearer, funded_key, live_app
from tests.support.openai_server import WEATHER_TOOL as TOOL
from tests.support.openai_server import OpenAIFake
from tests.support.servers import serve_app

openai = pytest.importorskip("openai")

OTHER_TOOL = {"type": "function", "function": {"name": "get_time"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
ARGUMENTS = '{"city": "Paris"}'
CALL_TOKENS = 6  # the fake's count of a call: the piece with the name + 5 argument fragments
FUNDS = 100_000  # holds the reservation of max_tokens (4096 by default) for a few choices


@pytest.fixture
def upstream_server() -> Iterator[tuple[OpenAIFake, str]]:
    fake = OpenAIFake(keepalive_comments=False)
    with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
def upstream(upstream_server: tuple[OpenAIFake, str]) -> OpenAIFake:
    return upstream_server[0]


@pytest.fixture
async def services(
    tmp_path: Path, upstream_server: tuple[OpenAIFake, str]
) -> AsyncIterator[Services]:
    fake, url = upstream_server
    backend = {"type": "openai", "base_url": f"{url}/v1", "api_key": fake.api_key}
    services = await make_services(tmp_path, upstream=backend)
    yield services
    await services.close()


@pytest.fixture
def live_url(services: Services) -> Iterator[str]:
    with live_app(services) as url:
        yield url


async def sdk(services: Services, live_url: str, credits: int = FUNDS) -> tuple[Any, str, str]:
    """An OpenAI client on a new funded key: ``(client, key, account)``."""
    key, account = await funded_key(services, credits, "tools")
    client = openai.OpenAI(base_url=f"{live_url}/v1", api_key=key, max_retries=0)
    return client, key, account


def charge(services: Services, messages: int, completion_tokens: int) -> int:
    """The price of a turn of ``upstream-chat`` (2 credits a message, 1 an output token)."""
    spec = services.catalogue.get("upstream-chat", "chat")
    return chat_price(spec, messages, 0, completion_tokens)


async def assert_billed(
    services: Services, account: str, answer: Any, completion_tokens: int
) -> None:
    """``answer`` (a completion, or a stream's last chunk) counts ``completion_tokens`` and
    charged the price of one message and them, which is what left the account."""
    assert answer.usage.completion_tokens == completion_tokens
    used = charge(services, 1, completion_tokens)
    assert answer.model_extra["creditsUsed"] == used
    assert await ledger.balance(services.db, account) == FUNDS - used


def upstream_chats(upstream: OpenAIFake) -> list[dict[str, Any]]:
    return [r.body for r in upstream.requests if r.path.endswith("/chat/completions")]


async def test_a_whole_answer_calling_a_tool_has_message_tool_calls(
    services: Services, live_url: str, upstream: OpenAIFake
) -> None:
    client, _, account = await sdk(services, live_url)
    named = {"type": "function", "function": {"name": "get_weather"}}

    def call() -> Any:
        return client.chat.completions.create(
            model="upstream-chat", messages=ASK, tools=[OTHER_TOOL, TOOL], tool_choice=named
        )

    completion = await asyncio.to_thread(call)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert (tool_call.type, tool_call.function.name) == ("function", "get_weather")
    assert tool_call.function.arguments == ARGUMENTS
    assert tool_call.id.startswith("call_0_")
    (sent,) = upstream_chats(upstream)
    assert (sent["tools"], sent["tool_choice"]) == ([OTHER_TOOL, TOOL], named)
    assert "stream" not in sent
    await assert_billed(services, account, completion, CALL_TOKENS)


async def test_a_streamed_tool_call_comes_in_openai_pieces(
    services: Services, live_url: str, upstream: OpenAIFake
) -> None:
    client, key, account = await sdk(services, live_url)

    def call() -> list[Any]:
        stream = client.chat.completions.create(
            model="upstream-chat", messages=ASK, tools=[TOOL], tool_choice="required", stream=True
        )
        return list(stream)

    chunks = await asyncio.to_thread(call)
    pieces = [piece for c in chunks if c.choices for piece in c.choices[0].delta.tool_calls or []]
    assert [piece.index for piece in pieces] == [0] * CALL_TOKENS
    first, *rest = pieces
    assert (first.type, first.function.name, first.function.arguments) == (
        "function",
        "get_weather",
        "",
    )
    assert first.id and all(piece.id is None and piece.function.name is None for piece in rest)
    assert "".join(piece.function.arguments for piece in rest) == ARGUMENTS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert upstream_chats(upstream)[0]["tool_choice"] == "required"
    await assert_billed(services, account, chunks[-1], CALL_TOKENS)

    # The wire format itself: the first chunk names the role and carries the first piece.
    body = {"model": "upstream-chat", "messages": ASK, "tools": [TOOL], "stream": True}
    async with httpx.AsyncClient(base_url=live_url) as http:
        answer = await http.post("/v1/chat/completions", json=body, headers=bearer(key))
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line[6:7] == "{"]
    delta = events[0]["choices"][0]["delta"]
    assert delta == {
        "role": "assistant",
        "tool_calls": [
            {
                "index": 0,
                "id": delta["tool_calls"][0]["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
    }
    assert events[1]["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]
    }


async def test_without_the_upstream_usage_each_streamed_piece_is_billed_as_a_token(
    services: Services, live_url: str, upstream: OpenAIFake
) -> None:
    upstream.reports_usage = False
    client, _, account = await sdk(services, live_url)

    def call() -> list[Any]:
        answer = client.chat.completions.create(
            model="upstream-chat", messages=ASK, tools=[TOOL], stream=True
        )
        return list(answer)

    chunks = await asyncio.to_thread(call)
    pieces = [piece for c in chunks if c.choices for piece in c.choices[0].delta.tool_calls or []]
    assert len(pieces) == CALL_TOKENS
    await assert_billed(services, account, chunks[-1], CALL_TOKENS)


async def test_a_follow_up_turn_sends_the_tool_answer_upstream(
    services: Services, live_url: str, upstream: OpenAIFake
) -> None:
    client, _, _ = await sdk(services, live_url)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ARGUMENTS},
    }
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
    ]

    def ask(stream: bool) -> Any:
        answer = client.chat.completions.create(
            model="upstream-chat", messages=messages, tools=[TOOL], stream=stream
        )
        return list(answer) if stream else answer

    whole, streamed = await asyncio.to_thread(ask, False), await asyncio.to_thread(ask, True)
    assert whole.choices[0].message.content == "Hello, world!"
    assert whole.choices[0].message.tool_calls is None
    assert whole.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == "Hello, world!"
    for sent in upstream_chats(upstream):
        assert sent["messages"][1:] == [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
        ]
        assert sent["tools"] == [TOOL]


async def test_n_choices_whole_are_listed_and_billed_for_all_their_tokens(
    services: Services, live_url: str, upstream: OpenAIFake
) -> None:
    client, _, account = await sdk(services, live_url)

    def call() -> Any:
        return client.chat.completions.create(model="upstream-chat", messages=ASK, n=2)

    completion = await asyncio.to_thread(call)
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "Hello, world!", "stop"),
        (1, "Hello, world! again", "stop"),
    ]
    assert upstream_chats(upstream)[0]["n"] == 2
    await assert_billed(services, account, completion, 4 + 5)


async def test_n_choices_stream_with_their_indexes_and_are_billed_for_all(
    services: Services, live_url: str, upstream: OpenAIFake
) -> None:
    client, _, account = await sdk(services, live_url)

    def call() -> list[Any]:
        return list(
            client.chat.completions.create(model="upstream-chat", messages=ASK, n=2, stream=True)
        )

    chunks = await asyncio.to_thread(call)
    texts = {0: "", 1: ""}
    finishes = []
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append((choice.index, choice.finish_reason))
    assert texts == {0: "Hello, world!", 1: "Hello, world! again"}
    assert finishes == [(0, "stop"), (1, "stop")]
    await assert_billed(services, account, chunks[-1], 4 + 5)


async def test_n_choices_reserve_max_tokens_for_each(
    services: Services, live_url: str, upstream: OpenAIFake
) -> None:
    # 100 credits hold one choice of 60 tokens (2 + 60) but not two (2 + 120).
    client, _, account = await sdk(services, live_url, credits=100)

    def call(n: int) -> Any:
        return client.chat.completions.create(
            model="upstream-chat", messages=ASK, n=n, max_tokens=60
        )

    with pytest.raises(openai.APIStatusError) as refused:
        await asyncio.to_thread(call, 2)
    assert refused.value.status_code == 402
    assert upstream_chats(upstream) == []
    assert (await asyncio.to_thread(call, 1)).choices[0].message.content == "Hello, world!"
    assert await ledger.balance(services.db, account) == 100 - charge(services, 1, 4)


async def test_malformed_fields_and_a_local_backend_are_400s_before_any_charge(
    services: Services, live_url: str, upstream: OpenAIFake
) -> None:
    client, _, account = await sdk(services, live_url)
    answered = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "42"},
    ]
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("tools", "list of 1 to 128", {"tools": {"type": "function"}}),
        ("tools[0].function.name", "letters", {"tools": [{"type": "function", "function": {}}]}),
        ("tool_choice", "'required'", {"tools": [TOOL], "tool_choice": "sometimes"}),
        (
            "tool_choice",
            "no tool is named 'nope'",
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        ),
        ("n", "1 to 8", {"n": 9}),
        ("n", "1 to 8", {"n": 0}),
        (
            "messages[1].tool_calls[0].id",
            "non-empty",
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": ""}}],
                    },
                ]
            },
        ),
        (
            "tools",
            "the backend serving test-chat cannot honour it",
            {"model": "test-chat", "tools": [TOOL]},
        ),
        ("n", "the backend serving test-chat cannot honour it", {"model": "test-chat", "n": 2}),
        (
            "messages[1]",
            "the backend serving test-chat cannot honour tool calls",
            {"model": "test-chat", "messages": answered},
        ),
    ]

    def call(arguments: dict[str, Any]) -> Any:
        request = {"model": "upstream-chat", "messages": ASK, **arguments}
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**request)
        return refused.value

    for field, words, arguments in cases:
        error = await asyncio.to_thread(call, arguments)
        assert f"Invalid value for '{field}'" in error.message, (field, error.message)
        assert words in error.message, (field, error.message)
    assert upstream_chats(upstream) == []
    assert await ledger.balance(services.db, account) == FUNDS
