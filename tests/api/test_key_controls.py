"""Per-key controls through the admin API and on both prefixes: the model allow-list (403),
expiry (401), budgets per day / month / total (402, exact under 200 concurrent requests on
SQLite and PostgreSQL), ledger entries carrying the key and the model, the usage summary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from hypereal.app import create_app
from hypereal.domain import keys, ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.infra import ensure_postgres, temporary_postgres_database

PREFIXES = ("/v1", "/api/v1")


@dataclass
class Env:
    client: httpx.AsyncClient
    services: Services
    admin: dict[str, str]

    async def account(self, credits: int) -> str:
        response = await self.client.post(
            "/v1/admin/accounts", headers=self.admin, json={"credits": credits}
        )
        assert response.status_code == 201, response.text
        return str(response.json()["accountId"])

    async def key(self, account_id: str, **controls: Any) -> tuple[dict[str, Any], dict[str, str]]:
        response = await self.client.post(
            "/v1/admin/keys", headers=self.admin, json={"accountId": account_id, **controls}
        )
        assert response.status_code == 201, response.text
        body = response.json()
        return body, {"Authorization": f"Bearer {body['key']}"}

    async def image(self, headers: dict[str, str], prefix: str = "/v1") -> httpx.Response:
        return await self.client.post(
            f"{prefix}/images/generate",
            headers=headers,
            json={"model": "noop-image", "prompt": "a dot", "size": "64*64"},
        )


@pytest.fixture(params=["sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'hypereal.db'}"
        return
    if not ensure_postgres():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started")
    with temporary_postgres_database() as url:
        yield url


async def _env(tmp_path: Path, database_url: str) -> AsyncIterator[Env]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        bootstrap_admin=False,
        public_url="http://testserver",
        enable_test_backends=True,
        rate_limit_per_hour=10**9,
    )
    services = build_services(settings)
    await services.migrate()
    app = create_app(settings, services=services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            admin_account = await keys.create_account(services.db, "admin", is_admin=True)
            admin = await keys.create_key(services.db, admin_account)
            yield Env(c, services, {"Authorization": f"Bearer {admin.secret}"})
    await services.close()


@pytest.fixture
async def env(tmp_path: Path, database_url: str) -> AsyncIterator[Env]:
    async for value in _env(tmp_path, database_url):
        yield value


async def test_admin_sets_reads_and_patches_a_keys_controls(env: Env) -> None:
    account = await env.account(10)
    expires = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    created, _ = await env.key(
        account,
        name="ci",
        models=["noop-*", "chat-local"],
        expiresAt=expires.isoformat(),
        dailyBudget=5,
        monthlyBudget=50,
        maxBudget=500,
    )
    assert created["models"] == ["noop-*", "chat-local"]
    assert created["expiresAt"] == expires.isoformat().replace("+00:00", "Z")
    assert created["expired"] is False and created["active"] is True
    assert (created["dailyBudget"], created["monthlyBudget"], created["maxBudget"]) == (5, 50, 500)
    assert created["spend"] == {"day": 0, "month": 0, "total": 0}

    for prefix in PREFIXES:
        listed = await env.client.get(
            f"{prefix}/admin/keys", headers=env.admin, params={"accountId": account}
        )
        (shown,) = listed.json()["data"]
        assert shown["models"] == ["noop-*", "chat-local"] and shown["maxBudget"] == 500

    # Only what is sent changes; null clears.
    patched = await env.client.patch(
        f"/api/v1/admin/keys/{created['id']}",
        headers=env.admin,
        json={"models": None, "dailyBudget": 7},
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["models"] is None and body["dailyBudget"] == 7
    assert body["monthlyBudget"] == 50 and body["maxBudget"] == 500
    assert body["expiresAt"] == created["expiresAt"] and body["name"] == "ci"


@pytest.mark.parametrize(
    "body",
    [
        {"models": "noop-*"},
        {"models": [""]},
        {"models": [7]},
        {"maxBudget": -1},
        {"dailyBudget": "5"},
        {"expiresAt": "next tuesday"},
        {"monthlyBudget": 10**13},
    ],
)
async def test_bad_controls_are_a_400_naming_the_field(env: Env, body: dict[str, Any]) -> None:
    account = await env.account(0)
    response = await env.client.post(
        "/v1/admin/keys", headers=env.admin, json={"accountId": account, **body}
    )
    assert response.status_code == 400, response.text
    (field,) = body
    assert response.json()["error"].startswith(f"Invalid value for '{field}")
    created, _ = await env.key(account)
    patched = await env.client.patch(
        f"/v1/admin/keys/{created['id']}", headers=env.admin, json=body
    )
    assert patched.status_code == 400, patched.text


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_a_model_outside_the_allow_list_is_a_403_with_the_reason(
    env: Env, prefix: str
) -> None:
    account = await env.account(10)
    _, headers = await env.key(account, models=["noop-a*", "noop-video"])
    refused = await env.image(headers, prefix)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == (
        "This API key may not use the model 'noop-image' (allowed: noop-a*, noop-video)"
    )
    allowed = await env.client.post(
        f"{prefix}/audio/generate",
        headers=headers,
        json={"model": "noop-audio", "input": {"text": "hi"}},
    )
    assert allowed.status_code == 202, allowed.text
    assert await ledger.balance(env.services.db, account) == 9  # only the allowed one paid
    video = await env.client.post(
        f"{prefix}/videos/generate",
        headers=headers,
        json={"model": "noop-3d", "input": {}},
    )
    assert video.status_code in (400, 403)  # wrong route for a 3D model, or not allowed
    three_d = await env.client.post(
        f"{prefix}/3d/generate", headers=headers, json={"model": "noop-3d", "input": {}}
    )
    assert three_d.status_code == 403, three_d.text
    assert "noop-3d" in three_d.json()["error"]
    assert await ledger.balance(env.services.db, account) == 9


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_an_expired_key_is_a_401_saying_so_until_its_expiry_moves(
    env: Env, prefix: str
) -> None:
    account = await env.account(10)
    past = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    created, headers = await env.key(account, expiresAt=past.isoformat())
    assert created["expired"] is True and created["active"] is False
    refused = await env.client.get(f"{prefix}/credits", headers=headers)
    assert refused.status_code == 401
    assert refused.json()["error"] == ("Unauthorized. This API key expired at 2020-01-02T03:04:05Z")
    assert (await env.image(headers, prefix)).status_code == 401
    # A naive time is UTC; moving the expiry to the future lets the key in again.
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None)
    patched = await env.client.patch(
        f"{prefix}/admin/keys/{created['id']}",
        headers=env.admin,
        json={"expiresAt": later.isoformat()},
    )
    assert patched.status_code == 200 and patched.json()["expired"] is False
    assert (await env.client.get(f"{prefix}/credits", headers=headers)).status_code == 200


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_daily_budget_is_a_402_naming_it_and_a_refund_gives_the_credits_back(
    env: Env,
) -> None:
    account = await env.account(100)
    created, headers = await env.key(account, dailyBudget=3)
    for prefix in ("/v1", "/api/v1", "/v1"):
        assert (await env.image(headers, prefix)).status_code == 200
    for prefix in PREFIXES:
        refused = await env.image(headers, prefix)
        assert refused.status_code == 402, refused.text
        assert refused.json() == {
            "error": "This API key's daily budget is exhausted",
            "budget": "daily",
            "limit": 3,
            "spent": 3,
            "required": 1,
        }
    assert await ledger.balance(env.services.db, account) == 97
    # Refunding one of its debits gives the key that credit back for today.
    debit = next(e for e in await ledger.entries(env.services.db, account) if e.kind == "debit")
    assert debit.key_id == created["id"] and debit.model == "noop-image"
    refund = await ledger.refund(env.services.db, debit.id)
    assert refund is not None and refund.key_id == created["id"]
    assert refund.model == "noop-image"
    key = await keys.get_key(env.services.db, created["id"])
    assert (key.spent_day, key.spent_month, key.spent_total) == (2, 2, 2)
    assert (await env.image(headers)).status_code == 200
    assert (await env.image(headers)).status_code == 402
    # Raising the budget takes effect on the next request.
    await env.client.patch(
        f"/v1/admin/keys/{created['id']}", headers=env.admin, json={"dailyBudget": 10}
    )
    assert (await env.image(headers)).status_code == 200


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_the_account_balance_402_is_separate_from_the_keys_budget(env: Env) -> None:
    account = await env.account(2)
    created, headers = await env.key(account, maxBudget=100, monthlyBudget=100)
    assert (await env.image(headers)).status_code == 200
    assert (await env.image(headers)).status_code == 200
    short = await env.image(headers)
    assert short.status_code == 402
    assert short.json() == {"error": "Insufficient credits", "required": 1, "available": 0}
    # The refused debit did not count against the key.
    key = await keys.get_key(env.services.db, created["id"])
    assert (key.spent_day, key.spent_month, key.spent_total) == (2, 2, 2)


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_jobs_count_against_the_key_budget(env: Env) -> None:
    account = await env.account(100)
    created, headers = await env.key(account, maxBudget=2)
    body = {"model": "noop-audio", "input": {"text": "hi"}}
    for prefix in PREFIXES:
        ok = await env.client.post(f"{prefix}/audio/generate", headers=headers, json=body)
        assert ok.status_code == 202, ok.text
    refused = await env.client.post("/v1/audio/generate", headers=headers, json=body)
    assert refused.status_code == 402
    assert refused.json()["budget"] == "total"
    assert await ledger.balance(env.services.db, account) == 98
    entries = [e for e in await ledger.entries(env.services.db, account) if e.kind == "debit"]
    assert {(e.key_id, e.model) for e in entries} == {(created["id"], "noop-audio")}


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_key_budget_holds_under_200_concurrent_requests(env: Env) -> None:
    account = await env.account(1000)
    created, headers = await env.key(account, maxBudget=37)
    other, other_headers = await env.key(account)  # same account, no budget

    answers = await asyncio.gather(
        *(env.image(headers, PREFIXES[i % 2]) for i in range(200)),
        *(env.image(other_headers) for _ in range(20)),
    )
    budgeted, free = answers[:200], answers[200:]
    assert sorted({a.status_code for a in budgeted}) == [200, 402]
    assert sum(a.status_code == 200 for a in budgeted) == 37
    assert all(a.json()["budget"] == "total" for a in budgeted if a.status_code == 402)
    assert all(a.status_code == 200 for a in free)
    assert await ledger.balance(env.services.db, account) == 1000 - 37 - 20
    assert await ledger.ledger_sum(env.services.db, account) == 1000 - 37 - 20
    key = await keys.get_key(env.services.db, created["id"])
    assert key.spent_total == 37
    summary = await env.client.get(
        "/v1/usage/summary", headers=env.admin, params={"groupBy": "key", "accountId": account}
    )
    rows = {row["keyId"]: row for row in summary.json()["data"]}
    assert rows[created["id"]]["credits"] == 37 and rows[created["id"]]["requests"] == 37
    assert rows[other["id"]]["credits"] == 20


@pytest.mark.parametrize(
    ("database_url", "prefix"),
    [("sqlite", "/v1"), ("sqlite", "/api/v1"), ("postgresql", "/v1")],
    indirect=["database_url"],
)
async def test_usage_summary_by_model_key_and_day(env: Env, prefix: str) -> None:
    account = await env.account(100)
    first, headers = await env.key(account)
    second, headers2 = await env.key(account)
    for _ in range(3):
        assert (await env.image(headers, prefix)).status_code == 200
    job = await env.client.post(
        f"{prefix}/audio/generate",
        headers=headers2,
        json={"model": "noop-audio", "input": {"text": "hi"}},
    )
    assert job.status_code == 202
    debit = next(
        e
        for e in await ledger.entries(env.services.db, account)
        if e.kind == "debit" and e.model == "noop-image"
    )
    await ledger.refund(env.services.db, debit.id)

    url = f"{prefix}/usage/summary"
    by_model = (await env.client.get(url, headers=headers, params={"groupBy": "model"})).json()
    assert by_model["accountId"] == account and by_model["groupBy"] == ["model"]
    assert by_model["data"] == [
        {"model": "noop-audio", "debited": 1, "refunded": 0, "requests": 1, "credits": 1},
        {"model": "noop-image", "debited": 3, "refunded": 1, "requests": 3, "credits": 2},
    ]
    assert by_model["total"] == {"credits": 3, "debited": 4, "refunded": 1, "requests": 4}

    by_key = (await env.client.get(url, headers=headers, params={"groupBy": "key"})).json()
    assert {row["keyId"]: row["credits"] for row in by_key["data"]} == {
        first["id"]: 2,
        second["id"]: 1,
    }
    today = datetime.now(UTC).date().isoformat()
    by_day = await env.client.get(
        url, headers=headers, params={"groupBy": "day,model", "from": today, "to": today}
    )
    assert by_day.status_code == 200, by_day.text
    assert [(r["day"], r["model"], r["credits"]) for r in by_day.json()["data"]] == [
        (today, "noop-audio", 1),
        (today, "noop-image", 2),
    ]
    assert by_day.json()["from"] == f"{today}T00:00:00Z"
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    empty = await env.client.get(url, headers=headers, params={"from": yesterday, "to": yesterday})
    assert empty.json()["data"] == [] and empty.json()["total"]["credits"] == 0

    for params in ({"groupBy": "colour"}, {"from": "soon"}, {"from": today, "to": yesterday}):
        bad = await env.client.get(url, headers=headers, params=params)
        assert bad.status_code == 400, (params, bad.text)
    other_account = await env.account(0)
    forbidden = await env.client.get(url, headers=headers, params={"accountId": other_account})
    assert forbidden.status_code == 403
    as_admin = await env.client.get(url, headers=env.admin, params={"accountId": account})
    assert as_admin.status_code == 200 and as_admin.json()["total"]["credits"] == 3
    missing = await env.client.get(url, headers=env.admin, params={"accountId": "acct_nope"})
    assert missing.status_code == 404


async def test_usage_lists_the_key_and_model_of_each_entry(env: Env) -> None:
    account = await env.account(10)
    created, headers = await env.key(account)
    assert (await env.image(headers)).status_code == 200
    usage = (await env.client.get("/v1/usage", headers=headers)).json()["data"]
    debit = next(e for e in usage if e["type"] == "debit")
    assert debit["keyId"] == created["id"] and debit["model"] == "noop-image"
    grant = next(e for e in usage if e["type"] == "grant")
    assert grant["keyId"] is None and grant["model"] is None
