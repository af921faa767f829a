"""LLM chat: ``/spicy-chat`` and ``/chat`` (stream by default) and the OpenAI-shaped
``/chat/completions`` (stream off by default). One implementation serves all three."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hypereal.api.deps import PrincipalDep, ServicesDep
from hypereal.api.idempotency import idempotent
from hypereal.domain.chat import ChatTurn, parse_messages
from hypereal.domain.errors import HyperealError
from hypereal.services import Services

router = APIRouter(tags=["chat"])


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: Any = None
    model: str | None = None
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    max_tokens: int = Field(default=4096, ge=1, le=32768)
    stream: bool | None = None


def _chunk(turn: ChatTurn, created: int, choice: dict[str, Any], **extra: Any) -> bytes:
    payload = {
        "id": turn.id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": turn.spec.slug,
        "choices": [{"index": 0, **choice}],
        **extra,
    }
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def _settle(turn: ChatTurn) -> int:
    # Runs even when the client went away and the stream task is being cancelled.
    credits = 0
    with anyio.CancelScope(shield=True):
        credits = await turn.settle()
    return credits


async def _sse(turn: ChatTurn, keepalive: float) -> AsyncIterator[bytes]:
    """Chunks as the backend yields them, keep-alive comments while it is silent, the final
    chunk with finish_reason/usage/creditsUsed, then ``[DONE]``. An error after the stream
    began arrives as a ``data:`` event with ``error``."""
    created = int(time.time())
    deltas = turn.deltas().__aiter__()
    pending: asyncio.Future[Any] | None = None
    first = True
    try:
        while True:
            pending = asyncio.ensure_future(deltas.__anext__())
            while not (await asyncio.wait({pending}, timeout=keepalive))[0]:
                yield b": keep-alive\n\n"
            try:
                delta = pending.result()
            except StopAsyncIteration:
                break
            if delta.text:
                content = (
                    {"role": "assistant", "content": delta.text}
                    if first
                    else {"content": delta.text}
                )
                first = False
                yield _chunk(turn, created, {"delta": content, "finish_reason": None})
        credits = await _settle(turn)
        yield _chunk(
            turn,
            created,
            {"delta": {}, "finish_reason": turn.finish_reason or "stop"},
            usage=turn.usage(),
            creditsUsed=credits,
        )
        yield b"data: [DONE]\n\n"
    except HyperealError as exc:
        credits = await _settle(turn)
        error = {"error": {"message": exc.message, "code": exc.status}, "creditsUsed": credits}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # the client left: stop the backend
            with contextlib.suppress(BaseException):
                await pending
        await _settle(turn)


async def _complete(turn: ChatTurn) -> JSONResponse:
    try:
        async for _ in turn.deltas():
            pass
    finally:
        credits = await _settle(turn)
    return JSONResponse(
        {
            "id": turn.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": turn.spec.slug,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": turn.content},
                    "finish_reason": turn.finish_reason or "stop",
                }
            ],
            "usage": turn.usage(),
            "creditsUsed": credits,
        }
    )


async def _chat(
    request: Request,
    body: ChatBody,
    principal: PrincipalDep,
    services: Services,
    stream_default: bool,
) -> Response:
    messages = parse_messages(body.messages)
    spec = services.catalogue.get(body.model, "chat")
    resolved = services.backends.resolve(spec)

    async def produce() -> Response:
        turn = await ChatTurn.open(
            services.db,
            principal.account_id,
            spec,
            resolved.backend,
            messages,
            body.temperature,
            body.max_tokens,
            resolved.upstream_model,
        )
        if body.stream if body.stream is not None else stream_default:
            return StreamingResponse(
                _sse(turn, services.settings.chat_keepalive_seconds),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(turn)

    return await idempotent(request, principal, services, produce)


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
