"""Serves the local media store at ``/files/...``.

Generated outputs are served without auth (their URLs are unguessable and are what clients
download, as from the hosted API's CDN). Uploaded inputs (``inputs/{account}/...``) are not
public: they are served to their owner's API key (``Authorization: Bearer``), or to anyone
holding an unexpired signed URL (``?expires=...&signature=...``, ``media/signing.py``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import FileResponse

from hypereal.api.deps import ServicesDep
from hypereal.api.openapi import FILE_RESPONSES
from hypereal.domain import keys
from hypereal.domain.errors import Forbidden, HyperealError, NotFound
from hypereal.media.signing import input_owner, is_private
from hypereal.media.sniff import content_type_for
from hypereal.media.store import LocalMediaStore
from hypereal.services import Services

router = APIRouter(tags=["files"])

PUBLIC_CACHE = "public, max-age=31536000, immutable"
PRIVATE_CACHE = "private, no-store"


async def _may_read_input(
    services: Services,
    key: str,
    authorization: str | None,
    expires: str | None,
    signature: str | None,
) -> None:
    """Raises unless the caller may read the private ``key``: 403 for a signed URL that is
    wrong or expired, 404 (the file's existence is not told) otherwise."""
    if expires is not None or signature is not None:
        if services.media_signer.verify(key, expires or "", signature or ""):
            return
        raise Forbidden("Invalid or expired signature")
    if authorization:
        try:
            principal = await keys.authenticate(services.db, authorization)
        except HyperealError:
            raise NotFound("File not found") from None
        if input_owner(key) == principal.account_id:
            return
    raise NotFound("File not found")


@router.get("/files/{key:path}", summary="Download a stored file", responses=FILE_RESPONSES)
async def get_file(
    key: str,
    services: ServicesDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    expires: Annotated[
        str | None, Query(description="Signed URL of an uploaded input: expiry (Unix time)")
    ] = None,
    signature: Annotated[
        str | None, Query(description="Signed URL of an uploaded input: HMAC-SHA256 (hex)")
    ] = None,
) -> FileResponse:
    """A generated output (public by its URL), or an uploaded input: to its owner's API key
    or under an unexpired signed URL."""
    store = services.media
    path = store.path_for(key) if isinstance(store, LocalMediaStore) else None
    if path is None or path.suffix == ".part":
        raise NotFound("File not found")
    private = is_private(key)
    if private:
        await _may_read_input(services, key, authorization, expires, signature)
    if not path.is_file():
        raise NotFound("File not found")
    return FileResponse(
        path,
        media_type=content_type_for(path.name),
        headers={"Cache-Control": PRIVATE_CACHE if private else PUBLIC_CACHE},
    )


@router.head("/files/{key:path}", summary="A stored file's headers", responses=FILE_RESPONSES)
async def head_file(
    key: str,
    services: ServicesDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    expires: Annotated[str | None, Query()] = None,
    signature: Annotated[str | None, Query()] = None,
) -> FileResponse:
    """The headers ``GET`` would answer, without the body."""
    return await get_file(key, services, authorization, expires, signature)
