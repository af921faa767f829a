"""API keys: ``ck_`` prefix, only a SHA-256 at rest, revocation effective immediately."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import text

from hypereal.domain import keys
from hypereal.domain.errors import Unauthorized
from hypereal.services import Services


async def test_keys_are_stored_only_as_sha256(services: Services) -> None:
    account = await keys.create_account(services.db, "a")
    created = await keys.create_key(services.db, account)
    assert created.secret.startswith("ck_") and len(created.secret) > 40
    async with services.db.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM api_keys"))).mappings().all()
    assert len(rows) == 1
    stored = " ".join(str(v) for v in rows[0].values())
    assert created.secret not in stored
    assert rows[0]["key_hash"] == hashlib.sha256(created.secret.encode()).hexdigest()


async def test_authenticate_resolves_the_account(services: Services) -> None:
    account = await keys.create_account(services.db, "a")
    created = await keys.create_key(services.db, account, rate_limit_per_hour=5)
    principal = await keys.authenticate(services.db, f"Bearer {created.secret}")
    assert principal.account_id == account
    assert principal.rate_limit_per_hour == 5
    assert not principal.is_admin


@pytest.mark.parametrize(
    "header", [None, "", "Basic abc", "Bearer", "Bearer sk_123", "Bearer ck_unknownkey"]
)
async def test_bad_authorization_headers_are_refused(
    services: Services, header: str | None
) -> None:
    with pytest.raises(Unauthorized) as caught:
        await keys.authenticate(services.db, header)
    assert caught.value.message.startswith("Unauthorized. ")


async def test_revoked_key_is_refused_on_the_next_request(services: Services) -> None:
    account = await keys.create_account(services.db, "a")
    created = await keys.create_key(services.db, account)
    await keys.authenticate(services.db, f"Bearer {created.secret}")
    await keys.revoke_key(services.db, created.info.id)
    with pytest.raises(Unauthorized, match="revoked"):
        await keys.authenticate(services.db, f"Bearer {created.secret}")


async def test_the_lookup_of_every_request_seeks_the_key_hash_index(services: Services) -> None:
    """The per-request key lookup (one row every time, for grouped reads on PostgreSQL) finds
    the key through the key_hash index, not by scanning every key."""
    account = await keys.create_account(services.db, "a")
    await keys.create_key(services.db, account)
    async with services.db.engine.connect() as conn:
        plan = (
            await conn.execute(
                text("EXPLAIN QUERY PLAN " + keys.PRINCIPAL_BY_HASH), {"digest": "x" * 64}
            )
        ).all()
    steps = [str(row[-1]) for row in plan]
    assert any(s.startswith("SEARCH k USING") and "key_hash=?" in s for s in steps), steps
    assert not any(s.startswith("SCAN k") for s in steps), steps
