"""The ``hypereal`` CLI as a user runs it (real subprocesses on a temp data dir)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def hypereal(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYPEREAL_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "hypereal.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_keys_credits_and_models_commands(tmp_path: Path) -> None:
    assert hypereal(tmp_path, "migrate").returncode == 0
    created = hypereal(tmp_path, "keys", "create", "--credits", "50", "--name", "alice")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("ck_") and " " not in key
    account = created.stdout.split("account: ")[1].split()[0]
    assert hypereal(tmp_path, "credits", "balance", account).stdout.strip() == "50"
    granted = hypereal(tmp_path, "credits", "grant", account, "25")
    assert "balance 75" in granted.stdout
    listing = hypereal(tmp_path, "keys", "list")
    assert "alice" in listing.stdout and key not in listing.stdout
    key_id = created.stdout.split("key id: ")[1].split()[0]
    assert hypereal(tmp_path, "keys", "revoke", key_id).returncode == 0
    assert "revoked" in hypereal(tmp_path, "keys", "list").stdout
    models = hypereal(tmp_path, "models", "list")
    assert "sora-2-i2v" in models.stdout and "nano-banana-t2i" in models.stdout
    missing = hypereal(tmp_path, "credits", "balance", "acct_missing")
    assert missing.returncode == 1 and "Account not found" in missing.stdout
