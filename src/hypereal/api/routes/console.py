"""The web console (``/console``): the static single-page app in ``hypereal/console/static``.

The page talks to the public API with the user's key like any other client; these routes
only serve files, outside the ``/v1`` prefixes, so they pass no authentication and add
nothing to an API request's path."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from hypereal.console import STATIC_DIR

router = APIRouter(include_in_schema=False)
router.routes.append(Mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console"))

# The page is never cached stale across an upgrade: its modules are revalidated by ETag.
_NO_STALE = {"Cache-Control": "no-cache"}


@router.get("/console")
async def console_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=_NO_STALE)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/console", status_code=307)


@router.get("/admin")
async def admin_page() -> RedirectResponse:
    return RedirectResponse("/console#/admin", status_code=307)
