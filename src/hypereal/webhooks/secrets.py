"""Per-account webhook signing secrets (Standard Webhooks ``whsec_`` + base64 of 32 bytes).

The secret is created on first use (a write only when the account has none yet); rotating
replaces it, and every later attempt of a pending delivery is signed with the new one.

Deliveries read the secret with their claim (one statement, see
:mod:`hypereal.webhooks.delivery`), so whichever process sends an attempt signs it with the
secret current at its claim. Each process keeps the signers it built (:func:`signer`, per
account, with the secret each was built from); a rotation drops the account's signer in the
process that rotated, and a signer built from another secret is never used.
"""

from __future__ import annotations

import base64
import secrets

from standardwebhooks import Webhook

from hypereal.domain.errors import NotFound
from hypereal.store.db import Database
from hypereal.store.writer import Dialect, Ops, Sql

SECRET_PREFIX = "whsec_"

# account id -> (secret, its signer), in this process.
_signers: dict[str, tuple[str, Webhook]] = {}
_MAX_SIGNERS = 10_000


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signer(account_id: str, secret: str) -> Webhook:
    """The Standard Webhooks signer of ``secret``, the account's current secret (as read with
    the delivery's claim); built once per secret and process."""
    cached = _signers.get(account_id)
    if cached is not None and cached[0] == secret:
        return cached[1]
    if len(_signers) >= _MAX_SIGNERS:
        _signers.clear()
    made = Webhook(secret)
    _signers[account_id] = (secret, made)
    return made


def forget_signer(account_id: str) -> None:
    """Drop the account's cached signer (its secret changed)."""
    _signers.pop(account_id, None)


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
    forget_signer(account_id)
    if not found:
        raise NotFound(f"Account not found: {account_id}")
    return secret
