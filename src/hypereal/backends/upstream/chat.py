"""The OpenAI ``chat.completion.chunk`` stream (server-sent events), read the same way for
every chat-capable upstream (OpenAI-compatible servers, a hosted Hypereal account), and the
prompt-size estimate used where the upstream has no tokenizer endpoint."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import anyio
import orjson

from hypereal.backends.base import BackendError, ChatDelta, ChatMessage, ToolCall
from hypereal.backends.upstream.http import StreamedAnswer, capitalized, json_object

# Prompt estimate without a tokenizer: BPE vocabularies average ~4 characters per token on
# English, so 3 UTF-8 bytes per token over-counts ordinary text, and CJK (3 bytes a character,
# about a token each) is counted about right. Chat templates add a few tokens per message
# (role markers, separators) and a few to open the assistant's answer.
_BYTES_PER_TOKEN = 3
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REPLY = 3


async def sse_events(response: StreamedAnswer) -> AsyncGenerator[tuple[str | None, str]]:
    """``(event, data)`` of each server-sent event, per the WHATWG rules: lines end with LF,
    CRLF or CR; ``data`` lines of one event are joined with newlines; comment lines
    (``: keep-alive``) are skipped. Parsed a whole event block at a time as chunks arrive."""
    pending = b""
    async for chunk in response.chunks():
        pending += chunk
        if b"\r" in pending:
            # A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
            held = pending.endswith(b"\r")
            body = pending[:-1] if held else pending
            pending = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        if b"\n\n" not in pending:
            continue
        *blocks, pending = pending.split(b"\n\n")
        for block in blocks:
            event = _sse_event(block)
            if event is not None:
                yield event
    if pending.strip(b"\r\n"):
        event = _sse_event(pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
        if event is not None:
            yield event


def _sse_event(block: bytes) -> tuple[str | None, str] | None:
    event: str | None = None
    data: list[str] = []
    for line in block.decode("utf-8", errors="replace").split("\n"):
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
        elif name == "event":
            event = value.removeprefix(" ")
    return (event, "\n".join(data)) if data else None


async def chat_deltas(
    response: StreamedAnswer, provider: str, bill: dict[str, Any] | None = None
) -> AsyncGenerator[ChatDelta]:
    """ChatDeltas from an OpenAI ``chat.completion.chunk`` SSE stream (see module docs); a
    server that ignored ``stream: true`` and answered one JSON completion is accepted too.
    With ``bill``, a ``creditsUsed`` the upstream sends (hosted Hypereal) is recorded there
    as ``credits_used`` (see :func:`record_credits`)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        whole_answer = json_object(await response.read(), provider)
        if bill is not None:
            record_credits(bill, whole_answer)
        for whole in _completion_deltas(whole_answer, provider):
            yield whole
        return
    finish_reasons: dict[int, str] = {}
    usage: Mapping[str, Any] = {}
    done = False
    async with aclosing(sse_events(response)) as events:
        async for event, data in events:
            if data.strip() == "[DONE]":
                done = True
                break
            chunk = _chunk(data, provider)
            if event == "error" or chunk.get("error"):
                raise BackendError(
                    f"{capitalized(provider)} failed mid-stream: {_error_text(chunk)}"
                )
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            if bill is not None:
                record_credits(bill, chunk)
            for index, choice in _choices(chunk):
                delta = _piece(index, choice.get("delta"))
                if delta is not None:
                    yield delta
                if choice.get("finish_reason"):
                    finish_reasons[index] = str(choice["finish_reason"])
                    if finish_reasons[index] == "error":  # OpenRouter's mark of a failure
                        raise BackendError(
                            f"{capitalized(provider)} failed mid-stream: {_error_text(chunk)}"
                        )
        if done:
            # Read the body to its end (the chunked terminator follows [DONE]): a connection
            # whose body was left unread is closed instead of kept for the next call.
            with anyio.move_on_after(_DRAIN_SECONDS):
                async for _ in events:
                    pass
    if not done and not finish_reasons:
        raise BackendError(
            f"{capitalized(provider)} closed the stream before the answer was complete"
        )
    for delta in _final_deltas(finish_reasons, usage):
        yield delta


