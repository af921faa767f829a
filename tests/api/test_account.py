"""Balance, usage, the admin API for keys and credits, and the idempotent charging path."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hypereal.api.deps import PrincipalDep, ServicesDep
from hypereal.api.idempotency import idempotent
from hypereal.app import create_app
from hypereal.domain import ledger
from hypereal.domain.ids import new_id
from hypereal.services import Services
from tests.conftest import MakeKey, auth

# A charging endpoint built from the same pieces the generation endpoints use.
charge_router = APIRouter()


@charge_router.post("/test-charge")
async def charge(request: Request, principal: PrincipalDep, services: ServicesDep) -> JSONResponse:
    async def produce() -> JSONResponse:
        body = await request.json()
        entry = await ledger.debit(
            services.db,
            principal.account_id,
            int(body["cost"]),
            reference=new_id("res"),
            description="test charge",
        )
        return JSONResponse({"resultId": entry.reference, "creditsUsed": -entry.amount})

    return await idempotent(request, principal, services, produce)  # type: ignore[return-value]


async def charging_client(services: Services) -> httpx.AsyncClient:
    app = create_app(services.settings, services=services, extra_routers=[charge_router])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_credits_and_usage_show_the_callers_ledger(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = await make_key(credits=120)
    for prefix in ("/v1", "/api/v1"):
        credits = await client.get(f"{prefix}/credits", headers=auth(key))
        assert credits.json()["balance"] == 120
    usage = (await client.get("/v1/usage", headers=auth(key))).json()
    assert [e["type"] for e in usage["data"]] == ["grant"]
    assert usage["data"][0]["amount"] == 120 and usage["hasMore"] is False


async def test_usage_paginates(
    client: httpx.AsyncClient, make_key: MakeKey, services: Services
) -> None:
    key = await make_key(credits=1)
    account = (await client.get("/v1/credits", headers=auth(key))).json()["accountId"]
    for _ in range(4):
        await ledger.grant(services.db, account, 1)
    first = (await client.get("/v1/usage?limit=3", headers=auth(key))).json()
    assert len(first["data"]) == 3 and first["hasMore"] is True
    rest = (
        await client.get(f"/v1/usage?limit=3&before={first['nextCursor']}", headers=auth(key))
    ).json()
    assert len(rest["data"]) == 2 and rest["hasMore"] is False


async def test_admin_creates_keys_grants_credits_and_reads_ledgers(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    admin = auth(await make_key(admin=True))
    created = (await client.post("/v1/admin/keys", headers=admin, json={"credits": 30})).json()
    account = created["accountId"]
    granted = await client.post(
        f"/v1/admin/accounts/{account}/credits", headers=admin, json={"amount": 12}
    )
    assert granted.json()["balance"] == 42
    balance = await client.get(f"/api/v1/admin/accounts/{account}/balance", headers=admin)
    assert balance.json() == {"accountId": account, "balance": 42}
    history = (await client.get(f"/v1/admin/accounts/{account}/ledger", headers=admin)).json()
    assert [e["amount"] for e in history["data"]] == [12, 30]
    listed = (await client.get(f"/v1/admin/keys?accountId={account}", headers=admin)).json()
    assert [k["id"] for k in listed["data"]] == [created["id"]]
    assert "key" not in listed["data"][0]
    user = auth(created["key"])
    assert (await client.get("/v1/credits", headers=user)).json()["balance"] == 42
    revoked = await client.post(f"/v1/admin/keys/{created['id']}/revoke", headers=admin)
    assert revoked.json()["active"] is False
    assert (await client.get("/v1/credits", headers=user)).status_code == 401
    missing = await client.get("/v1/admin/accounts/acct_nope/balance", headers=admin)
    assert missing.status_code == 404


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_402_body_is_exact_and_nothing_is_charged(
    services: Services, make_key: MakeKey, prefix: str
) -> None:
    key = await make_key(credits=10)
    async with await charging_client(services) as c:
        response = await c.post(f"{prefix}/test-charge", headers=auth(key), json={"cost": 69})
        assert response.status_code == 402
        assert response.json() == {"error": "Insufficient credits", "required": 69, "available": 10}
        assert (await c.get(f"{prefix}/credits", headers=auth(key))).json()["balance"] == 10


async def test_idempotency_key_replays_and_charges_once(
    services: Services, make_key: MakeKey
) -> None:
    key = await make_key(credits=100)
    headers = {**auth(key), "Idempotency-Key": "order-1"}
    async with await charging_client(services) as c:
        first = await c.post("/v1/test-charge", headers=headers, json={"cost": 10})
        again = await c.post("/api/v1/test-charge", headers=headers, json={"cost": 10})
        assert first.status_code == again.status_code == 200
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
        assert (await c.get("/v1/credits", headers=auth(key))).json()["balance"] == 90
        other = await c.post("/v1/test-charge", headers=headers, json={"cost": 11})
        assert other.status_code == 409
        assert "different request" in other.json()["error"]


async def test_idempotency_key_charges_once_under_concurrent_retries(
    services: Services, make_key: MakeKey
) -> None:
    key = await make_key(credits=100)
    headers = {**auth(key), "Idempotency-Key": "burst"}
    async with await charging_client(services) as c:
        responses = await asyncio.gather(
            *(c.post("/v1/test-charge", headers=headers, json={"cost": 10}) for _ in range(10))
        )
        assert {r.status_code for r in responses} <= {200, 409}
        assert sum(r.status_code == 200 for r in responses) >= 1
        assert (await c.get("/v1/credits", headers=auth(key))).json()["balance"] == 90


async def test_failed_request_releases_its_idempotency_key(
    services: Services, make_key: MakeKey
) -> None:
    key = await make_key(credits=5)
    headers = {**auth(key), "Idempotency-Key": "retry-me"}
    async with await charging_client(services) as c:
        assert (
            await c.post("/v1/test-charge", headers=headers, json={"cost": 10})
        ).status_code == 402
        account = (await c.get("/v1/credits", headers=auth(key))).json()["accountId"]
        await ledger.grant(services.db, account, 10)
        retried = await c.post("/v1/test-charge", headers=headers, json={"cost": 10})
        assert retried.status_code == 200


async def _account_ids(client: httpx.AsyncClient, admin: dict[str, str]) -> list[str]:
    accounts = (await client.get("/v1/admin/accounts", headers=admin)).json()["data"]
    return [a["accountId"] for a in accounts]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/admin/accounts", {"credits": 9223372036854775807}, "credits"),
        ("/admin/accounts", {"credits": 10**12 + 1}, "credits"),
        ("/admin/accounts", {"credits": 10**30}, "credits"),
        ("/admin/keys", {"credits": 9223372036854775807}, "credits"),
        ("/admin/keys", {"credits": 10**12 + 1}, "credits"),
        ("/admin/keys", {"rateLimitPerHour": 9223372036854775807}, "rateLimitPerHour"),
        ("/admin/keys", {"rateLimitPerHour": 10**9 + 1}, "rateLimitPerHour"),
        ("/admin/keys", {"credits": -3}, "credits"),
    ],
)
async def test_admin_create_refuses_out_of_range_numbers_and_creates_nothing(
    client: httpx.AsyncClient, make_key: MakeKey, path: str, body: dict[str, int], field: str
) -> None:
    admin = auth(await make_key(admin=True))
    before = await _account_ids(client, admin)
    keys_before = (await client.get("/v1/admin/keys", headers=admin)).json()["data"]
    response = await client.post(f"/v1{path}", headers=admin, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"Invalid value for '{field}': ")
    assert await _account_ids(client, admin) == before
    assert (await client.get("/v1/admin/keys", headers=admin)).json()["data"] == keys_before


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/admin/accounts", {"isAdmin": 0}, "isAdmin"),
        ("/admin/accounts", {"isAdmin": 1}, "isAdmin"),
        ("/admin/accounts", {"isAdmin": "true"}, "isAdmin"),
        ("/admin/accounts", {"credits": True}, "credits"),
        ("/admin/accounts", {"credits": "5"}, "credits"),
        ("/admin/accounts", {"credits": 5.0}, "credits"),
        ("/admin/accounts", {"name": 5}, "name"),
        ("/admin/keys", {"credits": False}, "credits"),
        ("/admin/keys", {"credits": "10"}, "credits"),
        ("/admin/keys", {"rateLimitPerHour": True}, "rateLimitPerHour"),
        ("/admin/keys", {"rateLimitPerHour": "100"}, "rateLimitPerHour"),
        ("/admin/keys", {"accountId": 5}, "accountId"),
    ],
)
async def test_admin_bodies_are_strictly_typed_and_create_nothing(
    client: httpx.AsyncClient, make_key: MakeKey, path: str, body: dict[str, object], field: str
) -> None:
    admin = auth(await make_key(admin=True))
    before = await _account_ids(client, admin)
    keys_before = (await client.get("/v1/admin/keys", headers=admin)).json()["data"]
    response = await client.post(f"/v1{path}", headers=admin, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"Invalid value for '{field}': ")
    assert await _account_ids(client, admin) == before
    assert (await client.get("/v1/admin/keys", headers=admin)).json()["data"] == keys_before


async def test_admin_grant_and_key_update_are_strictly_typed(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    admin = auth(await make_key(admin=True))
    account = (await client.post("/v1/admin/accounts", headers=admin, json={"credits": 5})).json()
    url = f"/v1/admin/accounts/{account['accountId']}/credits"
    for body in ({"amount": True}, {"amount": "3"}, {"amount": 3, "description": 7}):
        response = await client.post(url, headers=admin, json=body)
        assert response.status_code == 400, (body, response.text)
    created = (await client.post("/v1/admin/keys", headers=admin, json={})).json()
    for value in (True, "50"):
        response = await client.patch(
            f"/v1/admin/keys/{created['id']}", headers=admin, json={"rateLimitPerHour": value}
        )
        assert response.status_code == 400, (value, response.text)
        assert response.json()["error"].startswith("Invalid value for 'rateLimitPerHour': ")
    balance = (
        await client.get(f"/v1/admin/accounts/{account['accountId']}/balance", headers=admin)
    ).json()["balance"]
    assert balance == 5


async def test_admin_rate_limit_update_refuses_huge_numbers(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    admin = auth(await make_key(admin=True))
    created = (await client.post("/v1/admin/keys", headers=admin, json={})).json()
    for value in (9223372036854775807, 10**9 + 1):
        response = await client.patch(
            f"/v1/admin/keys/{created['id']}", headers=admin, json={"rateLimitPerHour": value}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith("Invalid value for 'rateLimitPerHour': ")
    ok = await client.patch(
        f"/v1/admin/keys/{created['id']}", headers=admin, json={"rateLimitPerHour": 10**9}
    )
    assert ok.status_code == 200


async def test_admin_grant_refuses_huge_amounts_and_the_balance_stays_an_int(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    admin = auth(await make_key(admin=True))
    account = (await client.post("/v1/admin/accounts", headers=admin, json={"credits": 5})).json()
    url = f"/v1/admin/accounts/{account['accountId']}/credits"
    for amount in (9223372036854775807, 10**12 + 1, 10**40):
        response = await client.post(url, headers=admin, json={"amount": amount})
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith("Invalid value for 'amount': ")
    granted = (await client.post(url, headers=admin, json={"amount": 10**12})).json()
    assert granted["balance"] == 10**12 + 5 and type(granted["balance"]) is int
    balance = (
        await client.get(f"/v1/admin/accounts/{account['accountId']}/balance", headers=admin)
    ).json()["balance"]
    assert balance == 10**12 + 5 and type(balance) is int


@pytest.mark.parametrize(
    "before", ["9223372036854775808", "-9223372036854775809", "99999999999999999999"]
)
async def test_ledger_cursor_outside_64_bits_is_400_naming_before(
    client: httpx.AsyncClient, make_key: MakeKey, before: str
) -> None:
    key = auth(await make_key(credits=3))
    admin = auth(await make_key(admin=True))
    account = (await client.get("/v1/credits", headers=key)).json()["accountId"]
    urls = [(f"{prefix}/usage", key) for prefix in ("/v1", "/api/v1")] + [
        (f"{prefix}/admin/accounts/{account}/ledger", admin) for prefix in ("/v1", "/api/v1")
    ]
    for url, headers in urls:
        response = await client.get(url, params={"before": before}, headers=headers)
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"].startswith("Invalid value for 'before': "), url
    # The edges of the range are still cursors (nothing older than the largest, nothing at all
    # before the smallest).
    for edge, count in (("9223372036854775807", 1), ("-9223372036854775808", 0)):
        ok = await client.get("/v1/usage", params={"before": edge}, headers=key)
        assert ok.status_code == 200 and len(ok.json()["data"]) == count
