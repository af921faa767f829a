"""The app's ASGI entry and its innermost middleware, leaner than FastAPI's own.

FastAPI wraps every request in five layers of its own around the app's middleware: its
``__call__`` (which asks the OpenTelemetry providers whether telemetry is on), Starlette's
``ServerErrorMiddleware``, FastAPI's ``ExceptionTelemetryMiddleware``, Starlette's
``ExceptionMiddleware`` (a ``Request`` and two closures per request) and FastAPI's
``AsyncExitStackMiddleware`` (an exit stack per request, used only by FastAPI's own
request handler to close uploaded files). With our ``InternalErrorMiddleware`` that made
three layers tracking whether the response had started.

:class:`HyperealAPI` builds the stack as FastAPI does, with these differences:

- :class:`ErrorMiddleware` takes the place of Starlette's exception middleware and of the
  JSON 500 catcher: the app's exception handlers answer the exceptions they are registered
  for, anything else is logged and answered with the JSON 500, inside every middleware of
  the app (CORS and rate-limit headers included). One ``send`` wrapper.
- The exit stack is opened by the router (``routing.IndexedRouter``) for the routes that
  FastAPI's handler runs, not for every request.
- FastAPI's telemetry layers (its ``__call__``, ``ExceptionTelemetryMiddleware``) are there
  only when the app was created with telemetry on.

Starlette's ``ServerErrorMiddleware`` stays outermost: an error in a middleware itself still
gets the app's ``Exception`` handler (a JSON 500).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware
from starlette._exception_handler import _lookup_exception_handler
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException, WebSocketException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypereal.api.errors import internal_error

log = logging.getLogger("hypereal.api")


class ErrorMiddleware:
    """The innermost middleware: an exception with a handler (``app.exception_handler``)
    gets that handler's response, as Starlette's ``ExceptionMiddleware`` gives it; any other
    is logged and becomes the JSON 500. Either is answered inside the app's other
    middleware, so it carries their headers. An error after the response started can only
    end the connection: it is raised again (and logged by the app's handler for
    ``Exception``, in Starlette's ``ServerErrorMiddleware``)."""

    def __init__(self, app: ASGIApp, handlers: Mapping[Any, Any]) -> None:
        self.app = app
        # Starlette's middleware, for what is not HTTP (its defaults, then the app's).
        self.starlette = ExceptionMiddleware(app, handlers=handlers)
        self.exception_handlers: dict[Any, Any] = {
            HTTPException: self.starlette.http_exception,
            WebSocketException: self.starlette.websocket_exception,
        }
        self.status_handlers: dict[int, Any] = {}
        for key, handler in handlers.items():
            if isinstance(key, int):
                self.status_handlers[key] = handler
            else:
                self.exception_handlers[key] = handler
        # Read by the route-level handling of the routes FastAPI runs itself.
        self.handlers = (self.exception_handlers, self.status_handlers)

    def handler(self, exc: Exception) -> Any:
        handler = None
        if isinstance(exc, HTTPException):
            handler = self.status_handlers.get(exc.status_code)
        if handler is None:
            handler = _lookup_exception_handler(self.exception_handlers, exc)
        return handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.starlette(scope, receive, send)
            return
        scope["starlette.exception_handlers"] = self.handlers
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            handler = None if started else self.handler(exc)
            if handler is not None:
                try:
                    request = Request(scope, receive, send)
                    if is_async_callable(handler):
                        response = await handler(request, exc)
                    else:
                        response = await run_in_threadpool(handler, request, exc)
                    if response is not None:
                        await response(scope, receive, tracking_send)
                    # Reused exception instances would accumulate tracebacks across requests.
                    exc.__traceback__ = None
                    return
                except Exception:
                    if started:
                        raise
            if started:  # logged once, by the app's handler for Exception (outermost)
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await internal_error()(scope, receive, send)


class HyperealAPI(FastAPI):
    """FastAPI with the leaner request path of this module's doc."""

    @functools.cached_property
    def _telemetry_on(self) -> bool:
        """Whether the app was created with any of FastAPI's telemetry on (fixed then)."""
        config = self._telemetry
        return bool(config["tracing"] or config["metrics"] or config["logs"])

    def build_middleware_stack(self) -> ASGIApp:
        error_handler = None
        handlers: dict[Any, Any] = {}
        for key, value in self.exception_handlers.items():
            if key in (500, Exception):
                error_handler = value
            else:
                handlers[key] = value
        app: ASGIApp = ErrorMiddleware(self.router, handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        if self._telemetry_on:
            app = ExceptionTelemetryMiddleware(app)
        return ServerErrorMiddleware(app, handler=error_handler, debug=self.debug)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._telemetry_on:
            await super().__call__(scope, receive, send)
            return
        if self.root_path:
            scope["root_path"] = self.root_path
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)
