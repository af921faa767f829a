"""Plumbing shared by the hosted-provider adapters (``fal``, ``replicate``).

Both adapters submit a job over HTTP, poll it, download the output files and must turn every
upstream failure into a :class:`BackendError`. The pieces they share live here so each adapter
module only describes its provider's protocol: option parsing, one retrying ``httpx`` client,
error mapping, output download with content sniffing, data URIs for inputs, progress from
tqdm-style logs, and the "cancel upstream when our task is cancelled" guard.

Output files are downloaded through :mod:`hypereal.media.fetch`'s guard, not the API client:
an output URL comes from the provider's answer, so a misbehaving or compromised provider could
otherwise point us at the metadata service or an internal host. The configured ``base_url``
origin is trusted as the operator named it (a provider on a private network works); any other
host must resolve to public addresses, or to networks the backend option
``allowed_private_networks`` lists (CIDRs, as ``HYPEREAL_ALLOWED_PRIVATE_NETWORKS``). Redirects
are followed a few times, each hop vetted again; ``max_download_bytes`` caps the size (the
declared length up front, then the bytes received) and ``timeout`` the whole download.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
from httpx_retries import Retry, RetryTransport

from hypereal.backends.base import BackendError, BackendUnavailable, MediaBlob, ProgressCallback
from hypereal.media.fetch import (
    FetchRefused,
    GuardedTransport,
    IPNetwork,
    fetch_url,
    parse_networks,
    url_origin,
)
from hypereal.media.sniff import sniff_content_type

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Failures caused by the request itself (bad prompt, image too large, schema violation). Other
# 4xx codes (401/403 credentials, 402 provider billing, 404 unknown model id, 429 rate limit) are
# the operator's problem, not the caller's, so they are reported as server-side failures.
_CLIENT_ERROR_CODES = frozenset({400, 409, 413, 415, 422})
_CREDENTIAL_CODES = frozenset({401, 403})

# Retried by the transport: rate limiting and gateway hiccups. Only idempotent methods (GET, PUT,
# ...) get the full policy; a POST that creates a job is retried only when it provably did not
# reach the provider (connection refused, 429), so a retry can never start a job twice.
_TRANSIENT_CODES = (429, 502, 503, 504)
# Longest single wait between retries, even when a Retry-After header asks for more: the job's
# own overall timeout is the real bound, and a poll loop should not stall for minutes.
_MAX_RETRY_WAIT = 30.0
_POST_SAFE_EXCEPTIONS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)

_TQDM_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)%\s*\|")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class UpstreamOptions:
    """The options every hosted-provider backend reads from its ``backends.<name>`` table."""

    api_key: str
    base_url: str
    poll_interval: float
    timeout: float
    request_timeout: float
    retries: int
    retry_backoff: float
    max_download_bytes: int
    input_map: Mapping[str, str | None]
    # Non-public networks output files may come from (the base_url origin always may).
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(
        cls, options: Mapping[str, Any], *, provider: str, default_base_url: str, key_hint: str
    ) -> UpstreamOptions:
        """Read and check the common options; raises :class:`BackendUnavailable` when the API
        key is missing or an option has the wrong type."""
        api_key = options.get("api_key")
        if not isinstance(api_key, str) or not api_key.strip():
            raise BackendUnavailable(
                f"The {provider} backend needs an API key: set `api_key` ({key_hint}) in its "
                "backend options."
            )
        input_map = options.get("input_map") or {}
        if not isinstance(input_map, Mapping) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in input_map.items()
        ):
            raise BackendUnavailable(
                f"The {provider} backend option `input_map` must map field names to upstream "
                "field names (or to null to drop a field)."
            )
        return cls(
            allowed_networks=allowed_networks_option(options, provider),
            api_key=api_key.strip(),
            base_url=str(options.get("base_url") or default_base_url).rstrip("/"),
            poll_interval=_positive(options, "poll_interval", 1.0, provider),
            timeout=_positive(options, "timeout", 1800.0, provider),
            request_timeout=_positive(options, "request_timeout", 60.0, provider),
            retries=int(_positive(options, "retries", 4, provider, allow_zero=True)),
            retry_backoff=_positive(options, "retry_backoff", 0.5, provider, allow_zero=True),
            max_download_bytes=int(_positive(options, "max_download_bytes", 512 << 20, provider)),
            input_map=dict(input_map),
        )


def allowed_networks_option(options: Mapping[str, Any], provider: str) -> tuple[IPNetwork, ...]:
    """The backend option ``allowed_private_networks``: a list (or comma-separated string) of
    CIDRs output files may come from. Raises BackendUnavailable when malformed."""
    value = options.get("allowed_private_networks") or []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise BackendUnavailable(
            f"The {provider} backend option `allowed_private_networks` must be a list of CIDRs."
        )
    try:
        return tuple(parse_networks(value))
    except ValueError as exc:
        raise BackendUnavailable(
            f"The {provider} backend option `allowed_private_networks`: {exc}"
        ) from exc


def _positive(
    options: Mapping[str, Any],
    name: str,
    default: float,
    provider: str,
    *,
    allow_zero: bool = False,
) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BackendUnavailable(f"The {provider} backend option `{name}` must be a number.")
    if value < 0 or (value == 0 and not allow_zero):
        raise BackendUnavailable(f"The {provider} backend option `{name}` must be positive.")
    return float(value)


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


# ------------------------------------------------------------------------------ HTTP


class UpstreamClient:
    """One provider's HTTP client: retries transient failures through ``httpx-retries``, sends
    the credentials only to the provider's own origin and maps failures to BackendError."""

    def __init__(self, provider: str, options: UpstreamOptions, auth_header: str) -> None:
        self.provider = provider
        self.options = options
        self._auth = {"Authorization": auth_header}
        self._post_retry = Retry(
            total=options.retries,
            allowed_methods=["POST"],
            status_forcelist=[429],
            retry_on_exceptions=_POST_SAFE_EXCEPTIONS,
            backoff_factor=options.retry_backoff,
            max_backoff_wait=_MAX_RETRY_WAIT,
        )
        transport = RetryTransport(
            transport=httpx.AsyncHTTPTransport(),
            retry=Retry(
                total=options.retries,
                status_forcelist=_TRANSIENT_CODES,
                backoff_factor=options.retry_backoff,
                max_backoff_wait=_MAX_RETRY_WAIT,
            ),
        )
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(options.request_timeout),
            follow_redirects=True,
        )
        self._downloads = output_download_client(
            options.base_url,
            options.allowed_networks,
            retries=options.retries,
            retry_backoff=options.retry_backoff,
            request_timeout=options.request_timeout,
        )

    def api_url(self, candidate: object, fallback: str) -> str:
        """``candidate`` (a URL the provider returned) when it is on the provider's own origin,
        else ``fallback``: the API key must never be sent to a host the operator did not name."""
        if isinstance(candidate, str) and _origin(candidate) == _origin(self.options.base_url):
            return candidate
        return fallback

    async def call(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        http_timeout: float | None = None,
    ) -> httpx.Response:
        """Send an authenticated API request; return the 2xx response or raise BackendError."""
        extensions = {"retry": self._post_retry} if method.upper() == "POST" else None
        try:
            response = await self._http.request(
                method,
                url,
                json=json,
                params=params,
                headers={**self._auth, **(headers or {})},
                timeout=http_timeout if http_timeout is not None else httpx.USE_CLIENT_DEFAULT,
                extensions=extensions,
            )
        except httpx.TimeoutException as exc:
            raise BackendError(f"{self.provider} did not answer in time ({method} {url})") from exc
        except httpx.TransportError as exc:
            raise BackendError(f"Could not reach {self.provider} at {url}: {exc}") from exc
        if response.is_success:
            return response
        raise self.error_from_response(response)

    async def call_json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`call` and decode a JSON object body."""
        response = await self.call(method, url, **kwargs)
        try:
            body = response.json()
        except ValueError as exc:
            raise BackendError(f"{self.provider} answered {url} with invalid JSON") from exc
        if not isinstance(body, dict):
            raise BackendError(f"{self.provider} answered {url} with unexpected JSON")
        return body

    def error_from_response(self, response: httpx.Response) -> BackendError:
        """The BackendError for a non-2xx upstream response, carrying the upstream's message."""
        status = response.status_code
        message = upstream_message(response)
        if status in _CREDENTIAL_CODES:
            return BackendError(
                f"{self.provider} rejected the configured API key (HTTP {status}): {message}"
            )
        if status in _CLIENT_ERROR_CODES:
            return BackendError(message, client_error=True)
        if status == 429:
            return BackendError(f"{self.provider} is rate limiting requests (HTTP 429): {message}")
        if status >= 500:
            return BackendError(f"{self.provider} failed with HTTP {status}: {message}")
        return BackendError(f"{self.provider} refused the request (HTTP {status}): {message}")

    async def download(self, url: str, declared_type: str | None = None) -> MediaBlob:
        """Fetch one output file (``http(s)`` or ``data:`` URL) without credentials; the MIME
        type is sniffed from the bytes, falling back to a specific declared type."""
        if url.startswith("data:"):
            data, header_type = decode_data_uri(url)
            if len(data) > self.options.max_download_bytes:
                raise BackendError(
                    f"The {self.provider} output is larger than "
                    f"{self.options.max_download_bytes} bytes"
                )
        else:
            data, header_type = await self._fetch_file(url)
        content_type = sniff_media_type(data) or _specific(declared_type) or _specific(header_type)
        if content_type is None:
            raise BackendError(f"{self.provider} returned an output file of unknown type ({url})")
        return MediaBlob(data=data, content_type=content_type)

    async def _fetch_file(self, url: str) -> tuple[bytes, str | None]:
        return await download_output(
            self._downloads,
            self.provider,
            url,
            max_bytes=self.options.max_download_bytes,
            timeout=self.options.timeout,
        )

    async def aclose(self) -> None:
        """Close the connection pools."""
        await self._http.aclose()
        await self._downloads.aclose()


