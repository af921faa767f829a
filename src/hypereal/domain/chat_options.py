"""The OpenAI chat fields passed on to an upstream that can honour them (``stop``, ``seed``,
``response_format``, ``tools``, ``tool_choice``, ``n``) and the tool calls of the messages:
checked here, each malformed value a 400 naming its field; a field the serving backend cannot
honour is a 400 saying so, never silently ignored."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from hypereal.backends.base import ChatMessage, ToolCall
from hypereal.domain.catalogue import check_text
from hypereal.domain.errors import BadRequest

STOP_SEQUENCES = 4  # OpenAI's limits
MAX_TOOLS = 128
MAX_CHOICES = 8  # our limit on ``n``: every choice reserves ``max_tokens`` of credits
TOOL_CHOICES = ("none", "auto", "required")
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def chat_options(
    fields: Mapping[str, Any], slug: str, backend: object, messages: Sequence[ChatMessage]
) -> dict[str, Any] | None:
    """The ``fields`` the client set (None values left out), checked, for a backend whose
    ``chat_options`` names them; a value that asks for nothing (``n`` 1, ``tools`` [], a
    ``tool_choice`` without tools...) is dropped. Messages with tool calls need a backend that
    honours ``tools``. Raises BadRequest (400)."""
    honoured: frozenset[str] = getattr(backend, "chat_options", frozenset())
    if "tools" not in honoured:
        _refuse_tool_messages(messages, slug)
    if not fields:
        return None  # the usual request: nothing more to look at
    options: dict[str, Any] = {}
    for name, value in fields.items():
        if _asks_nothing(name, value, fields):
            continue
        if name not in honoured:
            raise BadRequest(
                f"Invalid value for '{name}': the backend serving {slug} cannot honour it"
            )
        options[name] = check_option(name, value)
    if "tool_choice" in options:
        _check_choice_names(options["tool_choice"], options.get("tools") or [])
    return options or None


def _asks_nothing(name: str, value: Any, fields: Mapping[str, Any]) -> bool:
    """Whether ``value`` of field ``name`` leaves the answer as if it were not set."""
    if name == "tools":
        return isinstance(value, list) and not value
    if name == "tool_choice":  # without tools, "none" and "auto" mean what no tool_choice does
        return fields.get("tools") in (None, []) and value in TOOL_CHOICES[:2]
    if name == "n":
        return value == 1 and not isinstance(value, bool)
    if name == "stop":
        return value in ([], "")
    if name == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    return False


def _refuse_tool_messages(messages: Sequence[ChatMessage], slug: str) -> None:
    for index, message in enumerate(messages):
        if message.tool_calls or message.role == "tool":
            raise BadRequest(
                f"Invalid value for 'messages[{index}]': the backend serving {slug} cannot "
                "honour tool calls"
            )


def check_option(name: str, value: Any) -> Any:
    """An OpenAI chat field passed on to an upstream, checked: BadRequest (400) naming the
    field when it is malformed. Returns the value to send."""
    checker = _CHECKS.get(name)
    if checker is None:
        raise BadRequest(f"Invalid value for '{name}': not passed on to any chat backend")
    return checker(value)


def _check_stop(value: Any) -> Any:
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= STOP_SEQUENCES
        or not all(isinstance(stop, str) and stop for stop in stops)
    ):
        raise BadRequest(
            f"Invalid value for 'stop': a string or a list of 1 to {STOP_SEQUENCES} strings"
        )
    for stop in stops:
        check_text(stop, "stop")
    return value


def _check_seed(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
        raise BadRequest("Invalid value for 'seed': must be an integer")
    return value


def _check_response_format(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(value.get("json_schema"), dict):
        return value
    raise BadRequest(
        "Invalid value for 'response_format': type json_object, or json_schema with a "
        "json_schema object"
    )


def _check_n(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHOICES:
        raise BadRequest(f"Invalid value for 'n': must be an integer from 1 to {MAX_CHOICES}")
    return value


def _check_tools(value: Any) -> Any:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOOLS:
        raise BadRequest(f"Invalid value for 'tools': must be a list of 1 to {MAX_TOOLS} tools")
    for index, tool in enumerate(value):
        _check_tool(tool, f"tools[{index}]")
    return value


def _check_tool(tool: Any, where: str) -> None:
    """``{"type": "function", "function": {"name", "description"?, "parameters"?}}``."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise BadRequest(f"Invalid value for '{where}': must be an object of type 'function'")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise BadRequest(f"Invalid value for '{where}.function': must be an object")
    _check_name(function.get("name"), f"{where}.function.name")
    description = function.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise BadRequest(f"Invalid value for '{where}.function.description': must be a string")
        check_text(description, f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadRequest(
            f"Invalid value for '{where}.function.parameters': must be a JSON Schema object"
        )


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise BadRequest(
            f"Invalid value for '{where}': 1 to 64 letters, digits, underscores or dashes"
        )
    return name


def _check_tool_choice(value: Any) -> Any:
    """``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name"}}``."""
    if value in TOOL_CHOICES:
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(function, dict) or value.get("type") != "function":
        raise BadRequest(
            "Invalid value for 'tool_choice': 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}'
        )
    _check_name(function.get("name"), "tool_choice.function.name")
    return value


def _check_choice_names(choice: Any, tools: list[dict[str, Any]]) -> None:
    """A ``tool_choice`` other than ``none`` needs ``tools``; one naming a function needs a
    tool of that name."""
    if choice == "none":
        return
    if not tools:
        raise BadRequest("Invalid value for 'tool_choice': only allowed when 'tools' are given")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in {tool["function"]["name"] for tool in tools}:
            raise BadRequest(f"Invalid value for 'tool_choice': no tool is named '{name}'")


_CHECKS = {
    "stop": _check_stop,
    "seed": _check_seed,
    "response_format": _check_response_format,
    "n": _check_n,
    "tools": _check_tools,
    "tool_choice": _check_tool_choice,
}


def message_tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls``: a list of ``{"id", "type": "function",
    "function": {"name", "arguments"}}`` (arguments: JSON text). Raises BadRequest."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"Invalid value for '{where}': must be a non-empty array")
    calls = []
    for index, call in enumerate(raw):
        at = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise BadRequest(
                f"Invalid value for '{at}': must be a call of type 'function' with a 'function'"
            )
        call_id = tool_call_id(call.get("id"), f"{at}.id")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise BadRequest(f"Invalid value for '{at}.function.arguments': must be a string")
        name = _check_name(function.get("name"), f"{at}.function.name")
        calls.append(
            ToolCall(
                index=index,
                id=call_id,
                name=name,
                arguments=check_text(arguments, f"{at}.function.arguments"),
            )
        )
    return tuple(calls)


def tool_call_id(value: Any, where: str) -> str:
    """A tool call's id (a non-empty string)."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"Invalid value for '{where}': must be a non-empty string")
    return check_text(value, where)
