"""The caller's own account: balance and ledger."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from hypereal.api.deps import PrincipalDep, ServicesDep
from hypereal.api.schemas import LedgerCursor, iso, page
from hypereal.domain import ledger, usage
from hypereal.domain.errors import Forbidden

router = APIRouter(tags=["account"])


@router.get("/credits")
async def get_credits(principal: PrincipalDep, services: ServicesDep) -> dict[str, Any]:
    """The caller's credit balance."""
    balance = await ledger.balance(services.db, principal.account_id)
    return {"accountId": principal.account_id, "balance": balance, "credits": balance}


@router.get("/usage")
async def get_usage(
    principal: PrincipalDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: LedgerCursor = None,
) -> dict[str, Any]:
    """The caller's ledger (grants, debits, refunds), newest first, paginated."""
    rows = await ledger.entries(
        services.db, principal.account_id, limit=limit + 1, before_id=before
    )
    return page(rows, limit)


@router.get("/usage/summary")
async def usage_summary(
    principal: PrincipalDep,
    services: ServicesDep,
    group_by: Annotated[str | None, Query(alias="groupBy", max_length=40)] = None,
    start: Annotated[str | None, Query(alias="from", max_length=40)] = None,
    end: Annotated[str | None, Query(alias="to", max_length=40)] = None,
    account_id: Annotated[str | None, Query(alias="accountId", max_length=40)] = None,
) -> dict[str, Any]:
    """Credits spent (debited less refunded) grouped by model, key and/or UTC day over
    [from, to) (default the last 30 days); admins may name any ``accountId``."""
    if account_id is not None and account_id != principal.account_id:
        if not principal.is_admin:
            raise Forbidden("Only an admin key may read another account's usage")
        await ledger.balance(services.db, account_id)  # 404 for an unknown account
    target = account_id or principal.account_id
    result = await usage.summary(
        services.db,
        target,
        usage.parse_group_by(group_by),
        usage.parse_moment(start, "from"),
        usage.parse_moment(end, "to", end=True),
    )
    return {
        "accountId": target,
        "groupBy": list(result.group_by),
        "from": iso(result.start),
        "to": iso(result.end),
        "data": result.rows,
        "total": result.total,
    }
