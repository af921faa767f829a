"""LLM chat: ``/spicy-chat`` and ``/chat`` (stream by default) and the OpenAI-shaped
``/chat/completions`` (stream off by default). One implementation serves all three.

The way a metered turn is delivered (a read-ahead :class:`Feed`, :class:`TurnStream` with its
keep-alives, :func:`open_stream`, :func:`run_turn` with its disconnect watch) is shared with
the Anthropic-shaped ``/messages`` (``messages.py``), which formats the same turn its way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from abc import ABCMeta, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from hypereal.api.deps import PrincipalDep, ServicesDep
from hypereal.api.idempotency import idempotent
from hypereal.api.responses import FastJSONResponse
from hypereal.backends.base import ChatDelta, ChatMessage
from hypereal.domain.chat import ChatTurn, Choice, parse_messages
from hypereal.domain.chat_options import chat_options
from hypereal.domain.errors import HyperealError
from hypereal.domain.keys import Principal
from hypereal.services import Services

router = APIRouter(tags=["chat"])
logger = logging.getLogger(__name__)

# nginx's status for "the client closed the connection before the answer was ready".
CLIENT_CLOSED_REQUEST = 499
# Deltas read ahead of a slow SSE client before the backend is held back.
FEED_AHEAD = 64
# A non-streamed answer still running after this many seconds starts watching for the
# client's disconnect (see _complete).
DISCONNECT_WATCH_AFTER = 0.25


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: Any = None
    model: str | None = None
    # Strict: "stream": "false" or "temperature": true is a 400, not silently coerced.
    temperature: float = Field(default=0.8, ge=0.0, le=2.0, strict=True)
    max_tokens: int = Field(default=4096, ge=1, le=32768, strict=True)
    stream: bool | None = Field(default=None, strict=True)
    # OpenAI fields passed on to a backend that can honour them, else a 400 (chat_options).
    tools: Any = None
    tool_choice: Any = None
    stop: Any = None
    seed: Any = None
    n: Any = None
    response_format: Any = None


OPTION_FIELDS = ("tools", "tool_choice", "stop", "seed", "n", "response_format")


def _chunk(
    turn: ChatTurn, created: int, choice: dict[str, Any], index: int = 0, **extra: Any
) -> bytes:
    payload = {
        "id": turn.id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": turn.spec.slug,
        "choices": [{"index": index, **choice}],
        **extra,
    }
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class _DeltaChunks:
    """``chat.completion.chunk`` events of one stream carrying a delta (content, tool-call
    pieces), with the part every chunk of a choice shares (id, object, created, model, index)
    rendered once: per chunk only the delta is encoded. The bytes are those :func:`_chunk`
    writes for the same chunk. The first delta of each choice names the role."""

    def __init__(self, turn: ChatTurn, created: int) -> None:
        self._turn = turn
        self._created = created
        self._frames: dict[int, tuple[bytes, bytes]] = {}  # choice -> (head, tail)

    def __call__(self, item: ChatDelta) -> bytes:
        frame = self._frames.get(item.choice)
        delta: dict[str, Any] = {}
        if frame is None:
            head = _chunk(
                self._turn, self._created, {"delta": None, "finish_reason": None}, item.choice
            )
            before, _, after = head.partition(b'"delta": null')
            frame = self._frames[item.choice] = (before + b'"delta": ', after)
            delta["role"] = "assistant"
        if item.text:
            delta["content"] = item.text
        if item.tool_calls:
            delta["tool_calls"] = [call.piece() for call in item.tool_calls]
        return frame[0] + json.dumps(delta, ensure_ascii=False).encode() + frame[1]


class Feed:
    """The backend's deltas read ahead by one task into a small queue, so the SSE writer can
    wait for the next one with a keep-alive timeout without cancelling the backend's stream
    (and without a task per delta). The queue is bounded: a client that reads slowly holds
    the backend back. :meth:`stop` closes the deltas, which stops the backend."""

    END: Any = object()

    def __init__(self, deltas: AsyncGenerator[ChatDelta]) -> None:
        self._deltas = deltas
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=FEED_AHEAD)
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async with contextlib.aclosing(self._deltas) as deltas:
            try:
                async for delta in deltas:
                    await self._queue.put(delta)
            except Exception as exc:  # handed to the writer, which reports it
                await self._queue.put(exc)
                return
        await self._queue.put(self.END)

    async def next(self, timeout: float) -> Any:
        """The next delta, an exception the backend raised, :attr:`END`, or None when
        ``timeout`` seconds passed without any."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    def ready(self) -> bool:
        """Whether :meth:`next` has an item at once."""
        return not self._queue.empty()

    async def stop(self) -> None:
        """Stop reading and close the deltas, shielded from the cancellation that usually
        brings us here; waits until the backend let go."""
        with anyio.CancelScope(shield=True):
            if not self._task.done():
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("Closing a chat stream failed")


