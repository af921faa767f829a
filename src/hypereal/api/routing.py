"""Route matching by path index.

Starlette and FastAPI match a request by trying every route's regex in order; with both
prefixes the app has about 70 routes, and FastAPI's per-route bookkeeping made matching the
last of them cost more CPU than the whole of ``GET /v1/credits`` besides. :class:`IndexedRouter`
tries only the routes that can match the path (those registered for exactly that path, and
those with parameters whose literal start it begins with), in their original order, and
leaves everything else (404s, slash redirects, telemetry) to FastAPI's own loop. A path
whose routes all want other methods is a 405 here, whose ``Allow`` names every method of
the path (FastAPI's loop would name those of the first route only).

A matched route whose endpoint has only the parameters every hot route has (the request,
one JSON body model, the caller, the services) runs through :class:`LeanEndpoint`, which
does what FastAPI's request handler does for such an endpoint without its general
machinery (dependency solving, exit stacks, response-model serialization): a fifth of the
CPU of a chat pass-through went there.
"""

from __future__ import annotations

import email.message
import inspect
import json
import typing
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, cast

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Receive, Scope, Send

from hypereal.api.deps import AdminDep, PrincipalDep, ServicesDep, get_admin, get_principal
from hypereal.api.responses import FastJSONResponse

_PLAIN_JSON = (str, int, float, bool, type(None))


class _Missing:
    pass


_MISSING: Any = _Missing()


def _json_content_type(value: str | None) -> bool:
    """FastAPI's test for a JSON body: ``application/json`` or ``application/*+json``."""
    if value is None:
        return False
    if value == "application/json":
        return True
    message = email.message.Message()
    message["content-type"] = value
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


