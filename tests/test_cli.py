"""The ``hypereal`` CLI as a user runs it (real subprocesses on a temp data dir)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path


def hypereal(
    data_dir: Path, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYPEREAL_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    if config is not None:
        env["HYPEREAL_CONFIG"] = str(config)
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


PATTERNS_TOML = """
[backends.openrouter]
type = "openai"
base_url = "http://127.0.0.1:9/v1"

[backends.hosted]
type = "hypereal"
api_key = "hk-test"

[[model_patterns]]
pattern = "claude-*"
backend = "openrouter"
price = { base_credits = 3, input_usd_per_million = 1.0, output_usd_per_million = 1.0 }

[[model_patterns]]
pattern = "*"
backend = "hosted"
pass_through = { max_credits = 500, markup = 1.5 }
"""


def test_models_list_shows_the_patterns_as_such(tmp_path: Path) -> None:
    config = tmp_path / "hypereal.toml"
    config.write_text(PATTERNS_TOML)
    result = hypereal(tmp_path, "models", "list", config=config)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if "(pattern)" in line}
    assert set(rows) == {"claude-*", "*"}
    assert "chat" in rows["claude-*"] and "3 + tokens" in rows["claude-*"]
    assert "yes (openrouter)" in rows["claude-*"]
    assert "upstream's x 1.5 (max 500)" in rows["*"] and "yes (hosted)" in rows["*"]


def test_keys_list_shows_whole_key_ids(tmp_path: Path) -> None:
    created = hypereal(tmp_path, "keys", "create", "--name", "bob")
    key_id = created.stdout.split("key id: ")[1].split()[0]
    assert key_id in hypereal(tmp_path, "keys", "list").stdout


def test_a_bad_setting_is_one_clear_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("port = [")
    cases = [
        ({"HYPEREAL_PORT": "abc"}, ["serve"], "invalid setting HYPEREAL_PORT"),
        ({"HYPEREAL_PORT": "abc"}, ["keys", "list"], "invalid setting HYPEREAL_PORT"),
        ({"HYPEREAL_CONFIG": str(bad_toml)}, ["migrate"], "could not load the settings"),
        ({"HYPEREAL_CONFIG": str(tmp_path / "none.toml")}, ["migrate"], "names no readable"),
    ]
    for extra, args, message in cases:
        env = {**os.environ, "HYPEREAL_DATA_DIR": str(tmp_path), **extra}
        result = subprocess.run(
            [sys.executable, "-m", "hypereal.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert len(result.stderr.strip().splitlines()) == 1


BAD_BACKENDS = [
    ('[backends.fal]\ntype = "fall"\napi_key = "k"\n', "backend 'fal': option 'type'", "'fall'"),
    (
        '[backends.fal]\ntype = "fal"\napi_key = "k"\ntimout = 5\n',
        "backend 'fal': option 'timout'",
        "did you mean 'timeout'",
    ),
    ('[backends.rep]\ntype = "replicate"\n', "backend 'rep': option 'api_key'", "not set"),
]


def test_a_bad_backend_setting_stops_serve_worker_and_models_list(tmp_path: Path) -> None:
    for number, (toml, names, problem) in enumerate(BAD_BACKENDS):
        config = tmp_path / f"backends{number}.toml"
        config.write_text(toml)
        for args in (["serve", "--port", "1"], ["worker"], ["models", "list"]):
            env = {
                **os.environ,
                "HYPEREAL_DATA_DIR": str(tmp_path),
                "HYPEREAL_CONFIG": str(config),
                # The worker checks its settings before it connects to this (closed) port.
                "HYPEREAL_BROKER_URL": "redis://127.0.0.1:1/0",
            }
            result = subprocess.run(
                [sys.executable, "-m", "hypereal.cli", *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )
            assert result.returncode == 2, (args, toml, result.stdout, result.stderr)
            [line] = result.stderr.strip().splitlines()
            assert names in line and problem in line, (args, line)
            assert "Traceback" not in result.stdout + result.stderr
            assert "serving on" not in result.stdout


def test_first_start_prints_the_admin_key_once(tmp_path: Path) -> None:
    import socket
    import time

    import httpx

    def start_and_stop() -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "HYPEREAL_DATA_DIR": str(tmp_path)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "hypereal.cli", "serve", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/openapi.json").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
        finally:
            proc.terminate()
            output, _ = proc.communicate(timeout=60)
        return output

    first = start_and_stop()
    secrets = [word for word in first.split() if word.startswith("ck_")]
    assert len(secrets) == 1, first
    listing = hypereal(tmp_path, "keys", "list")
    assert "admin" in listing.stdout and secrets[0] not in listing.stdout
    second = start_and_stop()
    assert "ck_" not in second and "Uvicorn running" in second


def test_serve_and_worker_tune_the_garbage_collector_for_a_long_run() -> None:
    from hypereal.cli import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what exists at start is out of every collection
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
