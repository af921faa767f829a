"""One chat turn as the ledger sees it: check the context, reserve the most it can cost,
stream deltas, then settle to the real cost (refunding the difference) exactly once.

The API formats the deltas (JSON or SSE); everything billable happens here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from hypereal.backends.base import (
    BackendError,
    ChatBackend,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ToolCall,
)
from hypereal.domain import keys, ledger
from hypereal.domain.catalogue import ModelSpec, check_text
from hypereal.domain.chat_options import message_tool_calls, tool_call_id
from hypereal.domain.errors import BadRequest, GenerationFailed, InsufficientCredits, UpstreamError
from hypereal.domain.generation import Charge, client_error
from hypereal.domain.ids import new_id
from hypereal.domain.pricing import chat_price
from hypereal.store.db import Database

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_CONTEXT_TOKENS = 32768


def parse_messages(raw: object) -> list[ChatMessage]:
    """Validate the ``messages`` field: OpenAI's roles, text content (a string or text
    parts), an assistant's ``tool_calls`` (its content then may be null), a ``tool``
    message's ``tool_call_id``. Raises BadRequest naming the offending item."""
    if raw is None:
        raise BadRequest("Missing required field 'messages'")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("Invalid value for 'messages': must be a non-empty array")
    return [_message(item, f"messages[{index}]") for index, item in enumerate(raw)]


def _message(item: object, where: str) -> ChatMessage:
    if not isinstance(item, dict):
        raise BadRequest(f"Invalid value for '{where}': must be an object")
    role, content = item.get("role"), item.get("content")
    if role not in ROLES:
        raise BadRequest(f"Invalid value for '{where}.role': must be one of {', '.join(ROLES)}")
    where_content = f"{where}.content"
    if role == "tool":
        call_id = tool_call_id(item.get("tool_call_id"), f"{where}.tool_call_id")
        return ChatMessage(
            role=role, content=_content(content, where_content), tool_call_id=call_id
        )
    calls = item.get("tool_calls") if role == "assistant" else None
    if calls is None:
        return ChatMessage(role=role, content=_content(content, where_content))
    tool_calls = message_tool_calls(calls, f"{where}.tool_calls")
    text = "" if content is None else _content(content, where_content)
    return ChatMessage(role=role, content=text, tool_calls=tool_calls)


def _content(content: object, where: str) -> str:
    """A message's text: a string, or OpenAI content parts (text ones only) joined."""
    if isinstance(content, list):
        parts = [
            p.get("text") if isinstance(p, dict) and p.get("type", "text") == "text" else None
            for p in content
        ]
        if not all(isinstance(p, str) for p in parts):
            raise BadRequest(f"Invalid value for '{where}': only text parts are supported")
        content = "".join(str(p) for p in parts)
    if not isinstance(content, str):
        raise BadRequest(f"Invalid value for '{where}': must be a string")
    return check_text(content, where)


def context_limit(spec: ModelSpec, backend: ChatBackend) -> int:
    """Tokens of context the turn may use: the catalogue's ``context_tokens`` (32768 when
    unset), or less when the backend knows its model holds less (``context_length``)."""
    limit = spec.context_tokens or DEFAULT_CONTEXT_TOKENS
    real = getattr(backend, "context_length", None)
    if isinstance(real, int) and not isinstance(real, bool) and real > 0:
        limit = min(limit, real)
    return limit


# Prompts at least this long (characters, all messages together) have the balance checked
# for the turn's minimum charge before they are tokenized: tokenizing a long prompt costs
# more CPU than reading the balance. A short prompt tokenizes in microseconds and the
# reservation's own check answers its 402.
PRECHECK_PROMPT_CHARS = 4096


async def _check_minimum(
    db: Database, account_id: str, spec: ModelSpec, messages: Sequence[ChatMessage]
) -> None:
    """InsufficientCredits (402) when the balance cannot pay the least the turn costs
    (``base_credits`` per message, no tokens), checked only for a long prompt (see
    PRECHECK_PROMPT_CHARS)."""
    size = 0
    for message in messages:  # a short prompt leaves here, at the cost of this loop
        size += len(message.content) + 8
        if size >= PRECHECK_PROMPT_CHARS:
            break
    else:
        return
    minimum = chat_price(spec, len(messages), 0, 0)
    if minimum <= 0:
        return
    available = await ledger.balance(db, account_id)
    if available < minimum:
        raise InsufficientCredits(required=minimum, available=available)


def merge_tool_calls(pieces: Iterable[ToolCall]) -> list[ToolCall]:
    """The whole calls of an answer from its streamed pieces, merged by ``index`` (in index
    order): the first ``id`` and ``name`` a call's pieces carry, its ``arguments`` fragments
    joined in order. Pieces that are whole calls (a non-streamed answer) pass unchanged."""
    calls: dict[int, ToolCall] = {}
    for piece in pieces:
        call = calls.get(piece.index)
        calls[piece.index] = (
            piece
            if call is None
            else replace(
                call,
                id=call.id or piece.id,
                name=call.name or piece.name,
                arguments=call.arguments + piece.arguments,
            )
        )
    return [calls[index] for index in sorted(calls)]


@dataclass
class Choice:
    """One answer of a turn (OpenAI's ``choices[i]``): its text, the pieces of the tool
    calls it asked for, and how it ended."""

    text: list[str] = field(default_factory=list)
    tool_pieces: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def content(self) -> str:
        return "".join(self.text)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return merge_tool_calls(self.tool_pieces)


