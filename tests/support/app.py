"""The app in process for API tests: an httpx client speaking ASGI to it, and funded keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from hypereal.app import create_app
from hypereal.domain import keys, ledger
from hypereal.services import Services


@asynccontextmanager
async def app_client(
    services: Services, base_url: str = "http://testserver"
) -> AsyncIterator[httpx.AsyncClient]:
    """The app on ``services``, its lifespan running, and a client sending to it over ASGI."""
    app = create_app(services.settings, services=services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client


async def funded_key(services: Services, credits: int, name: str = "test") -> tuple[str, str]:
    """A new account holding ``credits`` and a key of it: ``(secret, account id)``."""
    account = await keys.create_account(services.db, name)
    if credits:
        await ledger.grant(services.db, account, credits)
    return (await keys.create_key(services.db, account)).secret, account


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}
