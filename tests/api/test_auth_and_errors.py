"""Auth, error bodies and CORS on both path prefixes."""

from __future__ import annotations

import httpx
import pytest

from hypereal.domain import keys
from hypereal.services import Services
from tests.conftest import MakeKey, auth

PREFIXES = ["/v1", "/api/v1"]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Token x"}, {"Authorization": "Bearer ck_doesnotexist"}],
    ids=["missing", "malformed", "unknown"],
)
async def test_requests_without_a_valid_key_get_401_json(
    client: httpx.AsyncClient, prefix: str, headers: dict[str, str]
) -> None:
    response = await client.get(f"{prefix}/credits", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"].startswith("Unauthorized. ")
    assert list(response.json()) == ["error"]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_revoked_key_gets_401(
    client: httpx.AsyncClient, services: Services, prefix: str
) -> None:
    account = await keys.create_account(services.db, "a")
    created = await keys.create_key(services.db, account)
    assert (await client.get(f"{prefix}/credits", headers=auth(created.secret))).status_code == 200
    await keys.revoke_key(services.db, created.info.id)
    response = await client.get(f"{prefix}/credits", headers=auth(created.secret))
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_unknown_route_is_404_json(
    client: httpx.AsyncClient, make_key: MakeKey, prefix: str
) -> None:
    response = await client.get(f"{prefix}/no-such-thing", headers=auth(await make_key()))
    assert response.status_code == 404
    assert response.json() == {"error": "Not found"}


async def test_bad_bodies_are_400_naming_the_field(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    admin = auth(await make_key(admin=True))
    bad_type = await client.post("/v1/admin/keys", headers=admin, json={"credits": "lots"})
    assert bad_type.status_code == 400
    assert "'credits'" in bad_type.json()["error"]
    not_json = await client.post(
        "/v1/admin/keys", headers={**admin, "content-type": "application/json"}, content=b"{oops"
    )
    assert not_json.status_code == 400
    assert not_json.json() == {"error": "Request body is not valid JSON"}
    missing = await client.post("/v1/admin/accounts/acct_x/credits", headers=admin, json={})
    assert missing.status_code == 400
    assert missing.json() == {"error": "Missing required field 'amount'"}


async def test_unknown_extra_fields_are_ignored(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    admin = auth(await make_key(admin=True))
    response = await client.post(
        "/v1/admin/keys", headers=admin, json={"name": "x", "credits": 5, "something_new": [1, 2]}
    )
    assert response.status_code == 201
    assert response.json()["key"].startswith("ck_")


async def test_admin_api_refuses_non_admin_keys(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    response = await client.get("/v1/admin/keys", headers=auth(await make_key()))
    assert response.status_code == 403
    assert "admin" in response.json()["error"]


async def test_cors_preflight_is_answered_without_a_key(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/v1/images/generate",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert "POST" in response.headers["access-control-allow-methods"]


async def test_openapi_and_docs_are_served(client: httpx.AsyncClient) -> None:
    schema = await client.get("/openapi.json")
    assert schema.status_code == 200
    assert "/v1/credits" in schema.json()["paths"]
    assert "/api/v1/credits" in schema.json()["paths"]
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_unexpected_errors_are_500_json_without_traceback(services: Services) -> None:
    """The 500 also carries the CORS and rate-limit headers, a new response each time."""
    from fastapi import APIRouter

    from hypereal.app import create_app

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


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/admin/accounts", {"GET", "POST"}),
        ("PUT", "/admin/accounts", {"GET", "POST"}),
        ("PUT", "/admin/keys/key_x", {"DELETE", "PATCH"}),
        ("GET", "/admin/keys/key_x", {"DELETE", "PATCH"}),
        ("DELETE", "/credits", {"GET"}),
    ],
)
async def test_405_allow_lists_every_method_of_the_path(
    client: httpx.AsyncClient,
    make_key: MakeKey,
    prefix: str,
    method: str,
    path: str,
    allowed: set[str],
) -> None:
    admin = auth(await make_key(admin=True))
    response = await client.request(method, prefix + path, headers=admin)
    assert response.status_code == 405, response.text
    assert response.json() == {"error": "Method not allowed"}
    assert set(response.headers["allow"].split(", ")) == allowed
