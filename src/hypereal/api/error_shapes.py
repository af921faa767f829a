"""Error bodies in another API's shape, for the routes that serve that API's clients.

Every error leaves the app as ``{"error": "...", ...}`` (``errors.py``), whichever layer
answers: the auth and rate-limit middleware (401, 429), the body limit (413), the route
(400, 402, 5xx), the 500 of last resort. A client of the Anthropic API reads
``{"type": "error", "error": {"type": ..., "message": ...}}`` instead. Rather than teach each
of those layers every shape, :class:`ErrorShapeMiddleware` rewrites the JSON error answers of
the listed paths on their way out (successful answers and streams pass untouched)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# (status, the Hypereal error body) -> the body to send instead.
Shaper = Callable[[int, dict[str, Any]], dict[str, Any]]

# https://docs.anthropic.com/en/api/errors
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    if status in ANTHROPIC_ERROR_TYPES:
        return ANTHROPIC_ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """``{"error": "msg", **extra}`` as Anthropic's error object; the extra fields (402's
    ``required``/``available``) stay, inside ``error``."""
    message = body.get("error")
    if not isinstance(message, str):
        return body  # already shaped, or not ours
    extra = {k: v for k, v in body.items() if k != "error"}
    error = {"type": anthropic_error_type(status), "message": message, **extra}
    return {"type": "error", "error": error}


# https://platform.openai.com/docs/guides/error-codes
OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    402: ("insufficient_quota", "insufficient_credits"),
    403: ("permission_error", None),
    404: ("not_found_error", None),
    409: ("conflict_error", None),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def openai_error(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """``{"error": "msg", **extra}`` as OpenAI's ``{"error": {"message", "type", "param",
    "code"}}`` (what the OpenAI SDKs read); the extra fields stay, inside ``error``."""
    message = body.get("error")
    if not isinstance(message, str):
        return body
    kind, code = OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    extra = {k: v for k, v in body.items() if k != "error"}
    return {"error": {"message": message, "type": kind, "param": None, "code": code, **extra}}


# The OpenAI-shaped paths (without their API prefix).
OPENAI_PATHS = (
    "/chat/completions",
    "/images/generations",
    "/images/edits",
    "/audio/speech",
    "/audio/transcriptions",
)


class ErrorShapeMiddleware:
    """Reshapes the JSON error answers (status >= 400) of ``shapes``' paths, each given
    without its API prefix and matched under every one of ``prefixes``."""

    def __init__(self, app: ASGIApp, shapes: Mapping[str, Shaper], prefixes: Iterable[str]) -> None:
        self.app = app
        self.shapes = {
            prefix + path: shaper for prefix in prefixes for path, shaper in shapes.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shaper = self.shapes.get(scope["path"]) if scope["type"] == "http" else None
        if shaper is None:
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def reshaping_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if message["status"] >= 400 and _is_json(message):
                    held = message  # sent with the reshaped body
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = _reshape(shaper, held["status"], b"".join(chunks))
                headers = [(k, v) for k, v in held.get("headers", []) if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, reshaping_send)


def _is_json(start: Message) -> bool:
    for name, value in start.get("headers", []):
        if name.lower() == b"content-type":
            return bool(value.startswith(b"application/json"))
    return False


def _reshape(shaper: Shaper, status: int, body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if not isinstance(parsed, dict):
        return body
    return json.dumps(shaper(status, parsed), separators=(",", ":")).encode()
