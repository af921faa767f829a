"""Tool calls and ``n`` in the chat domain: streamed pieces merged into whole calls, the
messages that carry calls and answers, and the checks of ``tools``, ``tool_choice`` and ``n``
(each malformed value a 400 naming its field)."""

from __future__ import annotations

from typing import Any

import pytest

from hypereal.backends.base import ChatMessage, ToolCall
from hypereal.domain.chat import Choice, merge_tool_calls, parse_messages
from hypereal.domain.chat_options import chat_options
from hypereal.domain.errors import BadRequest
from tests.support.openai_server import WEATHER_TOOL as TOOL


class ToolsBackend:
    """A backend that honours every OpenAI field (as OpenAICompatible does)."""

    chat_options = frozenset({"stop", "seed", "response_format", "tools", "tool_choice", "n"})


class PlainBackend:
    """A backend that honours none (as the local model)."""


def test_streamed_pieces_merge_by_index_into_whole_calls() -> None:
    pieces = [
        ToolCall(index=0, id="call_a", name="get_weather", arguments=""),
        ToolCall(index=1, id="call_b", name="get_time", arguments='{"tz"'),
        ToolCall(index=0, arguments='{"ci'),
        ToolCall(index=0, arguments='ty": "Paris"}'),
        ToolCall(index=1, arguments=': "UTC"}'),
    ]
    assert merge_tool_calls(pieces) == [
        ToolCall(index=0, id="call_a", name="get_weather", arguments='{"city": "Paris"}'),
        ToolCall(index=1, id="call_b", name="get_time", arguments='{"tz": "UTC"}'),
    ]


def test_merging_orders_by_index_and_keeps_the_first_id_and_name() -> None:
    pieces = [
        ToolCall(index=2, id="call_c", name="late", arguments="{}"),
        ToolCall(index=0, id="call_a", name="early", arguments="{"),
        ToolCall(index=0, id="call_other", name="other", arguments="}"),
    ]
    merged = merge_tool_calls(pieces)
    assert [(call.index, call.id, call.name, call.arguments) for call in merged] == [
        (0, "call_a", "early", "{}"),
        (2, "call_c", "late", "{}"),
    ]
    assert merge_tool_calls([]) == []


def test_a_choice_holds_its_text_and_merged_calls() -> None:
    choice = Choice(text=["Let me ", "check"])
    choice.tool_pieces += [ToolCall(id="c", name="f"), ToolCall(arguments="{}")]
    assert choice.content == "Let me check"
    assert choice.tool_calls == [ToolCall(id="c", name="f", arguments="{}")]


def test_tool_calls_and_tool_answers_are_parsed_from_messages() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = parse_messages(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        ]
    )
    assert messages[1] == ChatMessage(
        "assistant",
        "",
        tool_calls=(ToolCall(0, "call_1", "get_weather", '{"city": "Paris"}'),),
    )
    assert messages[2] == ChatMessage("tool", "Sunny", tool_call_id="call_1")


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "tool", "content": "Sunny"}, "messages[0].tool_call_id"),
        ({"role": "tool", "tool_call_id": "c", "content": None}, "messages[0].content"),
        ({"role": "assistant", "content": None}, "messages[0].content"),
        ({"role": "assistant", "tool_calls": []}, "messages[0].tool_calls"),
        ({"role": "assistant", "tool_calls": [{"id": "c"}]}, "messages[0].tool_calls[0]"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": ""}}]},
            "messages[0].tool_calls[0].id",
        ),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "a b", "arguments": "{}"}}],
            },
            "messages[0].tool_calls[0].function.name",
        ),
    ],
)
def test_malformed_tool_messages_are_a_400_naming_the_field(
    message: dict[str, Any], field: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_messages([message])
    assert f"'{field}'" in refused.value.message


def test_tools_tool_choice_and_n_are_passed_on_checked() -> None:
    fields = {"tools": [TOOL], "tool_choice": "required", "n": 3}
    assert chat_options(fields, "m", ToolsBackend(), []) == fields
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert chat_options({"tools": [TOOL], "tool_choice": named}, "m", ToolsBackend(), []) == {
        "tools": [TOOL],
        "tool_choice": named,
    }
    # Values that ask for nothing are dropped, so any backend takes them.
    nothing = {"tools": [], "tool_choice": "auto", "n": 1}
    assert chat_options(nothing, "m", PlainBackend(), []) is None
    assert chat_options({}, "m", PlainBackend(), []) is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [TOOL] * 129}, "tools"),
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0]"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]},
            "tools[0].function.description",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [TOOL], "tool_choice": "any"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"n": "2"}, "n"),
        ({"n": True}, "n"),
    ],
)
def test_malformed_options_are_a_400_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as refused:
        chat_options(fields, "m", ToolsBackend(), [])
    assert f"'{field}'" in refused.value.message
    if field == "n":
        assert "1 to 8" in refused.value.message


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"n": 2}, "n"),
    ],
)
def test_a_backend_that_cannot_honour_a_field_is_a_400_saying_so(
    fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        chat_options(fields, "local-model", PlainBackend(), [])
    assert refused.value.message == (
        f"Invalid value for '{field}': the backend serving local-model cannot honour it"
    )


def test_tool_messages_need_a_backend_that_honours_tools() -> None:
    messages = [ChatMessage("user", "Hi"), ChatMessage("tool", "Sunny", tool_call_id="c")]
    with pytest.raises(BadRequest) as refused:
        chat_options({}, "local-model", PlainBackend(), messages)
    assert "'messages[1]'" in refused.value.message
    assert "cannot honour tool calls" in refused.value.message
    assert chat_options({}, "m", ToolsBackend(), messages) is None
