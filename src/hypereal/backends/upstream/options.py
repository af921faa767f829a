"""The backend options every hosted-provider adapter reads, parsed one way.

Every check raises :class:`BackendUnavailable` naming the backend and the option, so a
malformed settings file shows as the model's ``unavailableReason``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypereal.backends.base import BackendUnavailable
from hypereal.media.fetch import IPNetwork, parse_networks


def option_str(options: Mapping[str, Any], name: str, backend: str) -> str | None:
    """A string option, stripped; ``None`` when unset or empty. Raises BackendUnavailable
    for another type."""
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BackendUnavailable(f"The {backend} backend option `{name}` must be a string.")
    return value.strip() or None


def option_number(
    options: Mapping[str, Any],
    name: str,
    default: float,
    backend: str,
    *,
    allow_zero: bool = False,
) -> float:
    """A positive number option (zero too with ``allow_zero``). Raises BackendUnavailable."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BackendUnavailable(f"The {backend} backend option `{name}` must be a number.")
    if value < 0 or (value == 0 and not allow_zero):
        raise BackendUnavailable(f"The {backend} backend option `{name}` must be positive.")
    return float(value)


def option_headers(options: Mapping[str, Any], backend: str) -> dict[str, str]:
    """The ``headers`` option: extra request headers, names and values strings."""
    headers = options.get("headers") or {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise BackendUnavailable(
            f"The {backend} backend option `headers` must map names to strings."
        )
    return dict(headers)


def allowed_networks_option(options: Mapping[str, Any], backend: str) -> tuple[IPNetwork, ...]:
    """The option ``allowed_private_networks``: a list (or comma-separated string) of CIDRs
    upstream connections and output files may reach besides public addresses."""
    value = options.get("allowed_private_networks") or []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise BackendUnavailable(
            f"The {backend} backend option `allowed_private_networks` must be a list of CIDRs."
        )
    try:
        return tuple(parse_networks(value))
    except ValueError as exc:
        raise BackendUnavailable(
            f"The {backend} backend option `allowed_private_networks`: {exc}"
        ) from exc


def input_map_option(options: Mapping[str, Any], backend: str) -> dict[str, str | None]:
    """The option ``input_map``: renames of the fields sent, ``{ours: theirs}`` (``None``
    drops a field)."""
    input_map = options.get("input_map") or {}
    if not isinstance(input_map, Mapping) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in input_map.items()
    ):
        raise BackendUnavailable(
            f"The {backend} backend option `input_map` must map field names to upstream "
            "field names (or to null to drop a field)."
        )
    return dict(input_map)


def apply_input_map(
    arguments: Mapping[str, Any], input_map: Mapping[str, str | None]
) -> dict[str, Any]:
    """Rename fields per the operator's ``input_map`` (a ``None`` target drops the field)."""
    mapped: dict[str, Any] = {}
    for key, value in arguments.items():
        target = input_map.get(key, key)
        if target is not None:
            mapped[target] = value
    return mapped


@dataclass(frozen=True)
class HttpOptions:
    """What :class:`~hypereal.backends.upstream.http.UpstreamHttp` needs: where the API is,
    how to authenticate, and the limits of one call, of retries and of downloads."""

    backend: str
    base_url: str
    api_key: str | None
    request_timeout: float
    download_timeout: float
    retries: int = 2
    retry_backoff: float = 0.5
    max_download_bytes: int = 64 << 20
    max_connections: int = 1000
    headers: Mapping[str, str] = field(default_factory=dict)
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(
        cls,
        options: Mapping[str, Any],
        *,
        backend: str,
        default_base_url: str | None,
        api_key_hint: str | None,
        timeout_option: str = "request_timeout",
        timeout: float,
        download_timeout: float | None = None,
        retries: int = 2,
        max_download_bytes: int = 64 << 20,
    ) -> HttpOptions:
        """Read the common options: ``base_url``, ``api_key`` (required when
        ``api_key_hint`` names where to find one), ``timeout_option`` (seconds one call may
        take, default ``timeout``), ``retries``, ``retry_backoff`` (0.5),
        ``max_download_bytes``, ``max_connections`` (1000), ``headers`` and
        ``allowed_private_networks``. ``download_timeout`` bounds one whole output download
        (default: the call timeout). Raises BackendUnavailable."""
        api_key = option_str(options, "api_key", backend)
        if api_key_hint is not None and not api_key:
            raise BackendUnavailable(
                f"The {backend} backend needs an API key: set `api_key` ({api_key_hint}) in "
                "its backend options."
            )
        base_url = option_str(options, "base_url", backend) or default_base_url
        if not base_url:
            raise BackendUnavailable(f"The {backend} backend needs `base_url`.")
        call_timeout = option_number(options, timeout_option, timeout, backend)
        return cls(
            backend=backend,
            base_url=base_url.rstrip("/"),
            api_key=api_key,
            request_timeout=call_timeout,
            download_timeout=download_timeout or call_timeout,
            retries=int(option_number(options, "retries", retries, backend, allow_zero=True)),
            retry_backoff=option_number(options, "retry_backoff", 0.5, backend, allow_zero=True),
            max_download_bytes=int(
                option_number(options, "max_download_bytes", max_download_bytes, backend)
            ),
            max_connections=int(option_number(options, "max_connections", 1000, backend)),
            headers=option_headers(options, backend),
            allowed_networks=allowed_networks_option(options, backend),
        )


@dataclass(frozen=True)
class JobOptions:
    """The options of the submit -> poll -> fetch driver: ``poll_interval`` (seconds between
    status polls) and ``timeout`` (seconds for the whole upstream job)."""

    poll_interval: float
    timeout: float

    @classmethod
    def parse(
        cls,
        options: Mapping[str, Any],
        *,
        backend: str,
        poll_interval: float,
        timeout: float = 1800.0,
    ) -> JobOptions:
        """Read ``poll_interval`` and ``timeout``. Raises BackendUnavailable."""
        return cls(
            poll_interval=option_number(options, "poll_interval", poll_interval, backend),
            timeout=option_number(options, "timeout", timeout, backend),
        )


@dataclass(frozen=True)
class QueueOptions:
    """The options of a queue-style media provider (fal.ai, Replicate): the HTTP client's
    (one call 60 s, 4 retries, outputs up to 512 MiB downloaded within the job ``timeout``),
    the job driver's (``poll_interval`` 1 s, ``timeout`` 1800 s) and ``input_map``."""

    http: HttpOptions
    jobs: JobOptions
    input_map: Mapping[str, str | None]

    @classmethod
    def parse(
        cls,
        options: Mapping[str, Any],
        *,
        backend: str,
        default_base_url: str,
        api_key_hint: str,
    ) -> QueueOptions:
        """Read them all. Raises BackendUnavailable."""
        jobs = JobOptions.parse(options, backend=backend, poll_interval=1.0)
        http = HttpOptions.parse(
            options,
            backend=backend,
            default_base_url=default_base_url,
            api_key_hint=api_key_hint,
            timeout=60.0,
            download_timeout=jobs.timeout,
            retries=4,
            max_download_bytes=512 << 20,
        )
        return cls(http=http, jobs=jobs, input_map=input_map_option(options, backend))
