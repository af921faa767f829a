"""The Anthropic Messages API: ``POST /messages``, for clients of Anthropic's SDKs.

The same metered turn as ``/chat/completions`` (:class:`~hypereal.domain.chat.ChatTurn`:
reserved, streamed, settled once; the delivery helpers of ``chat.py``), served by any chat
backend and written in Anthropic's shapes: a ``message`` object, or the event stream
``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``...,
``content_block_stop``, ``message_delta``, ``message_stop``. ``stop_sequences`` are honoured
here, for every backend: the answer is cut before the first one and generation stops.
Errors take Anthropic's shape (``error_shapes.py``, registered in ``app.py``)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hypereal.api.deps import PrincipalDep, ServicesDep
from hypereal.api.error_shapes import anthropic_error_type
from hypereal.api.responses import FastJSONResponse
from hypereal.api.routes.chat import (
    Feed,
    TurnAsk,
    TurnStream,
    open_stream,
    run_turn,
    serve_turn,
)
from hypereal.backends.base import ChatDelta, ChatMessage
from hypereal.domain.chat import ChatTurn, parse_messages
from hypereal.domain.errors import BadRequest, HyperealError

router = APIRouter(tags=["anthropic"])
logger = logging.getLogger(__name__)

ROLES = ("user", "assistant")
# Request fields of the Messages API that no chat backend here can honour: a request that
# sets one is refused rather than answered as if it had not.
UNSUPPORTED = ("tools", "tool_choice", "top_p", "top_k", "thinking")
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"}
MAX_STOP_SEQUENCES = 16


class MessagesBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(strict=True)
    max_tokens: int = Field(ge=1, strict=True)
    messages: Any = None
    system: Any = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0, strict=True)
    stop_sequences: list[str] | None = Field(default=None, strict=True)
    stream: bool = Field(default=False, strict=True)


def _text(value: str, where: str) -> str:
    """``value`` if it can be encoded (JSON's ``"\\ud800"`` parses into a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"Invalid value for '{where}': is not valid Unicode text") from None
    return value


def _content(value: Any, where: str) -> str:
    """A string, or a list of text content blocks joined by newlines."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRequest(
            f"Invalid value for '{where}': must be a string or a list of content blocks"
        )
    texts = []
    for index, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            got = f" (got '{kind}')" if isinstance(kind, str) else ""
            raise BadRequest(
                f"Invalid value for '{where}[{index}]': only text content blocks are supported{got}"
            )
        text = block.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"Invalid value for '{where}[{index}].text': must be a string")
        texts.append(text)
    return "\n".join(texts)


def parse_body(body: MessagesBody) -> tuple[list[ChatMessage], tuple[str, ...]]:
    """The turn's messages (``system`` first) and the stop sequences; raises BadRequest."""
    extra = body.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name) not in (None, [], {}):
            raise BadRequest(f"'{name}' is not supported by this server's chat models")
    output_config = extra.get("output_config")
    if isinstance(output_config, dict) and output_config.get("format") is not None:
        raise BadRequest("'output_config.format' is not supported by this server's chat models")
    if body.messages is None:
        raise BadRequest("Missing required field 'messages'")
    if not isinstance(body.messages, list) or not body.messages:
        raise BadRequest("Invalid value for 'messages': must be a non-empty array")
    turns = []
    for index, item in enumerate(body.messages):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f"Invalid value for '{where}': must be an object")
        if item.get("role") not in ROLES:
            raise BadRequest(f"Invalid value for '{where}.role': must be one of user, assistant")
        content = _content(item.get("content"), f"{where}.content")
        turns.append({"role": item["role"], "content": content})
    messages = parse_messages(turns)
    if body.system is not None:
        system = _text(_content(body.system, "system"), "system")
        if system:
            messages.insert(0, ChatMessage(role="system", content=system))
    stops = tuple(body.stop_sequences or ())
    if len(stops) > MAX_STOP_SEQUENCES:
        raise BadRequest(
            f"Invalid value for 'stop_sequences': at most {MAX_STOP_SEQUENCES} sequences"
        )
    for index, stop in enumerate(stops):
        if not stop:
            raise BadRequest(f"Invalid value for 'stop_sequences[{index}]': must not be empty")
        _text(stop, f"stop_sequences[{index}]")
    return messages, stops


