"""``hypereal keys create`` / ``keys update`` with per-key controls, and the audit entries the
operator's commands leave (real subprocesses on a temp data dir)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypereal.domain import audit, keys
from hypereal.services import build_services
from hypereal.settings import Settings
from tests.test_cli import hypereal


def _read(data_dir: Path, key_id: str) -> tuple[keys.KeyInfo, list[audit.Record]]:
    async def main() -> tuple[keys.KeyInfo, list[audit.Record]]:
        services = build_services(Settings(data_dir=data_dir, bootstrap_admin=False))
        try:
            return await keys.get_key(services.db, key_id), await audit.entries(services.db)
        finally:
            await services.close()

    return asyncio.run(main())


def test_keys_create_and_update_set_the_controls_and_are_audited(tmp_path: Path) -> None:
    created = hypereal(
        tmp_path,
        "keys",
        "create",
        "--credits",
        "10",
        "--models",
        "chat-*, audio-tts",
        "--expires",
        "2030-01-02T03:04:05",
        "--daily-budget",
        "4",
        "--max-budget",
        "40",
    )
    assert created.returncode == 0, created.stdout + created.stderr
    key_id = created.stdout.split("key id: ")[1].split()[0]
    info, log = _read(tmp_path, key_id)
    assert info.models == ("chat-*", "audio-tts")
    assert info.expires_at is not None and info.expires_at.isoformat() == (
        "2030-01-02T03:04:05+00:00"
    )
    assert (info.budget_daily, info.budget_monthly, info.budget_total) == (4, None, 40)
    assert [e.action for e in log] == ["key.created", "credits.granted", "account.created"]
    assert log[0].details["maxBudget"] == 40 and log[0].details["models"] == ["chat-*", "audio-tts"]
    assert log[0].actor_key_id is None and log[0].details["actor"] == "cli"

    listing = hypereal(tmp_path, "keys", "list").stdout
    assert "chat-*,audio-tts" in listing and "2030-01-02 03:04" in listing
    assert "0/4, -, 0/40" in listing and "active" in listing

    updated = hypereal(
        tmp_path, "keys", "update", key_id, "--models", "none", "--monthly-budget", "12"
    )
    assert updated.returncode == 0, updated.stdout + updated.stderr
    info, log = _read(tmp_path, key_id)
    assert info.models is None and info.budget_monthly == 12 and info.budget_daily == 4
    assert log[0].action == "key.updated"
    assert log[0].details == {"models": None, "monthlyBudget": 12, "actor": "cli"}

    assert hypereal(tmp_path, "keys", "revoke", key_id).returncode == 0
    account = created.stdout.split("account: ")[1].split()[0]
    assert hypereal(tmp_path, "credits", "grant", account, "5").returncode == 0
    rotated = hypereal(tmp_path, "webhooks", "secret", "--account", account, "--rotate")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    _, log = _read(tmp_path, key_id)
    assert [e.action for e in log[:3]] == [
        "webhook_secret.rotated",
        "credits.granted",
        "key.revoked",
    ]

    for args, message in (
        (["--daily-budget", "-1"], "--daily-budget must be between"),
        (["--expires", "soon"], "--expires must be an ISO-8601"),
        (["--max-budget", "lots"], "--max-budget must be a whole number"),
        ([], "nothing to change"),
    ):
        refused = hypereal(tmp_path, "keys", "update", key_id, *args)
        assert refused.returncode == 1 and message in refused.stdout, refused.stdout
