"""FastAPI dependencies: the services container and the caller resolved by the middleware.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
which cost two thread hops on every request for what is an attribute read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Annotated, cast

from fastapi import Depends, Request

from hypereal.domain.errors import BadRequest, Forbidden, Unauthorized
from hypereal.domain.keys import Principal
from hypereal.services import Services

if TYPE_CHECKING:
    from hypereal.engine.engine import Engine


async def get_services(request: Request) -> Services:
    return cast(Services, request.app.state.services)


def running_engine(request: Request) -> Engine | None:
    """The job engine the app's lifespan started (``app.state.engine``), or None for an app
    built without it."""
    return cast("Engine | None", getattr(request.app.state, "engine", None))


async def get_principal(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if principal is None:  # only reachable if a route is mounted outside the API prefixes
        raise Unauthorized()
    return cast(Principal, principal)


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This endpoint requires an admin API key")
    return principal


ServicesDep = Annotated[Services, Depends(get_services)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]


def single_query_values(names: Collection[str]) -> Callable[[Request], Awaitable[None]]:
    """A dependency for the routes that read query parameters (``names``): a parameter the
    route does not take, or one sent twice (``?limit=1&limit=2``, where FastAPI would take
    the last), is a 400 naming it, as a body field of the wrong type is."""
    declared = frozenset(names)

    async def check(request: Request) -> None:
        if not request.scope.get("query_string"):
            return
        seen: set[str] = set()
        for name, _ in request.query_params.multi_items():
            if name not in declared:
                taken = ", ".join(sorted(declared))
                raise BadRequest(f"Unknown query parameter '{name}' (this route takes: {taken})")
            if name in seen:
                raise BadRequest(f"Invalid value for '{name}': sent more than once")
            seen.add(name)

    return check
