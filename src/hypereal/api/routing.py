"""Route matching by path index.

Starlette and FastAPI match a request by trying every route's regex in order; with both
prefixes the app has about 70 routes, and FastAPI's per-route bookkeeping made matching the
last of them cost more CPU than the whole of ``GET /v1/credits`` besides. :class:`IndexedRouter`
tries only the routes that can match the path (those registered for exactly that path, and
those with parameters whose literal start it begins with), in their original order, and
leaves everything else (404s, slash redirects, telemetry) to FastAPI's own loop. A path
whose routes all want other methods is a 405 here, whose ``Allow`` names every method of
the path (FastAPI's loop would name those of the first route only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.routing import APIRouter
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Receive, Scope, Send


@dataclass
class _Index:
    size: int
    exact: dict[str, list[tuple[int, BaseRoute]]] = field(default_factory=dict)
    prefixed: list[tuple[str, int, BaseRoute]] = field(default_factory=list)

    def candidates(self, path: str) -> list[BaseRoute]:
        found = list(self.exact.get(path, ()))
        found += [(order, route) for start, order, route in self.prefixed if path.startswith(start)]
        found.sort(key=lambda item: item[0])
        return [route for _, route in found]


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


class IndexedRouter(APIRouter):
    """FastAPI's router with the path index in front (see the module doc)."""

    _path_index: _Index | None = None

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
                    await route.handle(scope, receive, send)
                    return
                if match == Match.PARTIAL:  # the path, another method
                    allowed.update(getattr(route, "methods", None) or ())
            if allowed:
                # FastAPI's loop would answer from the first partial match, whose Allow names
                # only that route's methods; the path may have several routes.
                raise HTTPException(405, headers={"Allow": ", ".join(sorted(allowed))})
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
