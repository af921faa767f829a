"""The one generation pipeline that chat, images and jobs share.

Every generation goes the same way: resolve the model's backend, fetch the media inputs
(through the SSRF guard, before anything is charged), price, reserve the credits, call the
backend, sniff and store what it made, and settle the reservation: charge what was used,
refund the rest, exactly once. The pieces live here, once:

- :class:`Pipeline` holds what a generation needs from the process (database, media store,
  backends, settings), so the domain modules take it instead of the whole ``Services``;
- :class:`Charge` is a reservation that is settled exactly once, whoever settles first;
- :func:`client_error` is the one mapping from a backend's failure to the client's answer
  (an HTTP error for chat and images, a job's ``error`` for jobs).

A job reserves in the same transaction that creates it and is refunded in the one that ends
it (``domain/jobs.py``): its :class:`Charge` is the job row itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hypereal.backends.base import BackendError, MediaBlob
from hypereal.domain import ledger
from hypereal.domain.catalogue import ModelSpec
from hypereal.domain.errors import BadRequest, GenerationFailed, HyperealError
from hypereal.media.fetch import FetchRefused, fetch_media
from hypereal.media.imageinfo import check_image_header
from hypereal.media.images import ImageRejected
from hypereal.media.sniff import sniff_content_type
from hypereal.media.store import MediaStore, new_media_key
from hypereal.settings import Settings
from hypereal.store.db import Database

if TYPE_CHECKING:
    from hypereal.domain.model_backends import ModelBackends, Resolved

log = logging.getLogger("hypereal.generation")

MEDIA_TYPES = ("media", "media-list")


def client_error(
    exc: BaseException,
    *,
    what: str = "Generation",
    timeout_seconds: float | None = None,
    failure: type[HyperealError] = GenerationFailed,
) -> HyperealError:
    """What the client is told when a generation fails with ``exc``.

    A backend's ``client_error`` (the request itself was bad: an unreadable image, text too
    long) is a 400 with the backend's message; any other backend failure is ``failure``
    (500, or 502 for an upstream-only path) saying ``"{what} failed: ..."``; a timeout says
    how long it waited; a :class:`HyperealError` is passed on as it is. Anything else is a
    bug: logged with its traceback, shown as an internal error by class name only.
    """
    if isinstance(exc, HyperealError):
        return exc
    if isinstance(exc, BackendError):
        if exc.client_error:
            return BadRequest(exc.message)
        return failure(f"{what} failed: {exc.message}")
    if isinstance(exc, TimeoutError) and timeout_seconds is not None:
        return failure(f"{what} timed out after {timeout_seconds:g} seconds")
    log.error("%s crashed", what.lower(), exc_info=exc)
    return failure(f"{what} failed: internal error ({exc.__class__.__name__})")


class Charge:
    """Credits reserved for one generation, settled exactly once.

    :meth:`settle` charges what was used (at most the reservation) and refunds the rest;
    :meth:`refund` is ``settle(0)``. The first call decides and later calls return its
    answer, so every exit path of a request may settle without double-refunding; the
    ledger's one-refund-per-debit rule holds the same across processes.
    """

    def __init__(self, db: Database, entry_id: int, reserved: int, label: str) -> None:
        self.db = db
        self.entry_id = entry_id
        self.reserved = reserved
        self.label = label
        self.used: int | None = None
        self._settling: asyncio.Future[int] | None = None

    @classmethod
    async def reserve(
        cls,
        db: Database,
        account_id: str,
        amount: int,
        *,
        reference: str,
        label: str,
        model: str | None = None,
    ) -> Charge:
        """Debit ``amount`` (InsufficientCredits, 402, when the balance is short; the calling
        key's model allow-list and budget apply: 403 / 402)."""
        entry = await ledger.debit(
            db, account_id, amount, reference=reference, description=label, model=model
        )
        return cls(db, entry.id, amount, label)

    @property
    def settled(self) -> bool:
        return self.used is not None

    def settles_at_once(self, used: int | None = None) -> bool:
        """Whether :meth:`settle` with ``used`` returns without waiting for the database:
        the charge is settled already (the first call decided), or there is nothing to
        refund. Such a settle has no wait that a cancellation could interrupt."""
        if self._settling is not None:
            return self._settling.done()
        return used is None or used >= self.reserved

    async def settle(self, used: int | None = None, *, note: str | None = None) -> int:
        """Charge ``used`` credits (all of the reservation when None), refund the rest;
        returns the credits charged. Safe to call again and concurrently."""
        if self._settling is None:
            self._settling = self._begin(used, note)
        # The refund is queued to the writer, which commits it whatever happens to the
        # callers: a caller cancelled while it waits leaves the refund standing.
        return await asyncio.shield(self._settling)

    async def refund(self, *, note: str | None = None) -> int:
        """Refund the whole reservation (nothing was delivered)."""
        return await self.settle(0, note=note or f"{self.label} failed")

    def _begin(self, used: int | None, note: str | None) -> asyncio.Future[int]:
        """Decide the charge and queue its refund; the future has the credits charged once
        the refund committed (no task: the writer's own future carries it)."""
        actual = self.reserved if used is None else max(0, min(self.reserved, used))
        settled: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if actual >= self.reserved:  # nothing to refund: settled now
            self.used = actual
            settled.set_result(actual)
            return settled
        refunded = ledger.submit_refund(
            self.db,
            self.entry_id,
            self.reserved - actual,
            note or f"{self.label}: settled at {actual} of {self.reserved}",
        )

        def done(refunded: asyncio.Future[ledger.Entry | None]) -> None:
            if refunded.cancelled():
                settled.cancel()
            elif refunded.exception() is not None:
                settled.set_exception(refunded.exception())  # type: ignore[arg-type]
            else:
                self.used = actual
                settled.set_result(actual)

        refunded.add_done_callback(done)
        return settled


@dataclass(frozen=True)
class StoredMedia:
    key: str
    url: str
    content_type: str


def media_fields(spec: ModelSpec, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The media ``params`` name, as (field, URL) pairs: ``image``, ``images[1]`` ..."""
    fields: list[tuple[str, str]] = []
    for param in spec.params:
        value = params.get(param.name)
        if value is None or param.type not in MEDIA_TYPES:
            continue
        if param.type == "media":
            fields.append((param.name, value))
        else:
            fields.extend((f"{param.name}[{i}]", url) for i, url in enumerate(value))
    return fields


def has_inputs(spec: ModelSpec, params: Mapping[str, Any]) -> bool:
    """Whether ``params`` name any media for :meth:`Pipeline.fetch_inputs` to fetch."""
    return bool(media_fields(spec, params))


def _expected_kind(field: str) -> str | None:
    return next((kind for kind in ("image", "audio", "video") if kind in field), None)


@dataclass(frozen=True)
class Pipeline:
    """What a generation needs from the process (see the module doc)."""

    db: Database
    media: MediaStore
    backends: ModelBackends
    settings: Settings

    def resolve(self, spec: ModelSpec) -> Resolved:
        """The backend serving ``spec`` (ModelUnavailable, 503, when none can)."""
        return self.backends.resolve(spec)

    async def fetch_inputs(
        self, spec: ModelSpec, params: Mapping[str, Any], *, prefix: str = ""
    ) -> dict[str, MediaBlob]:
        """Every media parameter of ``params``, fetched concurrently through the SSRF guard:
        field (``image``, ``images[1]``) -> bytes. An image's dimensions are read from its
        header and one over ``max_input_pixels`` refused. Raises BadRequest naming the
        field."""
        fields = media_fields(spec, params)
        try:
            blobs = await asyncio.gather(
                *(
                    fetch_media(
                        url, self.settings, field=prefix + field, expect=_expected_kind(field)
                    )
                    for field, url in fields
                )
            )
            found = {field: blob for (field, _), blob in zip(fields, blobs, strict=True)}
            for field, blob in found.items():  # header only: no pixel is decoded
                check_image_header(blob, prefix + field, self.settings.max_input_pixels)
        except (FetchRefused, ImageRejected) as exc:
            raise BadRequest(exc.message) from exc
        return found

    async def store(self, blob: MediaBlob, kind: str) -> StoredMedia:
        """Put ``blob`` in the media store under a new ``kind`` key; its type is sniffed
        from the bytes (the backend's claim only when the bytes say nothing)."""
        content_type = sniff_content_type(blob.data) or blob.content_type
        key = new_media_key(kind, content_type)
        url = await self.media.put(key, blob.data, content_type)
        return StoredMedia(key, url, content_type)

    async def load(self, key: str, field: str) -> MediaBlob:
        """A stored input back as bytes (BackendError when it is gone)."""
        data = await self.media.get(key)
        if data is None:
            raise BackendError(f"The input '{field}' is no longer stored")
        return MediaBlob(data, sniff_content_type(data) or "application/octet-stream")

    async def reserve(
        self, account_id: str, amount: int, *, reference: str, label: str, model: str | None = None
    ) -> Charge:
        return await Charge.reserve(
            self.db, account_id, amount, reference=reference, label=label, model=model
        )
