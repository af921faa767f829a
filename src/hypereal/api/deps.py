"""FastAPI dependencies: the services container and the caller resolved by the middleware."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from hypereal.domain.errors import Forbidden, Unauthorized
from hypereal.domain.keys import Principal
from hypereal.services import Services


def get_services(request: Request) -> Services:
    return cast(Services, request.app.state.services)


def get_principal(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if principal is None:  # only reachable if a route is mounted outside the API prefixes
        raise Unauthorized()
    return cast(Principal, principal)


def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This endpoint requires an admin API key")
    return principal


ServicesDep = Annotated[Services, Depends(get_services)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]