def output_download_client(
    base_url: str,
    allowed_networks: Sequence[IPNetwork],
    *,
    retries: int,
    retry_backoff: float,
    request_timeout: float,
) -> httpx.AsyncClient:
    """The client output files are downloaded with (see the module doc): no credentials, no
    implicit redirects, every connection vetted by :class:`GuardedTransport` (``base_url``'s
    origin trusted), transient failures retried like the provider's own GETs."""
    guarded = GuardedTransport(allowed_networks, [url_origin(base_url)])
    retry = Retry(
        total=retries,
        status_forcelist=_TRANSIENT_CODES,
        backoff_factor=retry_backoff,
        max_backoff_wait=_MAX_RETRY_WAIT,
    )
    return httpx.AsyncClient(
        transport=RetryTransport(transport=guarded, retry=retry),
        timeout=httpx.Timeout(request_timeout),
        follow_redirects=False,
    )


async def download_output(
    client: httpx.AsyncClient, provider: str, url: str, *, max_bytes: int, timeout: float
) -> tuple[bytes, str | None]:
    """Bytes and declared Content-Type of one ``http(s)`` output file, through ``client``
    (:func:`output_download_client`). Raises BackendError with the reason it was refused."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise BackendError(f"{provider} returned an output URL we cannot fetch: {url}")
    try:
        fetched = await fetch_url(client, url, field=url, max_bytes=max_bytes, timeout=timeout)
    except FetchRefused as exc:
        raise BackendError(f"Downloading the {provider} output failed: {exc.message}") from exc
    return fetched.data, fetched.declared_type


class Answer(Protocol):
    """What :func:`upstream_message` reads of an answer (an ``httpx.Response`` has it)."""

    @property
    def text(self) -> str: ...

    @property
    def reason_phrase(self) -> str: ...

    def json(self) -> Any: ...


def upstream_message(response: Answer) -> str:
    """The human-readable error text of a provider's error body: fal's ``detail`` (a string or
    a list of ``{loc, msg}``), RFC 7807 ``detail``/``title`` (Replicate), or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "error", "message", "title"):
            text = _text_of(body.get(key))
            if text:
                return text
    return response.text.strip()[:500] or response.reason_phrase