class ClientWatch:
    """Cancels the task that made it when the client disconnects (``receive`` answers
    ``http.disconnect``: the request body has been read), from :meth:`start` until
    :meth:`stop`; :attr:`left` says whether it did. While watching it costs one task, before
    it starts none."""

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self.left = False

    def start(self, after: float = 0.0) -> None:
        """Watch from now, or from ``after`` seconds from now."""
        if after > 0:
            self._timer = asyncio.get_running_loop().call_later(after, self.start)
        elif not self._stopped:
            self._timer = None
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._stopped:  # else the answer is complete: nothing to stop
            self.left = True
            self._task.cancel()

    def stop(self) -> None:
        """Stop watching. Called with no await since the work ended, the watcher cannot
        cancel that work any more."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()


class TurnStream(StreamingResponse, metaclass=ABCMeta):
    """The SSE answer of a turn whose first delta (``first``, or None when it has not come
    yet) was awaited for a while. Subclasses write the events (:meth:`_sse`), reading the
    deltas from :meth:`_items`. However the response ends (finished, client gone, never
    started), the backend is stopped and the turn settled."""

    def __init__(self, turn: ChatTurn, feed: Feed, first: Any, keepalive: float) -> None:
        self._turn = turn
        self._feed = feed
        self._first = first
        self._keepalive = keepalive
        self._events = self._sse()
        super().__init__(
            self._events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream in the request's own task while a :class:`ClientWatch` stops it when the
        client leaves (Starlette's StreamingResponse would run an anyio task group with the
        stream in a second task: more CPU per stream, and the first event a loop turn
        later)."""
        watch = ClientWatch(receive)
        watch.start()
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not watch.left:
                raise
            # The client left: the answer ends here (the finally below settles it).
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
        finally:
            watch.stop()  # no await since the stream ended: the watcher cannot cancel now
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(RuntimeError):  # still running: it closes itself
                    await self._events.aclose()
                await self._feed.stop()
                await self._turn.settle()

    @abstractmethod
    def _sse(self) -> AsyncGenerator[bytes]:
        """The response's events, in the subclass's wire format."""

    async def _items(self) -> AsyncGenerator[ChatDelta | None]:
        """The backend's deltas as they come, None for each keep-alive interval that passed
        without one; raises what the backend raised."""
        item, self._first = self._first, None
        while item is not Feed.END:
            if isinstance(item, BaseException):
                raise item
            yield item
            item = await self._feed.next(self._keepalive)


