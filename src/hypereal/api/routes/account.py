"""The caller's own account: balance and ledger."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from hypereal.api.deps import PrincipalDep, ServicesDep
from hypereal.api.schemas import LedgerCursor, page
from hypereal.domain import ledger

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