def _text_of(value: object) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        parts = [_text_of(item) for item in value]
        return "; ".join(part for part in parts if part) or None
    if isinstance(value, dict):
        msg = value.get("msg") or value.get("message")
        if isinstance(msg, str):
            loc = value.get("loc")
            if isinstance(loc, list) and loc:
                # fal's loc starts with "body"; the field name is what a caller can act on.
                path = ".".join(str(part) for part in loc if part != "body")
                if path:
                    return f"{path}: {msg}"
            return msg
    return None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _specific(content_type: str | None) -> str | None:
    if not content_type:
        return None
    value = content_type.split(";", 1)[0].strip().lower()
    if not value or value in ("application/octet-stream", "binary/octet-stream"):
        return None
    return value


# ----------------------------------------------------------------------------- media


def to_data_uri(blob: MediaBlob) -> str:
    """``data:<type>;base64,...`` for an input file; both providers accept data URIs, which
    spares us a public upload location for fetched inputs."""
    return f"data:{blob.content_type};base64,{base64.b64encode(blob.data).decode('ascii')}"


def decode_data_uri(uri: str) -> tuple[bytes, str | None]:
    """Bytes and declared MIME type of a ``data:`` URI; raises BackendError if malformed."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise BackendError("Upstream returned a malformed data URI")
    meta = header[len("data:") :].split(";")
    try:
        if "base64" in meta[1:]:
            data = base64.b64decode(payload, validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise BackendError("Upstream returned a malformed data URI") from exc
    return data, meta[0] or None


def sniff_media_type(data: bytes) -> str | None:
    """The media type named by the file's magic number, or ``None`` when unrecognised
    (JSON is not media: an upstream error body must not pass for a result)."""
    content_type = sniff_content_type(data)
    return None if content_type == "application/json" else content_type


# -------------------------------------------------------------------------- progress


class ProgressReporter:
    """Turns provider states into monotonic ``progress`` calls, skipping repeats so a poll loop
    does not write the same progress row every second."""

    def __init__(self, progress: ProgressCallback) -> None:
        self._progress = progress
        self._last: tuple[float, str] | None = None
        self._fraction = 0.0

    async def queued(self, position: int | None) -> None:
        """The job waits upstream (``position`` ahead of it when known)."""
        where = f" (position {position})" if position is not None else ""
        await self._report(0.0, f"Queued upstream{where}")

    async def running(self, logs: str | None) -> None:
        """The job runs; a tqdm-style percentage in ``logs`` refines the fraction."""
        percent = percent_from_logs(logs or "")
        if percent is None:
            await self._report(0.05, "Generating")
        else:
            await self._report(0.05 + 0.9 * percent, f"Generating ({round(percent * 100)}%)")

    async def fetching(self) -> None:
        """The upstream finished; the output is being downloaded."""
        await self._report(0.95, "Fetching output")

    async def done(self) -> None:
        """The output is in hand."""
        await self._report(1.0, "Completed")

    async def _report(self, fraction: float, message: str) -> None:
        # Never go backwards: a model with two stages starts a second progress bar at 0%.
        self._fraction = max(self._fraction, min(fraction, 1.0))
        current = (self._fraction, message)
        if current != self._last:
            self._last = current
            await self._progress(*current)


def percent_from_logs(logs: str) -> float | None:
    """The last tqdm percentage (``" 45%|████ | 9/20"``) in ``logs`` as 0..1, if any."""
    matches = _TQDM_PERCENT.findall(logs)
    if not matches:
        return None
    return min(float(matches[-1]) / 100.0, 1.0)


# ---------------------------------------------------------------------- cancellation


async def create_then_guard(
    create: Awaitable[T], cancel: Callable[[T], Awaitable[None]], *, grace: float
) -> T:
    """Await ``create`` (submitting a job upstream); if our task is cancelled meanwhile, let the
    submission finish (up to ``grace`` seconds) and cancel the job it created before re-raising,
    so a user's cancel never leaves a billed job running at the provider."""
    pending = asyncio.ensure_future(create)
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        try:
            created = await asyncio.wait_for(pending, grace)
        except Exception:  # the submission failed or is too slow: nothing we can cancel
            logger.warning(
                "Cancelled while submitting, and the submission did not complete within %g s; "
                "if it was accepted, the upstream job keeps running",
                grace,
            )
        else:
            await cancel(created)
        raise


async def cancel_quietly(provider: str, cancel: Awaitable[object]) -> None:
    """Run an upstream cancel call and log, rather than raise, its failure: the caller is
    already unwinding a cancellation or a failure that must not be masked."""
    try:
        await cancel
    except Exception as exc:
        logger.warning("Could not cancel the %s job: %s", provider, exc)
