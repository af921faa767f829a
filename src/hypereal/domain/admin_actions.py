"""The admin actions, each done and recorded in the audit log (``domain/audit.py``) in one
place, for the admin API and the operator's CLI alike. ``actor`` is the admin key acting;
None for the CLI."""

from __future__ import annotations

from typing import Any

from hypereal.domain import audit, keys, ledger
from hypereal.domain.keys import Controls, CreatedKey, KeyInfo, Principal
from hypereal.domain.webhook_secrets import rotate_webhook_secret
from hypereal.store.db import Database

# keys.Controls field -> its name in the audit log's details (the API's names).
DETAIL_NAMES = {
    "rate_limit_per_hour": "rateLimitPerHour",
    "models": "models",
    "expires_at": "expiresAt",
    "budget_daily": "dailyBudget",
    "budget_monthly": "monthlyBudget",
    "budget_total": "maxBudget",
    "name": "name",
}


def _details(changed: dict[str, object]) -> dict[str, Any]:
    return {DETAIL_NAMES.get(name, name): value for name, value in changed.items()}


async def create_account(
    db: Database, actor: Principal | None, name: str, credits: int = 0, *, is_admin: bool = False
) -> str:
    """A new account (granted ``credits``); returns its id."""
    account_id = await keys.create_account(db, name, is_admin=is_admin)
    await audit.record(
        db,
        actor,
        "account.created",
        target_type="account",
        target_id=account_id,
        account_id=account_id,
        details={"name": name, "isAdmin": is_admin, "credits": credits},
    )
    if credits:
        await ledger.grant(db, account_id, credits, "initial credits")
    return account_id


async def create_key(
    db: Database,
    actor: Principal | None,
    account_id: str,
    *,
    name: str = "",
    controls: Controls | None = None,
) -> CreatedKey:
    """A new key of ``account_id`` with ``controls`` (NotFound for an unknown account)."""
    controls = controls or Controls()
    created = await keys.create_key(
        db,
        account_id,
        name=name,
        rate_limit_per_hour=controls.rate_limit_per_hour,
        controls=controls,
    )
    await audit.record(
        db,
        actor,
        "key.created",
        target_type="key",
        target_id=created.info.id,
        account_id=account_id,
        details={"name": name, **_details(controls.summary())},
    )
    return created


async def update_key(
    db: Database, actor: Principal | None, key_id: str, controls: Controls
) -> KeyInfo:
    """Change the key's controls that ``controls`` names (NotFound for an unknown key)."""
    info, changed = await keys.update_key(db, key_id, controls)
    if changed:
        await audit.record(
            db,
            actor,
            "key.updated",
            target_type="key",
            target_id=key_id,
            account_id=info.account_id,
            details=_details(changed),
        )
    return info


async def revoke_key(db: Database, actor: Principal | None, key_id: str) -> KeyInfo:
    """Revoke a key (recorded once: revoking a revoked key changes nothing)."""
    before = await keys.get_key(db, key_id)
    info = await keys.revoke_key(db, key_id)
    if before.revoked_at is None:
        await audit.record(
            db,
            actor,
            "key.revoked",
            target_type="key",
            target_id=key_id,
            account_id=info.account_id,
        )
    return info


async def grant_credits(
    db: Database, actor: Principal | None, account_id: str, amount: int, description: str
) -> ledger.Entry:
    entry = await ledger.grant(db, account_id, amount, description)
    await audit.record(
        db,
        actor,
        "credits.granted",
        target_type="account",
        target_id=account_id,
        account_id=account_id,
        details={"amount": amount, "description": description, "entryId": entry.id},
    )
    return entry


async def rotate_secret(db: Database, actor: Principal | None, account_id: str) -> str:
    """A new webhook signing secret for the account; returns it."""
    secret = await rotate_webhook_secret(db, account_id)
    await audit.record(
        db,
        actor,
        "webhook_secret.rotated",
        target_type="account",
        target_id=account_id,
        account_id=account_id,
    )
    return secret
