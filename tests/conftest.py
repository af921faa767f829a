"""Shared fixtures: settings on a temp data dir, the app with its lifespan, API clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from hypereal.app import create_app
from hypereal.domain import keys, ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings

MakeKey = Callable[..., Awaitable[str]]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", bootstrap_admin=False, public_url="http://testserver"
    )


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    services = build_services(settings)
    await services.migrate()
    yield services
    await services.close()


@pytest.fixture
async def app(services: Services):  # type: ignore[no-untyped-def]
    application = create_app(services.settings, services=services)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
def make_key(services: Services) -> MakeKey:
    """``await make_key(credits=100, admin=False, rate_limit=None)`` -> a new account's key."""

    async def _make(credits: int = 0, admin: bool = False, rate_limit: int | None = None) -> str:
        account_id = await keys.create_account(services.db, "test", is_admin=admin)
        if credits:
            await ledger.grant(services.db, account_id, credits, "test grant")
        created = await keys.create_key(services.db, account_id, rate_limit_per_hour=rate_limit)
        return created.secret

    return _make


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
