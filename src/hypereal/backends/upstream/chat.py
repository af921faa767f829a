"""The OpenAI ``chat.completion.chunk`` stream (server-sent events), read the same way for
every chat-capable upstream (OpenAI-compatible servers, a hosted Hypereal account), and the
prompt-size estimate used where the upstream has no tokenizer endpoint."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import anyio
import orjson

from hypereal.backends.base import BackendError, ChatDelta, ChatMessage
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
    finish_reason: str | None = None
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
            choices = chunk.get("choices") or []
            choice = choices[0] if isinstance(choices, list) and choices else {}
            delta = choice.get("delta") if isinstance(choice, dict) else None
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                yield ChatDelta(text=text)
            if isinstance(choice, dict) and choice.get("finish_reason"):
                finish_reason = str(choice["finish_reason"])
                if finish_reason == "error":  # OpenRouter's mark of a failed generation
                    raise BackendError(
                        f"{capitalized(provider)} failed mid-stream: {_error_text(chunk)}"
                    )
        if done:
            # Read the body to its end (the chunked terminator follows [DONE]): a connection
            # whose body was left unread is closed instead of kept for the next call.
            with anyio.move_on_after(_DRAIN_SECONDS):
                async for _ in events:
                    pass
    if not done and finish_reason is None:
        raise BackendError(
            f"{capitalized(provider)} closed the stream before the answer was complete"
        )
    yield _final_delta(finish_reason, usage)


# How long the rest of a finished stream may take to arrive before the connection is dropped.
_DRAIN_SECONDS = 1.0


def _completion_deltas(body: Mapping[str, Any], provider: str) -> list[ChatDelta]:
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(message, dict):
        raise BackendError(f"{capitalized(provider)} answered without a message")
    text = message.get("content")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    deltas = [ChatDelta(text=text)] if isinstance(text, str) and text else []
    return [*deltas, _final_delta(choice.get("finish_reason"), usage or {})]


def _final_delta(finish_reason: object, usage: Mapping[str, Any]) -> ChatDelta:
    return ChatDelta(
        finish_reason=str(finish_reason) if finish_reason else "stop",
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


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


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """Conservative prompt size without a tokenizer: UTF-8 bytes / 3 per message, rounded up,
    plus the chat template allowance (4 per message, 3 for the reply)."""
    text = sum(math.ceil(len(m.content.encode()) / _BYTES_PER_TOKEN) for m in messages)
    return text + template_allowance(len(messages))


def template_allowance(message_count: int) -> int:
    """Tokens a chat template adds around ``message_count`` messages (an upper estimate)."""
    return _TOKENS_PER_MESSAGE * message_count + _TOKENS_PER_REPLY
