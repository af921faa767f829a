"""One pure ASGI middleware for every HTTP request: the request id, the metrics and the
access log line. It is the outermost layer, so it sees every answer (401, 413, 429 and
500 included) and times the whole of it, streamed bodies to their end.

Per request it costs a header scan, a ``perf_counter`` pair, one dict lookup for the cached
metric children and two updates; the access line is written only when the
``hypereal.access`` logger is enabled at INFO (``hypereal serve`` enables it, replacing
uvicorn's own access line).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from time import perf_counter
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypereal.observability import metrics
from hypereal.observability.logs import ACCESS_LOGGER, LOG_CONTEXT, access_writer

REQUEST_ID_HEADER = b"x-request-id"
# Scope key: a list of (name, value) headers that inner layers add to the response's start
# (the auth middleware's X-RateLimit-*). This middleware appends them with the request id,
# so no other layer wraps ``send`` only to add headers.
RESPONSE_HEADERS = "hypereal.response_headers"
# A client's id is kept when it is short and plain (no spaces, quotes or control characters).
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
UNMATCHED = "<unmatched>"

_access = logging.getLogger(ACCESS_LOGGER)


def _route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/jobs/{job_id}``), never the raw path, so that
    the metrics' label values stay few."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    root = scope.get("app_root_path")  # a Mount (static files): its prefix
    if isinstance(root, str) and root:
        return root + "/{path}"
    return _match_template(scope)


def _match_template(scope: Scope) -> str:
    """The template of the route a request answered before routing (401, 413, 429) would
    have reached: only on those answers, one regex per candidate route."""
    router = getattr(scope.get("app"), "router", None)
    if router is None:
        return UNMATCHED
    index = getattr(router, "_path_index", None)
    path = scope.get("path", "")
    routes = index.candidates(path) if index is not None else router.routes
    for candidate in routes:
        try:
            match, _ = candidate.matches({**scope, "route": None})
        except Exception:  # a route that cannot judge this scope
            continue
        if match != Match.NONE and isinstance(getattr(candidate, "path", None), str):
            return str(candidate.path)
    return UNMATCHED


def _with_headers(start: Message, headers: list[tuple[bytes, bytes]]) -> Message:
    """A response start with ``headers`` after its own (a new message: the list may be a
    Response's own, sent again with a later request)."""
    return {**start, "headers": [*start.get("headers", ()), *headers]}


def add_response_headers(scope: Scope, send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """Have ``headers`` added to the response's start: through this middleware's list
    (``RESPONSE_HEADERS``) when it runs outside, with no ``send`` wrapper; else (an app
    without it) by wrapping ``send``."""
    added = scope.get(RESPONSE_HEADERS)
    if added is not None:
        added.extend(headers)
        return send

    async def send_with(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = _with_headers(message, headers)
        await send(message)

    return send_with


# A request id: this process's random prefix and a counter (unique without a system call
# per request, as os.urandom would cost).
_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):012x}"


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = perf_counter()
        request_id: str | None = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                candidate = value.decode("latin-1")
                if _VALID_ID.fullmatch(candidate):
                    request_id = candidate
                break
        if request_id is None:
            request_id = new_request_id()
        added: list[tuple[bytes, bytes]] = [(REQUEST_ID_HEADER, request_id.encode())]
        scope[RESPONSE_HEADERS] = added
        context: dict[str, Any] = {"request_id": request_id}
        token = LOG_CONTEXT.set(context)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = _with_headers(message, added)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = perf_counter() - started
            route = _route_template(scope)
            metrics.observe_request(scope["method"], route, status, elapsed)
            if _access.isEnabledFor(logging.INFO):
                self._access_line(scope, route, status, elapsed, context)
            LOG_CONTEXT.reset(token)

    @staticmethod
    def _access_line(
        scope: Scope, route: str, status: int, elapsed: float, context: dict[str, Any]
    ) -> None:
        principal = scope.get("state", {}).get("principal")
        if principal is not None:  # the auth middleware's CALLER is reset by now
            context.setdefault("key_id", principal.key_id)
            context.setdefault("account_id", principal.account_id)
        client = scope.get("client")
        fields = {
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
            "client": client[0] if client else None,
        }
        writer = access_writer()
        if writer is not None:
            writer.write(fields, context)
        else:
            _access.info("request", extra=fields)
