"""The audit log: every admin action with who, what and when; paginated; admins only."""

from __future__ import annotations

import httpx

from hypereal.domain import keys
from hypereal.services import Services
from tests.conftest import MakeKey, auth


async def test_admin_actions_are_recorded_with_who_what_and_when(
    client: httpx.AsyncClient, services: Services, make_key: MakeKey
) -> None:
    admin_secret = await make_key(admin=True)
    admin = auth(admin_secret)
    me = (await client.get("/v1/credits", headers=admin)).json()["accountId"]
    admin_key_id = (await keys.list_keys(services.db, me))[0].id

    account = (
        await client.post("/v1/admin/accounts", headers=admin, json={"name": "acme"})
    ).json()["accountId"]
    created = (
        await client.post(
            "/api/v1/admin/keys",
            headers=admin,
            json={"accountId": account, "name": "ci", "models": ["noop-*"], "maxBudget": 9},
        )
    ).json()
    await client.patch(f"/v1/admin/keys/{created['id']}", headers=admin, json={"dailyBudget": 3})
    await client.post(f"/v1/admin/accounts/{account}/credits", headers=admin, json={"amount": 5})
    await client.post(f"/v1/admin/keys/{created['id']}/revoke", headers=admin)
    await client.post(f"/v1/admin/keys/{created['id']}/revoke", headers=admin)  # no-op
    user = auth(await make_key())
    assert (await client.post("/v1/webhooks/secret/rotate", headers=user)).status_code == 200

    log = await client.get("/v1/admin/audit", headers=admin)
    assert log.status_code == 200
    data = log.json()["data"]
    assert [e["action"] for e in data] == [
        "webhook_secret.rotated",
        "key.revoked",
        "credits.granted",
        "key.updated",
        "key.created",
        "account.created",
    ]
    rotated, revoked, granted, updated, key_created, account_created = data
    for entry in (revoked, granted, updated, key_created, account_created):
        assert entry["actorKeyId"] == admin_key_id and entry["actorAccountId"] == me
        assert entry["accountId"] == account and entry["at"].endswith("Z")
    assert account_created["targetType"] == "account" and account_created["targetId"] == account
    assert account_created["details"]["name"] == "acme"
    assert key_created["targetId"] == created["id"]
    assert key_created["details"]["models"] == ["noop-*"]
    assert key_created["details"]["maxBudget"] == 9
    assert updated["details"] == {"dailyBudget": 3}
    assert granted["details"]["amount"] == 5
    assert rotated["actorKeyId"] != admin_key_id and rotated["targetType"] == "account"
    assert log.json()["hasMore"] is False and log.json()["nextCursor"] is None

    # Pages, newest first, and filters.
    first = (await client.get("/api/v1/admin/audit?limit=4", headers=admin)).json()
    assert len(first["data"]) == 4 and first["hasMore"] is True
    rest = (
        await client.get(f"/v1/admin/audit?limit=4&before={first['nextCursor']}", headers=admin)
    ).json()
    assert [e["id"] for e in first["data"] + rest["data"]] == [e["id"] for e in data]
    only = (await client.get("/v1/admin/audit?action=key.updated", headers=admin)).json()
    assert [e["id"] for e in only["data"]] == [updated["id"]]
    mine = (await client.get(f"/v1/admin/audit?accountId={account}", headers=admin)).json()
    assert len(mine["data"]) == 5

    assert (await client.get("/v1/admin/audit", headers=user)).status_code == 403
    assert (await client.get("/v1/admin/audit?limit=0", headers=admin)).status_code == 400