class StopAt:
    """The answer cut at the first of ``sequences``: the text before it passes, the
    sequence and what follows never do, and the backend is stopped (its deltas closed).
    Text that may be the start of a sequence is held back until the next delta tells."""

    def __init__(self, sequences: Sequence[str]) -> None:
        self.sequences = tuple(sequences)
        self.matched: str | None = None
        self.sent: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.sent)

    def _cut(self, text: str) -> tuple[str, str, str | None]:
        """(what may be sent, what is held back, the sequence found)."""
        found: tuple[int, str] | None = None
        for sequence in self.sequences:
            at = text.find(sequence)
            if at >= 0 and (found is None or at < found[0]):
                found = (at, sequence)
        if found is not None:
            return text[: found[0]], "", found[1]
        held = 0
        for sequence in self.sequences:
            for size in range(min(len(sequence) - 1, len(text)), held, -1):
                if text.endswith(sequence[:size]):
                    held = size
                    break
        return text[: len(text) - held], text[len(text) - held :], None

    async def deltas(self, source: AsyncGenerator[ChatDelta]) -> AsyncGenerator[ChatDelta]:
        """The text deltas of ``source``, cut as above."""
        pending = ""
        async with contextlib.aclosing(source) as deltas:
            async for delta in deltas:
                if not delta.text:
                    continue
                send, pending, self.matched = self._cut(pending + delta.text)
                if send:
                    self.sent.append(send)
                    yield ChatDelta(text=send)
                if self.matched is not None:
                    return  # closes the source: the backend stops here
        if pending:
            self.sent.append(pending)
            yield ChatDelta(text=pending)

    def stop_reason(self, turn: ChatTurn) -> str:
        if self.matched is not None:
            return "stop_sequence"
        return STOP_REASONS.get(turn.finish_reason or "stop", "end_turn")


def _message_id(turn: ChatTurn) -> str:
    return "msg_" + turn.id.removeprefix("chatcmpl-")


def _usage(turn: ChatTurn) -> dict[str, int]:
    return {"input_tokens": turn.prompt_tokens, "output_tokens": turn.completion_tokens}


def _message(turn: ChatTurn, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": _message_id(turn),
        "type": "message",
        "role": "assistant",
        "model": turn.spec.slug,
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(turn),
    }


def _event(kind: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps({"type": kind, **data}, ensure_ascii=False)
    return f"event: {kind}\ndata: {payload}\n\n".encode()


PING = _event("ping", {})


class _MessageStream(TurnStream):
    """Anthropic's event stream of one text block; ``ping`` events while the backend is
    silent. An error after the stream began is an ``error`` event (with ``creditsUsed``,
    the part generated and sent being billed)."""

    def __init__(
        self, turn: ChatTurn, feed: Feed, first: Any, keepalive: float, stop: StopAt
    ) -> None:
        self._stop = stop
        super().__init__(turn, feed, first, keepalive)

    async def _sse(self) -> AsyncGenerator[bytes]:
        turn, feed = self._turn, self._feed
        try:
            yield _event("message_start", {"message": _message(turn, [])})
            block = {"type": "text", "text": ""}
            yield _event("content_block_start", {"index": 0, "content_block": block})
            yield PING
            async with contextlib.aclosing(self._items()) as items:
                async for item in items:
                    if item is None:
                        yield PING
                    elif item.text:
                        text = {"type": "text_delta", "text": item.text}
                        yield _event("content_block_delta", {"index": 0, "delta": text})
            credits = await turn.settle()
            yield _event("content_block_stop", {"index": 0})
            delta = {
                "stop_reason": self._stop.stop_reason(turn),
                "stop_sequence": self._stop.matched,
            }
            yield _event(
                "message_delta", {"delta": delta, "usage": _usage(turn), "creditsUsed": credits}
            )
            yield _event("message_stop", {})
        except HyperealError as exc:
            yield _error_event(exc.message, exc.status, await turn.settle())
        except Exception:
            logger.exception("Messages stream %s failed", turn.id)
            yield _error_event("Internal server error", 500, await turn.settle())
        finally:
            await feed.stop()
            await turn.settle()


def _error_event(message: str, status: int, credits: int) -> bytes:
    error = {"type": anthropic_error_type(status), "message": message}
    return _event("error", {"error": error, "creditsUsed": credits})


async def _complete(turn: ChatTurn, request: Request, stop: StopAt) -> Response:
    left = await run_turn(turn, request, stop.deltas(turn.deltas()))
    if left is not None:
        return left
    credits = await turn.settle()
    message = _message(turn, [{"type": "text", "text": stop.text}])
    message["stop_reason"] = stop.stop_reason(turn)
    message["stop_sequence"] = stop.matched
    return FastJSONResponse({**message, "creditsUsed": credits})


@router.post("/messages")
async def create_message(
    request: Request, body: MessagesBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """Anthropic-compatible Messages API (``stream`` defaults to false); the key may come as
    ``x-api-key`` or as ``Authorization: Bearer``."""
    messages, sequences = parse_body(body)
    ask = TurnAsk(body.model, messages, body.temperature, body.max_tokens)

    async def deliver(turn: ChatTurn) -> Response:
        stop = StopAt(sequences)
        if not body.stream:
            return await _complete(turn, request, stop)

        def make(turn: ChatTurn, feed: Feed, first: Any, keepalive: float) -> TurnStream:
            return _MessageStream(turn, feed, first, keepalive, stop)

        keepalive = services.settings.chat_keepalive_seconds
        return await open_stream(turn, keepalive, make, stop.deltas(turn.deltas()))

    return await serve_turn(request, principal, services, ask, deliver)
