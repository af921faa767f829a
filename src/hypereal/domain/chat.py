"""One chat turn as the ledger sees it: check the context, reserve the most it can cost,
stream deltas, then settle to the real cost (refunding the difference) exactly once.

The API formats the deltas (JSON or SSE); everything billable happens here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from hypereal.backends.base import BackendError, ChatBackend, ChatDelta, ChatMessage, ChatRequest
from hypereal.domain import keys, ledger
from hypereal.domain.catalogue import ModelSpec, check_text
from hypereal.domain.errors import BadRequest, GenerationFailed, InsufficientCredits, UpstreamError
from hypereal.domain.generation import Charge, client_error
from hypereal.domain.ids import new_id
from hypereal.domain.pricing import chat_price
from hypereal.store.db import Database

ROLES = ("system", "user", "assistant")
DEFAULT_CONTEXT_TOKENS = 32768


def parse_messages(raw: object) -> list[ChatMessage]:
    """Validate the ``messages`` field. Raises BadRequest naming the offending item."""
    if raw is None:
        raise BadRequest("Missing required field 'messages'")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("Invalid value for 'messages': must be a non-empty array")
    messages = []
    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f"Invalid value for '{where}': must be an object")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise BadRequest(f"Invalid value for '{where}.role': must be one of {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI content parts: text ones only
            parts = [
                p.get("text") if isinstance(p, dict) and p.get("type", "text") == "text" else None
                for p in content
            ]
            if not all(isinstance(p, str) for p in parts):
                raise BadRequest(
                    f"Invalid value for '{where}.content': only text parts are supported"
                )
            content = "".join(str(p) for p in parts)
        if not isinstance(content, str):
            raise BadRequest(f"Invalid value for '{where}.content': must be a string")
        check_text(content, f"{where}.content")
        messages.append(ChatMessage(role=role, content=content))
    return messages


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


STOP_SEQUENCES = 4  # OpenAI's limit


def check_option(name: str, value: Any) -> Any:
    """An OpenAI chat field passed on to an upstream (``stop``, ``seed``, ``response_format``),
    checked: BadRequest (400) naming the field when it is malformed."""
    if name == "stop":
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
    if name == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
            raise BadRequest("Invalid value for 'seed': must be an integer")
        return value
    if name == "response_format":
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema" and isinstance(value.get("json_schema"), dict):
            return value
        raise BadRequest(
            "Invalid value for 'response_format': type json_object, or json_schema with a "
            "json_schema object"
        )
    raise BadRequest(f"Invalid value for '{name}': not passed on to any chat backend")


@dataclass
class ChatTurn:
    """A metered chat turn. Use :meth:`open`, iterate :meth:`deltas`, then :meth:`settle`."""

    spec: ModelSpec
    backend: ChatBackend
    request: ChatRequest
    prompt_tokens: int
    charge: Charge
    id: str
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None

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
        maximum cost (``max_tokens``, cut to the room the context leaves, as completion).

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
        reserved = chat_price(spec, len(request.messages), prompt_tokens, room)
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
        )

    async def deltas(self) -> AsyncGenerator[ChatDelta]:
        """The backend's deltas, counted as they pass. Closing this iterator closes the
        backend's stream, which stops generation."""
        stream = self.backend.stream(self.request)
        try:
            async for delta in stream:
                if delta.text:
                    self.text.append(delta.text)
                    self.completion_tokens += 1
                if delta.completion_tokens is not None:
                    self.completion_tokens = delta.completion_tokens
                if delta.prompt_tokens is not None:
                    self.prompt_tokens = delta.prompt_tokens
                if delta.finish_reason is not None:
                    self.finish_reason = delta.finish_reason
                yield delta
        except BackendError as exc:
            raise client_error(exc, failure=UpstreamError) from exc
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    @property
    def content(self) -> str:
        return "".join(self.text)

    async def settle(self, *, delivered: bool = True) -> int:
        """Charge what was generated (all of the reservation at most), refund the rest.

        ``delivered=False`` means the client received none of it (a failed non-streaming
        request, or a failure before a stream began): everything is refunded.
        Idempotent: the first call decides. Returns the credits used. Shielded: it completes
        even when the caller is being cancelled (a client gone, a stream torn down).
        """
        if not delivered or (self.completion_tokens == 0 and self.finish_reason is None):
            actual = 0  # nothing was generated or nothing reached the client: nothing is owed
        elif self.spec.pass_through is not None:  # the upstream's bill x markup
            bill = self.request.upstream_bill or {}
            actual = self.spec.pass_through.charge(bill.get("credits_used"))
        else:
            actual = chat_price(
                self.spec, len(self.request.messages), self.prompt_tokens, self.completion_tokens
            )
        reserved = self.charge.reserved
        with anyio.CancelScope(shield=True):
            used = await self.charge.settle(
                actual,
                note=f"chat {self.spec.slug}: settled at {min(actual, reserved)} of {reserved} "
                "reserved",
            )
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


__all__ = ["ChatTurn", "GenerationFailed", "context_limit", "parse_messages"]
