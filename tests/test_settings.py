"""Settings come from HYPEREAL_* variables over an optional TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hypereal.settings import Settings


def test_toml_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hypereal.toml"
    config.write_text(
        'port = 9001\nrate_limit_per_hour = 50\n[backends.fal]\ntype = "fal"\napi_key = "k"\n'
    )
    monkeypatch.setenv("HYPEREAL_CONFIG", str(config))
    monkeypatch.setenv("HYPEREAL_RATE_LIMIT_PER_HOUR", "70")
    monkeypatch.setenv("HYPEREAL_ALLOWED_PRIVATE_NETWORKS", "127.0.0.0/8, 10.0.0.0/8")
    monkeypatch.setenv("HYPEREAL_DATA_DIR", str(tmp_path / "d"))
    settings = Settings()
    assert settings.port == 9001
    assert settings.rate_limit_per_hour == 70  # the environment wins
    assert settings.backends == {"fal": {"type": "fal", "api_key": "k"}}
    assert settings.allowed_private_networks == ["127.0.0.0/8", "10.0.0.0/8"]
    assert settings.resolved_database_url.endswith(str(tmp_path / "d" / "hypereal.db"))
    assert settings.base_url() == "http://127.0.0.1:9001"


def test_a_bad_allowed_private_network_fails_at_start_up_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYPEREAL_ALLOWED_PRIVATE_NETWORKS", "127.0.0.0/8, bogus")
    with pytest.raises(ValidationError) as error:
        Settings()
    assert "HYPEREAL_ALLOWED_PRIVATE_NETWORKS" in str(error.value)
    assert "'bogus' is not a network" in str(error.value)
    with pytest.raises(ValidationError, match=r"'10\.0\.0\.0/33' is not a network"):
        Settings(allowed_private_networks=["10.0.0.0/33"])
    monkeypatch.setenv("HYPEREAL_ALLOWED_PRIVATE_NETWORKS", "127.0.0.0/8,, ::1/128")
    assert Settings().allowed_private_networks == ["127.0.0.0/8", "::1/128"]


def test_fetch_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPEREAL_FETCH_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("HYPEREAL_FETCH_MAX_BYTES", "1000")
    settings = Settings()
    assert (settings.fetch_timeout_seconds, settings.fetch_max_bytes) == (2.5, 1000)
    with pytest.raises(ValidationError, match="fetch_timeout_seconds"):
        Settings(fetch_timeout_seconds=0)


def test_the_webhook_schedule_starts_at_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPEREAL_WEBHOOK_RETRY_SCHEDULE", "0, 1.5, 60")
    assert Settings().webhook_retry_schedule == [0.0, 1.5, 60.0]
    for bad in ("5,10", "0,-1", ""):
        monkeypatch.setenv("HYPEREAL_WEBHOOK_RETRY_SCHEDULE", bad)
        with pytest.raises(ValidationError, match="HYPEREAL_WEBHOOK_RETRY_SCHEDULE"):
            Settings()


def test_the_default_public_url_is_an_address_clients_can_use() -> None:
    assert Settings(host="127.0.0.1", port=8000).base_url() == "http://127.0.0.1:8000"
    assert Settings(host="0.0.0.0", port=9000).base_url() == "http://127.0.0.1:9000"
    assert Settings(host="::", port=9000).base_url() == "http://[::1]:9000"
    assert Settings(host="::1", port=9000).base_url() == "http://[::1]:9000"
    assert Settings(host="0.0.0.0", public_url="https://api.example/").base_url() == (
        "https://api.example"
    )
