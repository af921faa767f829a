"""``Idempotency-Key``: the same key with the same request replays the first response and
charges once; the same key with a different request is a conflict."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from hypereal.domain.errors import BadRequest, Conflict
from hypereal.store.db import Database
from hypereal.store.models import IdempotencyRecord, utcnow

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: bytes
    content_type: str


@dataclass(frozen=True)
class Claimed:
    """This request owns the key; finish with :func:`save` or :func:`release`."""

    record_id: int


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


async def claim(
    db: Database, account_id: str, key: str, fingerprint: str
) -> Claimed | StoredResponse:
    """Claim ``key`` for this request, or return the response stored for it.

    Raises Conflict when the key was used with a different request, or when the first
    request with this key is still being processed.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise BadRequest(f"Invalid Idempotency-Key: must be 1-{MAX_KEY_LENGTH} characters")
    try:
        async with db.session.begin() as session:
            record = IdempotencyRecord(
                account_id=account_id, key=key, request_hash=fingerprint, created_at=utcnow()
            )
            session.add(record)
        return Claimed(record_id=record.id)
    except IntegrityError:
        pass
    async with db.session() as session:
        existing = await session.scalar(
            select(IdempotencyRecord).where(
                IdempotencyRecord.account_id == account_id, IdempotencyRecord.key == key
            )
        )
    if existing is None:  # released between our insert and read: let the client retry
        raise Conflict("A request with this Idempotency-Key is in progress; retry shortly")
    if existing.request_hash != fingerprint:
        raise Conflict("Idempotency-Key was already used with a different request; use a new key")
    if existing.status_code is None or existing.response_body is None:
        raise Conflict("A request with this Idempotency-Key is still in progress; retry shortly")
    return StoredResponse(
        status_code=existing.status_code,
        body=existing.response_body,
        content_type=existing.content_type or "application/json",
    )


async def save(db: Database, claimed: Claimed, response: StoredResponse) -> None:
    """Store the response of a claimed request so repeats replay it."""
    async with db.session.begin() as session:
        await session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.id == claimed.record_id)
            .values(
                status_code=response.status_code,
                response_body=response.body,
                content_type=response.content_type,
            )
        )


async def release(db: Database, claimed: Claimed) -> None:
    """Forget a claim whose request failed without charging, so the key can be retried."""
    async with db.session.begin() as session:
        await session.execute(
            delete(IdempotencyRecord).where(IdempotencyRecord.id == claimed.record_id)
        )