class LeanEndpoint:
    """One route's endpoint called the way FastAPI's handler would call it, for endpoints
    whose parameters are all of: ``Request``, one pydantic body model (the whole JSON body,
    validated with FastAPI's own field so errors are the same), ``PrincipalDep``,
    ``AdminDep``, ``ServicesDep``. The endpoint returns a ``Response``, or a plain dict for a
    route without a response model of its own, sent as JSON. Exceptions propagate to the
    app's exception middleware, as FastAPI's do. :meth:`build` returns None for any other
    endpoint, which FastAPI then handles."""

    def __init__(
        self,
        route: APIRoute,
        makers: list[tuple[str, Callable[[Request, Any], Awaitable[Any]]]],
    ) -> None:
        self.route = route
        self.call = cast(Callable[..., Awaitable[Any]], route.dependant.call)
        self.makers = makers
        self.body_field = route.body_field
        self.status_code = route.status_code or 200

    @classmethod
    def build(cls, route: APIRoute) -> LeanEndpoint | None:
        if route.dependencies or route.dependant.call is None:
            return None
        if route.response_model is not None and typing.get_origin(route.response_model) is not dict:
            return None
        try:
            hints = typing.get_type_hints(route.endpoint, include_extras=True)
        except Exception:
            return None
        makers: list[tuple[str, Callable[[Request, Any], Awaitable[Any]]]] = []
        bodies = 0
        for name, param in inspect.signature(route.endpoint).parameters.items():
            hint = hints.get(name)
            if hint is Request:
                makers.append((name, _request))
            elif hint == PrincipalDep:
                makers.append((name, _principal))
            elif hint == AdminDep:
                makers.append((name, _admin))
            elif hint == ServicesDep:
                makers.append((name, _services))
            elif (
                isinstance(hint, type)
                and issubclass(hint, BaseModel)
                and param.default is inspect.Parameter.empty
            ):
                bodies += 1
                makers.append((name, _body))
            else:
                return None
        if bodies > 1 or (bodies == 1) != (route.body_field is not None):
            return None
        return cls(route, makers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        body = await self._read_body(request) if self.body_field is not None else None
        values = {}
        for name, make in self.makers:
            values[name] = await make(request, body)
        result = await self.call(**values)
        if not isinstance(result, Response):
            if not (type(result) is dict and all(type(v) in _PLAIN_JSON for v in result.values())):
                result = jsonable_encoder(result)
            result = FastJSONResponse(result, status_code=self.status_code)
        await result(scope, receive, send)

    async def _read_body(self, request: Request) -> Any:
        """The body validated against the route's model, or RequestValidationError with the
        errors FastAPI would report (same ``type``/``loc``/``msg``)."""
        assert self.body_field is not None
        try:
            raw: Any = _MISSING
            data = await request.body()
            if data:
                raw = data
                if _json_content_type(request.headers.get("content-type")):
                    raw = json.loads(data)
        except json.JSONDecodeError as exc:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", exc.pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": exc.msg},
                    }
                ],
                body=exc.doc,
            ) from exc
        except HTTPException:
            raise
        except Exception as exc:
            raise HTTPException(400, "There was an error parsing the body") from exc
        if raw is _MISSING:
            errors: list[Any] = [
                {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
            ]
            raise RequestValidationError(errors, body=None)
        value, errors = self.body_field.validate(raw, {}, loc=("body",))
        if errors:
            raise RequestValidationError(errors, body=raw)
        return value


async def _request(request: Request, body: Any) -> Request:
    return request


async def _body(request: Request, body: Any) -> Any:
    return body


async def _principal(request: Request, body: Any) -> Any:
    return await get_principal(request)


async def _admin(request: Request, body: Any) -> Any:
    return await get_admin(await get_principal(request))


async def _services(request: Request, body: Any) -> Any:
    return request.app.state.services


@dataclass
class _Index:
    size: int
    exact: dict[str, list[tuple[int, BaseRoute]]] = field(default_factory=dict)
    prefixed: list[tuple[str, int, BaseRoute]] = field(default_factory=list)

    lean: dict[int, LeanEndpoint | None] = field(default_factory=dict)
    merged: dict[str, list[BaseRoute]] = field(default_factory=dict)

    def candidates(self, path: str) -> list[BaseRoute]:
        """The routes that can match ``path``, in their order; remembered for the paths
        routes are registered for exactly (a fixed set), computed for the others."""
        known = self.merged.get(path)
        if known is not None:
            return known
        found = list(self.exact.get(path, ()))
        found += [(order, route) for start, order, route in self.prefixed if path.startswith(start)]
        found.sort(key=lambda item: item[0])
        routes = [route for _, route in found]
        if path in self.exact:
            self.merged[path] = routes
        return routes


def _index(routes: list[BaseRoute]) -> _Index:
    index = _Index(size=len(routes))
    for order, route in enumerate(routes):
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            index.prefixed.append(("", order, route))  # unknown shape: always a candidate
        elif isinstance(route, Mount) or "{" in path:
            index.prefixed.append((path.split("{", 1)[0], order, route))
        else:
            index.exact.setdefault(path, []).append((order, route))
    return index


# FastAPI's request handler closes a request's uploaded files with the exit stack its
# AsyncExitStackMiddleware leaves under this key; the app has no such middleware
# (api/asgi.py): the router opens one for the routes FastAPI's handler runs.
FILE_STACK = "fastapi_middleware_astack"


class IndexedRouter(APIRouter):
    """FastAPI's router with the path index in front (see the module doc)."""

    _path_index: _Index | None = None
    # False sends every route through FastAPI's own handler (the tests compare the two).
    lean_endpoints = True

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "fastapi.telemetry" not in scope:
            index = self._path_index
            if index is None or index.size != len(self.routes):
                index = self._path_index = _index(self.routes)
            scope.setdefault("router", self)
            allowed: set[str] = set()
            for route in index.candidates(get_route_path(scope)):
                match, child_scope = route.matches(scope)
                if match == Match.FULL:
                    scope.update(child_scope)
                    key = id(route)
                    if key not in index.lean:
                        index.lean[key] = (
                            LeanEndpoint.build(route)
                            if self.lean_endpoints and isinstance(route, APIRoute)
                            else None
                        )
                    lean = index.lean[key]
                    if lean is not None:
                        await lean(scope, receive, send)
                    else:
                        async with AsyncExitStack() as stack:
                            scope[FILE_STACK] = stack
                            await route.handle(scope, receive, send)
                    return
                if match == Match.PARTIAL:  # the path, another method
                    allowed.update(getattr(route, "methods", None) or ())
            if allowed:
                # FastAPI's loop would answer from the first partial match, whose Allow names
                # only that route's methods; the path may have several routes.
                raise HTTPException(405, headers={"Allow": ", ".join(sorted(allowed))})
        async with AsyncExitStack() as stack:
            scope[FILE_STACK] = stack
            await super().app(scope, receive, send)


def use_indexed_router(app: FastAPI) -> None:
    """Switch the app's router to :class:`IndexedRouter` (same state, one extra method)."""
    router = app.router
    # The router calls its ``middleware_stack``: its own ``app`` bound at creation, unless
    # router-level middleware wraps it (this app has none).
    if getattr(router.middleware_stack, "__func__", None) is not APIRouter.app:
        raise RuntimeError("the app's router has middleware; IndexedRouter cannot wrap it")
    router.__class__ = IndexedRouter
    router.middleware_stack = router.app
