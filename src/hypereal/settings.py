"""Server settings: environment variables (``HYPEREAL_*``) over an optional TOML file.

The TOML file is named by ``HYPEREAL_CONFIG``; environment variables win over it.
"""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYPEREAL_", extra="ignore")

    data_dir: Path = Path("data")
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # Server processes of `hypereal serve` on one port (one per core serves the most).
    processes: int = Field(default=1, ge=1)
    # Logs (JSON lines, plain text on a terminal): the level, and the one access line per
    # request (``hypereal.access``, at INFO).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True
    public_url: str | None = None

    # Rate limits: per key, moving window of one hour.
    rate_limit_per_hour: int = 1000
    redis_url: str | None = None
    rate_limit_storage_url: str | None = None

    # Async jobs: taskiq broker (in-process by default, Redis Streams when set).
    broker_url: str | None = None
    broker_queue: str = "hypereal:jobs"
    # A running job's lease; its worker renews it, and a job whose lease ran out (the
    # worker died) is re-queued, up to job_max_attempts runs, then failed and refunded.
    job_lease_seconds: float = 60.0
    job_max_attempts: int = 3
    # How often a consuming process looks for expired leases, lost jobs and due webhooks.
    engine_poll_seconds: float = 1.0
    # Jobs one `hypereal worker` process (or `serve`, in-process) runs at once.
    worker_concurrency: int = 8

    # Webhooks: seconds before each attempt, and the per-attempt timeout. The first attempt is
    # sent as the job ends, so the first entry is 0; entry n is the wait after attempt n fails.
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    webhook_timeout_seconds: float = 15.0
    # Webhook deliveries one process sends at once (more wait their turn).
    webhook_max_concurrency: int = Field(default=64, ge=1)

    # Bench/test configuration only: adds the `noop` backend and the `noop-*` models.
    enable_test_backends: bool = False

    # Media storage.
    storage: Literal["local", "s3"] = "local"
    media_dir: Path | None = None
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_public_url: str | None = None
    # HMAC key of the expiring signed URLs of uploaded inputs (media/signing.py); unset, a
    # random one kept in {data_dir}/media-signing.key. Processes sharing media share it.
    media_signing_secret: str | None = None

    # Model catalogue override (TOML, merged by slug) and backend instances.
    catalogue_file: Path | None = None
    backends: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Wildcard model routing: `[[model_patterns]]` entries (pattern, backend, upstream_model,
    # modality or template, price or pass_through); see README "Model patterns".
    model_patterns: list[dict[str, Any]] = Field(default_factory=list)

    # Outbound fetches (image URLs, webhooks): CIDRs allowed despite being non-global.
    allowed_private_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Input media (image/audio URLs and data: URIs): seconds per URL fetch, largest file.
    fetch_timeout_seconds: float = Field(default=30.0, gt=0)
    fetch_max_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    # Largest input image (width x height, read from its header at submission): a larger
    # one, a decompression bomb included, is a 400 before anything is charged.
    max_input_pixels: int = Field(default=40_000_000, gt=0)
    # Largest request body (413 past it); room for a data: URI image at fetch_max_bytes
    # (base64 is 4/3 of the bytes) plus the rest of the JSON.
    max_request_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    # `hypereal serve`: seconds a client has to send a whole request, headers and body, from
    # the connection opening (or the next request's first byte); a slower one is dropped.
    request_read_timeout_seconds: float = Field(default=120.0, gt=0)
    # FastAPI's native OpenTelemetry (traces and metrics of each request, for a provider
    # configured in this process). Off: it asks the OpenTelemetry globals on every request,
    # a few percent of the CPU of a cheap one; the server's own metrics are in /metrics.
    opentelemetry: bool = False

    # Chat streams: seconds of backend silence before a keep-alive comment is sent.
    chat_keepalive_seconds: float = 15.0

    # First start: create an admin account and print its key once.
    bootstrap_admin: bool = True
    admin_initial_credits: int = 0

    @field_validator(
        "allowed_private_networks", "cors_origins", "webhook_retry_schedule", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_private_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for cidr in (entry for entry in value if entry.strip()):
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"HYPEREAL_ALLOWED_PRIVATE_NETWORKS (allowed_private_networks): {cidr!r} is "
                    "not a network; use comma-separated CIDRs such as 127.0.0.0/8,10.0.0.0/8"
                ) from None
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _valid_schedule(cls, value: list[float]) -> list[float]:
        if not value or value[0] != 0 or any(not 0 <= delay < 10**7 for delay in value):
            raise ValueError(
                "HYPEREAL_WEBHOOK_RETRY_SCHEDULE: comma-separated seconds starting with 0 (the "
                "first attempt is sent as the job ends), each then the wait before the next "
                "retry, e.g. 0,5,300,1800"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("HYPEREAL_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'hypereal.db').resolve()}"

    @cached_property
    def resolved_media_dir(self) -> Path:
        return (self.media_dir or self.data_dir / "media").resolve()

    @cached_property
    def resolved_rate_limit_storage(self) -> str:
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        if self.redis_url:
            return "async+" + self.redis_url
        return "async+memory://"

    def base_url(self) -> str:
        """The public base URL that absolute URLs (media, poll URLs) are built from."""
        if self.public_url:
            return self.public_url.rstrip("/")
        # A wildcard bind address is no address to link to; this machine's loopback is (set
        # HYPEREAL_PUBLIC_URL for clients elsewhere: `hypereal serve` says so).
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