def _choices(body: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(index, choice)`` of each well-formed choice of a chunk or completion."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return []
    return [
        (_index(choice.get("index"), position), choice)
        for position, choice in enumerate(choices)
        if isinstance(choice, dict)
    ]


def _index(value: object, default: int) -> int:
    count = _count(value)
    return count if count is not None and count >= 0 else default


def _piece(index: int, message: object) -> ChatDelta | None:
    """The text and tool-call pieces of a stream's ``delta`` (or a completion's ``message``)
    of choice ``index`` as one ChatDelta; None when it has neither."""
    if not isinstance(message, dict):
        return None
    text = message.get("content")
    text = text if isinstance(text, str) else ""
    calls = message.get("tool_calls")
    pieces = (
        tuple(
            _tool_call(call, position)
            for position, call in enumerate(calls)
            if isinstance(call, dict)
        )
        if isinstance(calls, list) and calls
        else ()
    )
    if not text and not pieces:
        return None
    return ChatDelta(text=text, choice=index, tool_calls=pieces)


def _tool_call(call: Mapping[str, Any], position: int) -> ToolCall:
    """One item of ``tool_calls``: a whole call or a streamed piece of one."""
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    call_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
    return ToolCall(
        index=_index(call.get("index"), position),
        id=call_id if isinstance(call_id, str) and call_id else None,
        name=name if isinstance(name, str) and name else None,
        arguments=arguments if isinstance(arguments, str) else "",
    )


# How long the rest of a finished stream may take to arrive before the connection is dropped.
_DRAIN_SECONDS = 1.0


def _completion_deltas(body: Mapping[str, Any], provider: str) -> list[ChatDelta]:
    choices = _choices(body)
    if not choices or not all(isinstance(choice.get("message"), dict) for _, choice in choices):
        raise BackendError(f"{capitalized(provider)} answered without a message")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    deltas = [_piece(index, choice["message"]) for index, choice in choices]
    finish_reasons = {index: choice.get("finish_reason") for index, choice in choices}
    return [
        *(delta for delta in deltas if delta is not None),
        *_final_deltas(finish_reasons, usage or {}),
    ]


def _final_deltas(
    finish_reasons: Mapping[int, object], usage: Mapping[str, Any]
) -> list[ChatDelta]:
    """The closing delta of each choice (choice 0 at least), in order; the last one carries
    the usage counts."""
    closing = [
        ChatDelta(choice=index, finish_reason=str(finish_reasons[index] or "stop"))
        for index in sorted(finish_reasons)
    ] or [ChatDelta(finish_reason="stop")]
    closing[-1] = replace(
        closing[-1],
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )
    return closing


def _chunk(data: str, provider: str) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except ValueError as exc:
        raise BackendError(f"{capitalized(provider)} sent a malformed stream chunk") from exc
    if not isinstance(chunk, dict):
        raise BackendError(f"{capitalized(provider)} sent a malformed stream chunk")
    return chunk


def _error_text(chunk: Mapping[str, Any]) -> str:
    error = chunk.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:
        return error
    return "unknown error"


def record_credits(bill: dict[str, Any], answer: Mapping[str, Any]) -> None:
    """Keep ``answer['creditsUsed']`` (what a hosted Hypereal account charged for it) in
    ``bill['credits_used']`` when it is a number >= 0; anything else is not a bill."""
    value = answer.get("creditsUsed")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e12:
        bill["credits_used"] = value


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def openai_message(message: ChatMessage) -> dict[str, Any]:
    """A message in OpenAI's request shape: an assistant's ``tool_calls`` (its content null
    when it has none), a ``tool`` message's ``tool_call_id``."""
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.tool_calls:
        return {
            "role": message.role,
            "content": message.content or None,
            "tool_calls": [call.public() for call in message.tool_calls],
        }
    return {"role": message.role, "content": message.content}


def estimate_prompt_tokens(
    messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] = ()
) -> int:
    """Conservative prompt size without a tokenizer: UTF-8 bytes / 3 per message, rounded up,
    plus the chat template allowance (4 per message, 3 for the reply); the tool calls and
    tool-call ids of the messages and the ``tools`` definitions count by their JSON's bytes
    too, 4 more per call and per definition."""
    text = sum(_text_tokens(m.content) + _tool_tokens(m) for m in messages)
    defined = sum(_text_tokens(_json(tool)) + _TOKENS_PER_MESSAGE for tool in tools)
    return text + defined + template_allowance(len(messages))


def _tool_tokens(message: ChatMessage) -> int:
    """The estimate of what a message adds to its content: its calls and the id it answers."""
    calls = sum(
        _text_tokens(_json(call.public())) + _TOKENS_PER_MESSAGE for call in message.tool_calls
    )
    return calls + _text_tokens(message.tool_call_id or "")


def _text_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / _BYTES_PER_TOKEN)


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def template_allowance(message_count: int) -> int:
    """Tokens a chat template adds around ``message_count`` messages (an upper estimate)."""
    return _TOKENS_PER_MESSAGE * message_count + _TOKENS_PER_REPLY
