"""Admin API (admin key only): accounts, keys, credits, any account's ledger."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from hypereal.api.deps import AdminDep, ServicesDep
from hypereal.api.schemas import LedgerCursor, entry_json, iso, key_json, page
from hypereal.domain import keys, ledger
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


class CreateKey(Body):
    account_id: str | None = Field(default=None, alias="accountId")
    name: str = Field(default="", max_length=200)
    credits: int = Field(
        default=0, ge=0, le=MAX_CREDITS, description="Granted when a new account is created"
    )
    rate_limit_per_hour: int | None = Field(
        default=None, ge=1, le=MAX_RATE_LIMIT_PER_HOUR, alias="rateLimitPerHour"
    )


class UpdateKey(Body):
    rate_limit_per_hour: int | None = Field(
        default=None, ge=1, le=MAX_RATE_LIMIT_PER_HOUR, alias="rateLimitPerHour"
    )


class Grant(Body):
    amount: int = Field(gt=0, le=MAX_CREDITS)
    description: str = Field(default="admin grant", max_length=300)


async def _account_json(services: ServicesDep, account_id: str) -> dict[str, Any]:
    return {"accountId": account_id, "balance": await ledger.balance(services.db, account_id)}


@router.post("/accounts", status_code=201)
async def create_account(body: CreateAccount, _: AdminDep, services: ServicesDep) -> dict[str, Any]:
    account_id = await keys.create_account(services.db, body.name, is_admin=body.is_admin)
    if body.credits:
        await ledger.grant(services.db, account_id, body.credits, "initial credits")
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
async def create_key(body: CreateKey, _: AdminDep, services: ServicesDep) -> dict[str, Any]:
    """Create a key; without ``accountId`` a new account is created for it."""
    account_id = body.account_id
    if account_id is None:
        account_id = await keys.create_account(services.db, body.name or "account")
        if body.credits:
            await ledger.grant(services.db, account_id, body.credits, "initial credits")
    created = await keys.create_key(
        services.db, account_id, name=body.name, rate_limit_per_hour=body.rate_limit_per_hour
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
async def revoke_key(key_id: str, _: AdminDep, services: ServicesDep) -> dict[str, Any]:
    return key_json(await keys.revoke_key(services.db, key_id))


@router.delete("/keys/{key_id}")
async def delete_key(key_id: str, _: AdminDep, services: ServicesDep) -> dict[str, Any]:
    """Same as revoke: keys are kept (revoked) so the ledger's history stays readable."""
    return key_json(await keys.revoke_key(services.db, key_id))


@router.patch("/keys/{key_id}")
async def update_key(
    key_id: str, body: UpdateKey, _: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    """Set (or with null, reset to the default) the key's requests-per-hour limit."""
    return key_json(await keys.set_key_rate_limit(services.db, key_id, body.rate_limit_per_hour))


@router.post("/accounts/{account_id}/credits")
async def grant_credits(
    account_id: str, body: Grant, _: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    entry = await ledger.grant(services.db, account_id, body.amount, body.description)
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
