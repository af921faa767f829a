"""Per-account webhook signing secrets (Standard Webhooks ``whsec_`` + base64 of 32 bytes).

The secret is created on first use (a write only when the account has none yet); rotating
replaces it, and every later attempt of a pending delivery is signed with the new one (the
delivery layer reads the secret with each claim, ``webhooks/delivery.py``, and builds its
signers from it, ``webhooks/secrets.py``).
"""

from __future__ import annotations

import base64
import secrets

from hypereal.domain.errors import NotFound
from hypereal.store.db import Database
from hypereal.store.writer import Dialect, Ops, Sql

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh signing secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _read_op(_: Dialect, account_id: str) -> Ops[tuple[bool, str | None]]:
    row = yield Sql.one("SELECT webhook_secret FROM accounts WHERE id = :id", id=account_id)
    return (False, None) if row is None else (True, row["webhook_secret"])


def _create_op(_: Dialect, account_id: str, secret: str) -> Ops[str | None]:
    # Conditional, so two first uses at once agree on one secret.
    yield Sql.run(
        "UPDATE accounts SET webhook_secret = :secret WHERE id = :id AND webhook_secret IS NULL",
        id=account_id,
        secret=secret,
    )
    row = yield Sql.one("SELECT webhook_secret FROM accounts WHERE id = :id", id=account_id)
    return None if row is None else str(row["webhook_secret"])


def _rotate_op(_: Dialect, account_id: str, secret: str) -> Ops[bool]:
    row = yield Sql.one(
        "UPDATE accounts SET webhook_secret = :secret WHERE id = :id RETURNING id",
        id=account_id,
        secret=secret,
    )
    return row is not None


async def webhook_secret(db: Database, account_id: str) -> str:
    """The account's signing secret, created on first use. Raises NotFound."""
    found, secret = await db.read(_read_op, account_id)
    if found and secret is not None:
        return secret
    if found:
        secret = await db.write(_create_op, account_id, new_secret())
    if secret is None:
        raise NotFound(f"Account not found: {account_id}")
    return secret


async def rotate_webhook_secret(db: Database, account_id: str) -> str:
    """Replace the account's secret; returns the new one. Raises NotFound."""
    secret = new_secret()
    found = await db.write(_rotate_op, account_id, secret)
    if not found:
        raise NotFound(f"Account not found: {account_id}")
    return secret
