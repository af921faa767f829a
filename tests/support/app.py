"""The app in process for API tests: an httpx client speaking ASGI to it, the app served on
127.0.0.1 for SDKs and real sockets, and funded keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx

from hypereal.app import create_app
from hypereal.domain import keys, ledger
from hypereal.services import Services
from tests.support.servers import serve_app


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


@contextmanager
def live_app(services: Services, *, port: int | None = None) -> Iterator[str]:
    """The app on ``services`` served over HTTP on 127.0.0.1 (on ``port`` when given): its URL."""
    with serve_app(create_app(services.settings, services=services), port=port) as url:
        yield url


async def funded_key(services: Services, credits: int, name: str = "test") -> tuple[str, str]:
    """A new account holding ``credits`` and a key of it: ``(secret, account id)``."""
    account = await keys.create_account(services.db, name)
    if credits:
        await ledger.grant(services.db, account, credits)
    return (await keys.create_key(services.db, account)).secret, account


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}
