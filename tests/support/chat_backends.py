"""A scripted ChatBackend for API tests: emits known tokens at a known pace and records
how many it produced and whether it was stopped (so disconnect handling is observable)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

from hypereal.backends.base import BackendError, ChatDelta, ChatRequest


class ScriptedChat:
    """Options: ``tokens`` (list of strings), ``delay`` seconds per token, ``first_delay``,
    ``fail_after`` (raise BackendError after that many tokens; with ``client_error`` true it
    is one the request caused), ``context_length`` (the context the "model" holds, exposed
    as the optional ``context_length`` of chat backends), ``bug_after`` (raise a
    RuntimeError, as a bug would, after that many tokens), ``name``."""

    runs: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.tokens: list[str] = list(options.get("tokens", ["Hello", " there", "!"]))
        self.delay = float(options.get("delay", 0.0))
        self.first_delay = float(options.get("first_delay", 0.0))
        self.fail_after: int | None = options.get("fail_after")
        self.client_error = bool(options.get("client_error", False))
        self.bug_after: int | None = options.get("bug_after")
        length = options.get("context_length")
        self.context_length: int | None = int(length) if length is not None else None
        self.name = str(options.get("name", "scripted"))

    # Backend name -> how many prompts it tokenized.
    counted: ClassVar[dict[str, int]] = {}

    async def count_prompt_tokens(self, request: ChatRequest) -> int:
        self.counted[self.name] = self.counted.get(self.name, 0) + 1
        # One token per whitespace-separated word plus 3 per message (template overhead).
        return sum(len(m.content.split()) + 3 for m in request.messages)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        run = {"produced": 0, "stopped": False, "finished": False, "calls": 1}
        previous = self.runs.get(self.name)
        run["calls"] = (previous or {}).get("calls", 0) + 1
        self.runs[self.name] = run
        limit = min(len(self.tokens), request.max_tokens)
        try:
            await asyncio.sleep(self.first_delay)
            for index in range(limit):
                if self.fail_after is not None and index == self.fail_after:
                    if self.client_error:
                        raise BackendError("the prompt is too long", client_error=True)
                    raise BackendError("the model crashed")
                if self.bug_after is not None and index == self.bug_after:
                    raise RuntimeError("secret internals at /srv/hypereal/secret.py")
                if index:
                    await asyncio.sleep(self.delay)
                run["produced"] += 1
                yield ChatDelta(text=self.tokens[index])
            reason = "stop" if limit == len(self.tokens) else "length"
            run["finished"] = True
            yield ChatDelta(finish_reason=reason, completion_tokens=limit)
        finally:
            if not run["finished"]:
                run["stopped"] = True
