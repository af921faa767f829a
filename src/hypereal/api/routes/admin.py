"""Admin API (admin key only): accounts, keys, credits, any account's ledger."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import select

from hypereal.api.deps import AdminDep, ServicesDep
from hypereal.api.schemas import LedgerCursor, audit_json, entry_json, iso, key_json, page, paged
from hypereal.domain import admin_actions, audit, keys, ledger
from hypereal.store.models import Account

router = APIRouter(prefix="/admin", tags=["admin"])

# Upper bounds, so huge numbers answer 400 instead of overflowing SQLite's 64-bit INTEGER
# (MAX_CREDITS matches ledger.MAX_GRANT).
MAX_CREDITS = 10**12
MAX_RATE_LIMIT_PER_HOUR = 10**9


class Body(BaseModel):
    # Strict: {"isAdmin": 0}, {"credits": false} or {"credits": "5"} is a 400, not coerced.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


class CreateAccount(Body):
    name: str = Field(default="", max_length=200)
    credits: int = Field(default=0, ge=0, le=MAX_CREDITS)
    is_admin: bool = Field(default=False, alias="isAdmin")


# Body field -> keys.Controls field.
CONTROL_FIELDS = {
    "rate_limit_per_hour": "rate_limit_per_hour",
    "models": "models",
    "expires_at": "expires_at",
    "daily_budget": "budget_daily",
    "monthly_budget": "budget_monthly",
    "max_budget": "budget_total",
    "name": "name",
}
ModelPattern = Annotated[str, Field(min_length=1, max_length=100)]
Budget = Annotated[int | None, Field(ge=0, le=MAX_CREDITS)]


def _iso_text(value: object) -> object:
    if value is not None and not isinstance(value, str):
        raise ValueError("must be an ISO-8601 date-time string")
    return value


class KeyControls(Body):
    """The per-key controls (see domain/keys.py); in a PATCH only the fields sent change and
    null clears one."""

    rate_limit_per_hour: int | None = Field(
        default=None, ge=1, le=MAX_RATE_LIMIT_PER_HOUR, alias="rateLimitPerHour"
    )
    models: list[ModelPattern] | None = Field(
        default=None, max_length=100, description="Slugs or glob patterns (chat-*); null: all"
    )
    # ISO-8601 from JSON (strict mode would want a datetime object); a number is refused
    # (lax mode would read it as seconds since 1970), as the schema says: a date-time string.
    expires_at: Annotated[datetime | None, BeforeValidator(_iso_text)] = Field(
        default=None, alias="expiresAt", strict=False
    )
    daily_budget: Budget = Field(default=None, alias="dailyBudget")
    monthly_budget: Budget = Field(default=None, alias="monthlyBudget")
    max_budget: Budget = Field(default=None, alias="maxBudget")

    def controls(self) -> keys.Controls:
        sent = {CONTROL_FIELDS[n] for n in self.model_fields_set if n in CONTROL_FIELDS}
        return keys.Controls(
            models=self.models,
            expires_at=self.expires_at,
            budget_daily=self.daily_budget,
            budget_monthly=self.monthly_budget,
            budget_total=self.max_budget,
            rate_limit_per_hour=self.rate_limit_per_hour,
            name=getattr(self, "name", None),
            fields=frozenset(sent),
        )


class CreateKey(KeyControls):
    account_id: str | None = Field(default=None, alias="accountId")
    name: str = Field(default="", max_length=200)
    credits: int = Field(
        default=0, ge=0, le=MAX_CREDITS, description="Granted when a new account is created"
    )


class UpdateKey(KeyControls):
    name: str | None = Field(default=None, max_length=200)


class Grant(Body):
    amount: int = Field(gt=0, le=MAX_CREDITS)
    description: str = Field(default="admin grant", max_length=300)


async def _account_json(services: ServicesDep, account_id: str) -> dict[str, Any]:
    return {"accountId": account_id, "balance": await ledger.balance(services.db, account_id)}


@router.post("/accounts", status_code=201)
async def create_account(
    body: CreateAccount, admin: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    account_id = await admin_actions.create_account(
        services.db, admin, body.name, body.credits, is_admin=body.is_admin
    )
    return await _account_json(services, account_id)


@router.get("/accounts")
async def list_accounts(_: AdminDep, services: ServicesDep) -> dict[str, Any]:
    async with services.db.session() as session:
        rows = (await session.scalars(select(Account).order_by(Account.created_at))).all()
    return {
        "data": [
            {
                "accountId": a.id,
                "name": a.name,
                "isAdmin": a.is_admin,
                "balance": a.balance,
                "createdAt": iso(a.created_at),
            }
            for a in rows
        ]
    }


@router.post("/keys", status_code=201)
async def create_key(body: CreateKey, admin: AdminDep, services: ServicesDep) -> dict[str, Any]:
    """Create a key, with its controls; without ``accountId`` a new account is created."""
    account_id = body.account_id
    if account_id is None:
        account_id = await admin_actions.create_account(
            services.db, admin, body.name or "account", body.credits
        )
    created = await admin_actions.create_key(
        services.db, admin, account_id, name=body.name, controls=body.controls()
    )
    return {**key_json(created.info), "key": created.secret}


@router.get("/keys")
async def list_keys(
    _: AdminDep,
    services: ServicesDep,
    account_id: Annotated[str | None, Query(alias="accountId")] = None,
) -> dict[str, Any]:
    return {"data": [key_json(k) for k in await keys.list_keys(services.db, account_id)]}


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, admin: AdminDep, services: ServicesDep) -> dict[str, Any]:
    return key_json(await admin_actions.revoke_key(services.db, admin, key_id))


@router.delete("/keys/{key_id}")
async def delete_key(key_id: str, admin: AdminDep, services: ServicesDep) -> dict[str, Any]:
    """Same as revoke: keys are kept (revoked) so the ledger's history stays readable."""
    return key_json(await admin_actions.revoke_key(services.db, admin, key_id))


@router.patch("/keys/{key_id}")
async def update_key(
    key_id: str, body: UpdateKey, admin: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    """Change the key's controls: only the fields sent change; null clears a limit (the
    requests-per-hour limit goes back to the default)."""
    info = await admin_actions.update_key(services.db, admin, key_id, body.controls())
    return key_json(info)


@router.post("/accounts/{account_id}/credits")
async def grant_credits(
    account_id: str, body: Grant, admin: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    entry = await admin_actions.grant_credits(
        services.db, admin, account_id, body.amount, body.description
    )
    return {"accountId": account_id, "balance": entry.balance_after, "entry": entry_json(entry)}


@router.get("/accounts/{account_id}/balance")
async def account_balance(account_id: str, _: AdminDep, services: ServicesDep) -> dict[str, Any]:
    return await _account_json(services, account_id)


@router.get("/accounts/{account_id}/ledger")
async def account_ledger(
    account_id: str,
    _: AdminDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: LedgerCursor = None,
) -> dict[str, Any]:
    await ledger.balance(services.db, account_id)  # 404 for an unknown account
    rows = await ledger.entries(services.db, account_id, limit=limit + 1, before_id=before)
    return page(rows, limit)


@router.get("/audit")
async def audit_log(
    _: AdminDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: LedgerCursor = None,
    action: Annotated[str | None, Query(max_length=40)] = None,
    account_id: Annotated[str | None, Query(alias="accountId", max_length=40)] = None,
) -> dict[str, Any]:
    """The audit log, newest first, paginated like the ledger (``before`` = ``nextCursor``)."""
    rows = await audit.entries(
        services.db, limit=limit + 1, before_id=before, action=action, account_id=account_id
    )
    return paged(rows, limit, audit_json)
