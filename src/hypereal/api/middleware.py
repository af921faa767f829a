"""Authentication and per-key rate limiting for every ``/v1`` and ``/api/v1`` request.
The key comes as ``Authorization: Bearer ck_...`` or, as Anthropic's clients send it,
``x-api-key: ck_...``.

A pure ASGI middleware (not a dependency) so that every response, errors and streams
included, carries the ``X-RateLimit-*`` headers, and SSE passes through unbuffered.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from hypereal.api.errors import error_response
from hypereal.domain import keys
from hypereal.domain.errors import HyperealError, RateLimited, Unauthorized
from hypereal.observability.logs import LOG_CALLER
from hypereal.observability.middleware import add_response_headers
from hypereal.services import Services

API_PREFIXES = ("/v1/", "/api/v1/")


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES) or path in ("/v1", "/api/v1")


def _authorization(scope: Scope) -> str | None:
    """The ``Authorization`` header, or else the key of an ``x-api-key`` header (as
    Anthropic's clients send it) as a Bearer credential. (The first of each, as Starlette's
    ``Headers.get`` reads it; names come lower-cased from the HTTP server.)"""
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
    if authorization is None and api_key is not None:
        if not api_key.strip().startswith(keys.KEY_PREFIX):
            raise Unauthorized("Malformed x-api-key header; expected 'ck_...'")
        return f"Bearer {api_key.strip()}"
    return authorization


class AuthRateLimitMiddleware:
    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            principal = await keys.authenticate(self.services.db, _authorization(scope))
            limiter = self.services.limiter
            decision = await limiter.hit(principal.key_id, principal.rate_limit_per_hour)
        except HyperealError as exc:
            await error_response(exc)(scope, receive, send)
            return
        if not decision.allowed:
            rejected = RateLimited(decision.limit, decision.retry_after)
            await error_response(rejected, decision.headers())(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        limits = [(k.lower().encode(), v.encode()) for k, v in decision.headers().items()]
        send = add_response_headers(scope, send, limits)

        # The ledger (key id, model allow-list, key budget) and the logs read the caller.
        caller = keys.CALLER.set(principal)
        log_caller = LOG_CALLER.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            LOG_CALLER.reset(log_caller)
            keys.CALLER.reset(caller)
