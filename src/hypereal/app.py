"""The ASGI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypereal.api.asgi import HyperealAPI
from hypereal.api.cors import LeanCORSMiddleware
from hypereal.api.deps import single_query_values
from hypereal.api.error_shapes import (
    OPENAI_PATHS,
    ErrorShapeMiddleware,
    anthropic_error,
    openai_error,
)
from hypereal.api.errors import install_error_handlers
from hypereal.api.middleware import AuthRateLimitMiddleware
from hypereal.api.openapi import install_openapi
from hypereal.api.responses import FastJSONResponse
from hypereal.api.routes import (
    account,
    admin,
    chat,
    console,
    files,
    images,
    jobs,
    messages,
    models,
    openai_media,
    ops,
    upstream_webhooks,
)
from hypereal.api.routing import use_indexed_router
from hypereal.engine.engine import Engine, engine_lifespan
from hypereal.observability.middleware import ObservabilityMiddleware
from hypereal.services import Services, bootstrap_admin, build_services
from hypereal.settings import Settings

log = logging.getLogger("hypereal")

API_ROUTERS: list[APIRouter] = [
    account.router,
    models.router,
    admin.router,
    chat.router,
    messages.router,
    images.router,
    openai_media.router,
    jobs.router,
]
API_PREFIXES = ("/v1", "/api/v1")

# Hooks later parts (job engine, ...) use to run with the app: each gets the services and
# returns an async context manager that is entered for the app's lifetime.
LifespanHook = Callable[[Services], Any]
# What the app runs with unless told otherwise: the job engine (in-process jobs by default).
DEFAULT_LIFESPAN_HOOKS: tuple[LifespanHook, ...] = (engine_lifespan,)


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit."""


class BodyLimitMiddleware:
    """Refuses request bodies larger than ``max_bytes`` with a JSON 413, before the app reads
    them whole: a declared ``Content-Length`` over the limit is answered at once, without
    reading the body, and a body without one (chunked) is counted as it arrives; the app's
    read fails as it passes the limit and whatever the app answers then is replaced by the
    413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        return FastJSONResponse(
            {"error": f"Request body too large: the limit is {self.max_bytes} bytes"},
            status_code=413,
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        framed = False  # the body's length is declared, and the HTTP server holds it to that
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # the HTTP server rejects a malformed length itself
                if declared > self.max_bytes:
                    await self._too_large()(scope, receive, send)
                    return
                framed = True
            elif name == b"transfer-encoding":
                framed = False
                break
        if framed:  # no more than the declared length can arrive: nothing to count
            await self.app(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to its failed read; the 413 goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self._too_large()(scope, receive, send)


def add_routes(app: FastAPI, router: APIRouter, prefix: str = "") -> None:
    """Add ``router``'s routes to the app itself, as plain routes under ``prefix``.

    ``include_router`` keeps each included router as a lazily matched branch, and matching a
    request walked every branch's routes through several layers of scope bookkeeping: 250 us
    of CPU per request before any of our code ran (80% of ``GET /health``). Flat routes are
    matched by one regex each, as Starlette does."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            app.router.routes.append(route)
            continue
        dependencies = list(route.dependencies)
        if route.dependant.query_params:  # a repeated one is a 400, not the last one wins
            names = [field.alias for field in route.dependant.query_params]
            dependencies.append(Depends(single_query_values(names)))
        app.router.add_api_route(
            prefix + route.path,
            route.endpoint,
            response_model=route.response_model,
            status_code=route.status_code,
            tags=list(route.tags),
            dependencies=dependencies,
            summary=route.summary,
            description=route.description,
            response_description=route.response_description,
            responses=dict(route.responses),
            deprecated=route.deprecated,
            methods=route.methods,
            operation_id=route.operation_id,
            response_model_include=route.response_model_include,
            response_model_exclude=route.response_model_exclude,
            response_model_by_alias=route.response_model_by_alias,
            response_model_exclude_unset=route.response_model_exclude_unset,
            response_model_exclude_defaults=route.response_model_exclude_defaults,
            response_model_exclude_none=route.response_model_exclude_none,
            include_in_schema=route.include_in_schema,
            response_class=route.response_class,
            name=route.name,
            route_class_override=type(route),
            callbacks=route.callbacks,
            openapi_extra=route.openapi_extra,
            generate_unique_id_function=route.generate_unique_id_function,
        )


def print_admin_key(secret: str) -> None:
    print(
        "\n"
        "  First start: created the admin account.\n"
        "  Admin API key (shown once, store it now):\n\n"
        f"    {secret}\n",
        flush=True,
    )


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    extra_routers: Sequence[APIRouter] = (),
    lifespan_hooks: Sequence[LifespanHook] = DEFAULT_LIFESPAN_HOOKS,
) -> FastAPI:
    """Build the app. Migrations run and the admin is bootstrapped at start-up."""
    settings = settings or Settings()
    services = services or build_services(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.migrate()
        created = await bootstrap_admin(services)
        if created is not None:
            print_admin_key(created.secret)
        from contextlib import AsyncExitStack

        async with AsyncExitStack() as stack:
            for hook in lifespan_hooks:
                entered = await stack.enter_async_context(hook(services))
                if isinstance(entered, Engine):
                    app.state.engine = entered  # handed to the job routes (api/deps.py)
            yield
            app.state.engine = None
        await services.close()

    app = HyperealAPI(
        title="Hypereal API (self-hosted)",
        version="1.0.0",
        description="Self-hosted implementation of the Hypereal media-generation API.",
        lifespan=lifespan,
        # /docs and /openapi.json: api/openapi.py (the real schema, Swagger UI's own files).
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry={
            "tracing": settings.opentelemetry,
            "metrics": settings.opentelemetry,
            "logs": settings.opentelemetry,
        },
    )
    app.state.services = services
    app.state.engine = None
    use_indexed_router(app)
    install_error_handlers(app)
    for prefix in API_PREFIXES:
        for router in [*API_ROUTERS, *extra_routers]:
            add_routes(app, router, prefix)
    add_routes(app, files.router)
    add_routes(app, upstream_webhooks.router)
    add_routes(app, console.router)

    add_routes(app, ops.router)
    install_openapi(app, services.catalogue)

    # Inside all of these: api/asgi.py's ErrorMiddleware (its JSON errors and 500s pass
    # through them all, and get their headers).
    app.add_middleware(AuthRateLimitMiddleware, services=services)
    # Outside auth (a huge body is refused before anything else), inside CORS (its headers).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    # Outside all of the above, so that every error of an Anthropic- or OpenAI-shaped route
    # (401, 413, 429 included) leaves in that API's shape.
    shapes = {"/messages": anthropic_error, **dict.fromkeys(OPENAI_PATHS, openai_error)}
    app.add_middleware(ErrorShapeMiddleware, shapes=shapes, prefixes=API_PREFIXES)
    app.add_middleware(
        LeanCORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=[
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
            "Retry-After",
            "Idempotent-Replayed",
            "X-Request-Id",
        ],
    )
    # Outermost: every answer gets its request id and is counted and timed.
    app.add_middleware(ObservabilityMiddleware)
    return app
