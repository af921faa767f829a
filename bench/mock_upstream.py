"""A minimal, fast OpenAI-compatible upstream for the chat benchmarks (a raw ASGI app).

``POST /v1/chat/completions``: with ``stream: true`` one role chunk, ``--tokens`` content
chunks (one token each), a ``finish_reason`` chunk, a usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``; without it one
``chat.completion`` object. ``GET /health`` answers ``ok``. Run:
``python -m bench.mock_upstream --port P --tokens 16 [--token-delay S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvicorn

Scope = dict[str, Any]


def make_app(tokens: int, token_delay: float) -> Any:
    words = [f"tok{i} " for i in range(tokens)]

    def chunk(cid: str, created: int, model: str, **fields: Any) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        body.update(fields)
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    async def read_body(receive: Any) -> bytes:
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(parts)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        if path != "/v1/chat/completions" or scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error":{"message":"nf"}}'})
            return
        request = json.loads(await read_body(receive))
        model = str(request.get("model") or "mock-model")
        limit = request.get("max_tokens") or request.get("max_completion_tokens") or tokens
        count = min(tokens, int(limit))
        prompt = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
        usage = {"prompt_tokens": prompt, "completion_tokens": count}
        usage["total_tokens"] = prompt + count
        finish = "stop" if count == tokens else "length"
        created = int(time.time())
        cid = f"chatcmpl-mock{created}"
        if not request.get("stream"):
            body = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words[:count])},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        await emit(chunk(cid, created, model, choices=[role]))
        for word in words[:count]:
            if token_delay:
                await asyncio.sleep(token_delay)
            choice = {"index": 0, "delta": {"content": word}, "finish_reason": None}
            await emit(chunk(cid, created, model, choices=[choice]))
        end = {"index": 0, "delta": {}, "finish_reason": finish}
        await emit(chunk(cid, created, model, choices=[end]))
        if (request.get("stream_options") or {}).get("include_usage"):
            await emit(chunk(cid, created, model, choices=[], usage=usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.tokens, args.token_delay),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