class _ChatStream(TurnStream):
    """Chunks as the backend yields them, keep-alive comments while it is silent, the final
    chunk with finish_reason/usage/creditsUsed, then ``[DONE]``. An error after the stream
    began arrives as a ``data:`` event with ``error``. The chunks of deltas that are already
    waiting are written together (one write, the same events)."""

    async def _sse(self) -> AsyncGenerator[bytes]:
        turn, feed = self._turn, self._feed
        created = int(time.time())
        delta_chunk = _DeltaChunks(turn, created)
        waiting: list[bytes] = []  # events not written yet
        try:
            async with contextlib.aclosing(self._items()) as items:
                async for item in items:
                    if item is None:
                        waiting.append(b": keep-alive\n\n")
                    elif item.text or item.tool_calls:
                        waiting.append(delta_chunk(item))
                    if waiting and not feed.ready():
                        events = b"".join(waiting)
                        waiting.clear()
                        yield events
            if waiting:  # the last deltas go out now, not after the settle's commit
                events = b"".join(waiting)
                waiting.clear()
                yield events
            credits = await turn.settle()
            waiting.extend(_final_chunks(turn, created, credits))
            waiting.append(b"data: [DONE]\n\n")
            yield b"".join(waiting)
        except HyperealError as exc:
            waiting.append(_error_event(exc.message, exc.status, await turn.settle()))
            yield b"".join(waiting)
        except Exception:
            logger.exception("Chat stream %s failed", turn.id)
            waiting.append(_error_event("Internal server error", 500, await turn.settle()))
            yield b"".join(waiting)
        finally:
            await feed.stop()
            await turn.settle()


def _final_chunks(turn: ChatTurn, created: int, credits: int) -> list[bytes]:
    """The ``finish_reason`` chunk of each choice, the last one with the turn's usage and
    ``creditsUsed``."""
    last = len(turn.choices) - 1
    return [
        _chunk(
            turn,
            created,
            {"delta": {}, "finish_reason": choice.finish_reason or "stop"},
            index,
            **({"usage": turn.usage(), "creditsUsed": credits} if index == last else {}),
        )
        for index, choice in enumerate(turn.choices)
    ]


def _error_event(message: str, status: int, credits: int) -> bytes:
    error = {"error": {"message": message, "code": status}, "creditsUsed": credits}
    return f"data: {json.dumps(error)}\n\n".encode()


StreamFactory = Callable[[ChatTurn, Feed, Any, float], TurnStream]


async def open_stream(
    turn: ChatTurn,
    keepalive: float,
    make: StreamFactory,
    deltas: AsyncGenerator[ChatDelta] | None = None,
) -> Response:
    """Wait up to one keep-alive interval for the first delta, so that a backend failing
    before its first token (upstream 4xx/5xx, context errors) is a JSON error with its own
    status, fully refunded, not a 200 stream carrying an error event. A first token slower
    than that starts the stream (``make``), whose keep-alives then cover the wait.
    ``deltas`` replaces ``turn.deltas()`` (a filter over them)."""
    feed = Feed(turn.deltas() if deltas is None else deltas)
    try:
        first = await feed.next(keepalive)
    except BaseException:
        await feed.stop()
        await turn.settle()
        raise
    if isinstance(first, BaseException):
        await feed.stop()
        await turn.settle(delivered=False)
        raise first
    return make(turn, feed, first, keepalive)


async def run_turn(
    turn: ChatTurn, request: Request, deltas: AsyncGenerator[ChatDelta] | None = None
) -> Response | None:
    """Generate the whole answer (``deltas``, by default ``turn.deltas()``) unless the client
    leaves first: then generation stops, the turn is billed for what was generated and the
    answer nobody reads is returned. Else None: the turn is complete, not yet settled. A
    failure refunds everything (the client got nothing) and is raised.

    The generation runs in the request's own task. Only an answer still running after
    DISCONNECT_WATCH_AFTER gets a watcher task, which cancels the request's task when the
    client disconnects: most answers end sooner and cost no extra task. An answer asked of
    the upstream whole (``turn.request.whole``) is not watched: it is generated whole once
    asked for, and billed so."""
    watch = ClientWatch(request.receive)
    if not turn.request.whole:
        watch.start(after=DISCONNECT_WATCH_AFTER)
    try:
        async with contextlib.aclosing(turn.deltas() if deltas is None else deltas) as items:
            async for _ in items:
                pass
        watch.stop()  # no await since the generation ended: the watcher cannot cancel now
    except asyncio.CancelledError:
        watch.stop()
        if not watch.left:
            await turn.settle()  # cancelled (server shutdown): stopped, bill the part
            raise
        # The client disconnected: the backend is stopped (the deltas are closed); bill what
        # it generated. Nobody reads this answer; a non-2xx status keeps it out of the
        # idempotency store.
        task = asyncio.current_task()
        assert task is not None
        task.uncancel()
        credits = await turn.settle()
        return FastJSONResponse(
            {"error": "Client closed the request", "creditsUsed": credits},
            status_code=CLIENT_CLOSED_REQUEST,
        )
    except BaseException:
        await turn.settle(delivered=False)
        raise
    finally:
        watch.stop()
    return None


