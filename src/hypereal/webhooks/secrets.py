"""Per-account webhook signing secrets (Standard Webhooks ``whsec_`` + base64 of 32 bytes).

The secret is created on first use; rotating replaces it, and every later attempt of a
pending delivery is signed with the new one.
"""

from __future__ import annotations

import base64
import secrets

from sqlalchemy import select, update

from hypereal.domain.errors import NotFound
from hypereal.store.db import Database
from hypereal.store.models import Account

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


async def webhook_secret(db: Database, account_id: str) -> str:
    """The account's signing secret, created on first use. Raises NotFound."""
    async with db.session.begin() as session:
        # Conditional, so two first uses at once agree on one secret.
        await session.execute(
            update(Account)
            .where(Account.id == account_id, Account.webhook_secret.is_(None))
            .values(webhook_secret=new_secret())
        )
        secret = await session.scalar(
            select(Account.webhook_secret).where(Account.id == account_id)
        )
    if secret is None:
        raise NotFound(f"Account not found: {account_id}")
    return secret


async def rotate_webhook_secret(db: Database, account_id: str) -> str:
    """Replace the account's secret; returns the new one. Raises NotFound."""
    secret = new_secret()
    async with db.session.begin() as session:
        found = await session.scalar(
            update(Account)
            .where(Account.id == account_id)
            .values(webhook_secret=secret)
            .returning(Account.id)
        )
    if found is None:
        raise NotFound(f"Account not found: {account_id}")
    return secret