@dataclass
class ChatTurn:
    """A metered chat turn. Use :meth:`open`, iterate :meth:`deltas`, then :meth:`settle`.
    ``choices`` holds the ``n`` answers asked for (one, usually)."""

    spec: ModelSpec
    backend: ChatBackend
    request: ChatRequest
    prompt_tokens: int
    charge: Charge
    id: str
    choices: list[Choice]
    completion_tokens: int = 0

    @classmethod
    async def open(
        cls,
        db: Database,
        account_id: str,
        spec: ModelSpec,
        backend: ChatBackend,
        messages: Sequence[ChatMessage],
        temperature: float,
        max_tokens: int,
        upstream_model: str | None,
        *,
        whole: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> ChatTurn:
        """Count the prompt, enforce the context limit (:func:`context_limit`) and reserve the
        maximum cost (``max_tokens``, cut to the room the context leaves, as completion, for
        each of the ``n`` choices ``options`` may ask for).

        ``whole``: the client takes the answer in one piece (``ChatRequest.whole``).

        Raises BadRequest (context exceeded) or InsufficientCredits (402) before any
        generation starts.
        """
        keys.check_model(spec.slug)  # the key's allow-list first (403)
        request = ChatRequest(
            messages=tuple(messages),
            temperature=temperature,
            max_tokens=max_tokens,
            upstream_model=upstream_model,
            whole=whole and getattr(backend, "answers_whole", False) is True,
            upstream_bill={} if spec.pass_through is not None else None,
            options=options,
        )
        await _check_minimum(db, account_id, spec, messages)
        try:
            prompt_tokens = await backend.count_prompt_tokens(request)
        except BackendError as exc:
            raise UpstreamError(f"Could not count prompt tokens: {exc.message}") from exc
        limit = context_limit(spec, backend)
        if prompt_tokens >= limit:
            raise BadRequest(
                f"This conversation is {prompt_tokens} tokens, over the {limit}-token context "
                f"limit of {spec.slug}; shorten the messages"
            )
        # Never ask for more than the context has room for.
        room = min(max_tokens, limit - prompt_tokens)
        if room != max_tokens:
            request = replace(request, max_tokens=room)
        turn_id = "chatcmpl-" + new_id("c")[2:]
        reserved = chat_price(
            spec, len(request.messages), prompt_tokens, room * request.choice_count
        )
        charge = await Charge.reserve(
            db, account_id, reserved, reference=turn_id, label=f"chat {spec.slug}", model=spec.slug
        )
        return cls(
            spec=spec,
            backend=backend,
            request=request,
            prompt_tokens=prompt_tokens,
            charge=charge,
            id=turn_id,
            choices=[Choice() for _ in range(request.choice_count)],
        )

    async def deltas(self) -> AsyncGenerator[ChatDelta]:
        """The backend's deltas, counted as they pass (a token per text delta and per
        tool-call piece, until the backend's own count comes). Closing this iterator closes
        the backend's stream, which stops generation. A delta of a choice that was not asked
        for is an UpstreamError."""
        stream = self.backend.stream(self.request)
        try:
            async for delta in stream:
                if delta.choice >= len(self.choices):
                    raise UpstreamError("The upstream answered more choices than were asked for")
                choice = self.choices[delta.choice]
                if delta.text:
                    choice.text.append(delta.text)
                    self.completion_tokens += 1
                if delta.tool_calls:
                    choice.tool_pieces.extend(delta.tool_calls)
                    self.completion_tokens += len(delta.tool_calls)
                if delta.completion_tokens is not None:
                    self.completion_tokens = delta.completion_tokens
                if delta.prompt_tokens is not None:
                    self.prompt_tokens = delta.prompt_tokens
                if delta.finish_reason is not None:
                    choice.finish_reason = delta.finish_reason
                yield delta
        except BackendError as exc:
            raise client_error(exc, failure=UpstreamError) from exc
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    @property
    def content(self) -> str:
        """The first choice's text."""
        return self.choices[0].content

    @property
    def finish_reason(self) -> str | None:
        """How the first choice ended (None while it runs)."""
        return self.choices[0].finish_reason

    async def settle(self, *, delivered: bool = True) -> int:
        """Charge what was generated (all of the reservation at most), refund the rest.

        ``delivered=False`` means the client received none of it (a failed non-streaming
        request, or a failure before a stream began): everything is refunded.
        Idempotent: the first call decides. Returns the credits used. Shielded: it completes
        even when the caller is being cancelled (a client gone, a stream torn down).
        """
        ended = any(choice.finish_reason is not None for choice in self.choices)
        if not delivered or (self.completion_tokens == 0 and not ended):
            actual = 0  # nothing was generated or nothing reached the client: nothing is owed
        elif self.spec.pass_through is not None:  # the upstream's bill x markup
            bill = self.request.upstream_bill or {}
            actual = self.spec.pass_through.charge(bill.get("credits_used"))
        else:
            actual = chat_price(
                self.spec, len(self.request.messages), self.prompt_tokens, self.completion_tokens
            )
        reserved = self.charge.reserved
        note = f"chat {self.spec.slug}: settled at {min(actual, reserved)} of {reserved} reserved"
        if self.charge.settles_at_once(actual):
            # No wait: nothing a cancellation could interrupt (an anyio scope costs 3 us).
            return await self.charge.settle(actual, note=note)
        with anyio.CancelScope(shield=True):
            used = await self.charge.settle(actual, note=note)
        return used

    @property
    def credits_used(self) -> int | None:
        return self.charge.used

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


__all__ = [
    "ChatTurn",
    "Choice",
    "GenerationFailed",
    "context_limit",
    "merge_tool_calls",
    "parse_messages",
]
