"""Settings come from HYPEREAL_* variables over an optional TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

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
