"""Serves the local media store at ``/files/...`` without auth (URLs are unguessable)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from hypereal.api.deps import ServicesDep
from hypereal.domain.errors import NotFound
from hypereal.media.sniff import content_type_for
from hypereal.media.store import LocalMediaStore

router = APIRouter(tags=["files"])


@router.api_route("/files/{key:path}", methods=["GET", "HEAD"], include_in_schema=False)
async def get_file(key: str, services: ServicesDep) -> FileResponse:
    store = services.media
    path = store.path_for(key) if isinstance(store, LocalMediaStore) else None
    if path is None or not path.is_file() or path.suffix == ".part":
        raise NotFound("File not found")
    return FileResponse(
        path,
        media_type=content_type_for(path.name),
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )
