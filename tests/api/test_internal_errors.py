"""An unexpected error is a JSON 500 that still carries the CORS and rate-limit headers."""

from __future__ import annotations

import httpx
from fastapi import APIRouter

from hypereal.app import create_app
from hypereal.domain import keys
from hypereal.services import Services
from tests.conftest import auth


async def test_500_carries_cors_and_rate_limit_headers(services: Services) -> None:
    boom = APIRouter()

    @boom.get("/boom")
    async def _boom() -> None:
        raise RuntimeError("secret internal detail")

    app = create_app(services.settings, services=services, extra_routers=[boom])
    account = await keys.create_account(services.db, "a")
    key = (await keys.create_key(services.db, account)).secret
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {**auth(key), "Origin": "https://app.example"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        first = await c.get("/v1/boom", headers=headers)
        second = await c.get("/api/v1/boom", headers=headers)
    for response in (first, second):
        assert response.status_code == 500
        assert response.json() == {"error": "Internal server error"}
        assert "secret" not in response.text
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers["x-ratelimit-limit"] == "1000"
    assert first.headers["x-ratelimit-remaining"] == "999"
    assert second.headers["x-ratelimit-remaining"] == "998"
    # Each 500 is a new response: no header piles up from one request to the next.
    assert second.headers.get_list("access-control-allow-origin") == ["*"]
