"""Every error leaves the server as JSON ``{"error": "..."}`` with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hypereal.api.responses import FastJSONResponse
from hypereal.domain.errors import HyperealError

log = logging.getLogger("hypereal.api")

HTTP_MESSAGES = {404: "Not found", 405: "Method not allowed"}


def error_response(exc: HyperealError, headers: dict[str, str] | None = None) -> JSONResponse:
    return FastJSONResponse(
        exc.body(), status_code=exc.status, headers={**exc.headers(), **(headers or {})}
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    name = ""
    for part in parts:
        name += f"[{part}]" if part.isdigit() else (f".{part}" if name else part)
    return name


def validation_message(exc: RequestValidationError) -> str:
    """One clear sentence naming the first offending field."""
    errors = exc.errors()
    if not errors:
        return "Invalid request"
    first = errors[0]
    kind = first.get("type", "")
    field = _field_name(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        return "Request body is not valid JSON"
    if kind == "missing":
        return f"Missing required field '{field}'" if field else "Request body is required"
    if not field:
        return f"Invalid request body: {first.get('msg', 'invalid')}"
    return f"Invalid value for '{field}': {first.get('msg', 'invalid')}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HyperealError)
    async def _domain(_: Request, exc: HyperealError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return FastJSONResponse({"error": validation_message(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else None
        if not message or message in ("Not Found", "Method Not Allowed"):
            message = HTTP_MESSAGES.get(exc.status_code, "Request failed")
        return FastJSONResponse(
            {"error": message}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only errors raised by the middleware themselves get here (see api/asgi.py).
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error()


def internal_error() -> JSONResponse:
    # A new response each time: middleware may edit a response's header list in place.
    return FastJSONResponse({"error": "Internal server error"}, status_code=500)