async def _complete(turn: ChatTurn, request: Request) -> Response:
    left = await run_turn(turn, request)
    if left is not None:
        return left
    credits = await turn.settle()
    return FastJSONResponse(
        {
            "id": turn.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": turn.spec.slug,
            "choices": [_answer(index, choice) for index, choice in enumerate(turn.choices)],
            "usage": turn.usage(),
            "creditsUsed": credits,
        }
    )


def _answer(index: int, choice: Choice) -> dict[str, Any]:
    """One choice of a whole answer: its text (null when it only calls tools) and calls."""
    calls = choice.tool_calls
    message: dict[str, Any] = {
        "role": "assistant",
        "content": choice.content or (None if calls else ""),
    }
    if calls:
        message["tool_calls"] = [call.public() for call in calls]
    return {"index": index, "message": message, "finish_reason": choice.finish_reason or "stop"}


@dataclass(frozen=True)
class TurnAsk:
    """A chat turn as a route asks for it, parsed from the route's own request shape.
    ``fields``: the OpenAI fields the client set, for :func:`chat_options`; ``whole``: the
    client takes the answer in one piece (``ChatRequest.whole``)."""

    model: str | None
    messages: list[ChatMessage]
    temperature: float
    max_tokens: int
    fields: Mapping[str, Any] = field(default_factory=dict)
    whole: bool = False


async def serve_turn(
    request: Request,
    principal: Principal,
    services: Services,
    ask: TurnAsk,
    deliver: Callable[[ChatTurn], Awaitable[Response]],
) -> Response:
    """The route-independent part of a chat request: the model and its backend, the options
    it can honour (a 400 before anything is charged), then, idempotently, the turn opened
    (reserved) and handed to ``deliver``, which answers in the route's format."""
    spec = services.catalogue.get(ask.model, "chat")
    resolved = services.backends.resolve(spec)
    options = chat_options(ask.fields, spec.slug, resolved.backend, ask.messages)

    async def produce() -> Response:
        turn = await ChatTurn.open(
            services.db,
            principal.account_id,
            spec,
            resolved.backend,
            ask.messages,
            ask.temperature,
            ask.max_tokens,
            resolved.upstream_model,
            whole=ask.whole,
            options=options,
        )
        return await deliver(turn)

    return await idempotent(request, principal, services, produce)


async def _chat(
    request: Request,
    body: ChatBody,
    principal: PrincipalDep,
    services: Services,
    stream_default: bool,
) -> Response:
    messages = parse_messages(body.messages)
    stream = body.stream if body.stream is not None else stream_default
    fields = {
        name: getattr(body, name) for name in OPTION_FIELDS if getattr(body, name) is not None
    }
    ask = TurnAsk(body.model, messages, body.temperature, body.max_tokens, fields, not stream)

    async def deliver(turn: ChatTurn) -> Response:
        if stream:
            return await open_stream(turn, services.settings.chat_keepalive_seconds, _ChatStream)
        return await _complete(turn, request)

    return await serve_turn(request, principal, services, ask, deliver)


@router.post("/spicy-chat")
async def spicy_chat(
    request: Request, body: ChatBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """The spec's LLM chat (streams by default)."""
    return await _chat(request, body, principal, services, stream_default=True)


@router.post("/chat")
async def chat(
    request: Request, body: ChatBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """Same as ``/spicy-chat``."""
    return await _chat(request, body, principal, services, stream_default=True)


@router.post("/chat/completions")
async def chat_completions(
    request: Request, body: ChatBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """OpenAI-compatible chat completions (``stream`` defaults to false)."""
    return await _chat(request, body, principal, services, stream_default=False)
