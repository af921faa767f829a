"""One upstream's HTTP client: a long-lived pooled aiohttp session behind the SSRF guard.

Why aiohttp: it costs several times less CPU per request than httpx, and the gap grows with
concurrency (``bench/http_clients.py``), so every hosted-provider backend keeps exactly one
:class:`UpstreamHttp` for its life.

The rules, the same for every provider:

- **Guard.** Every connection, redirects included, goes through
  :mod:`hypereal.media.guarded_session`: the ``base_url`` origin (and any other URL the
  operator named, ``trusted_urls``) is trusted as configured (a provider on a private network
  works); any other host must resolve to public addresses, or to networks the backend option
  ``allowed_private_networks`` lists (CIDRs).
- **Credentials** (``Authorization`` and the ``headers`` option) go with API calls only; an
  API URL taken from a provider's answer is used only on the provider's own origin
  (:meth:`UpstreamHttp.api_url`), and output downloads carry none.
- **Retries.** A POST (it may start a billed generation) is retried only on 429 or when its
  connection never opened; other methods on 429/502/503/504, timeouts and network errors; at
  most ``retries`` times, waiting ``Retry-After`` or ``retry_backoff * 2**attempt`` with full
  jitter, both capped at 30 s.
- **Errors.** Every failure is a :class:`BackendError`; only a request fault
  (400/409/413/415/422) is a ``client_error`` carrying the upstream's own message. Other 4xx
  (credentials, credits, unknown model, rate limits) are the operator's to fix and reported as
  server-side failures.
- **Downloads.** Output files (``http(s)`` or ``data:`` URLs) are fetched without credentials,
  redirects followed a few times (each hop vetted again), at most ``max_download_bytes`` (the
  declared length up front, then the bytes received) within ``download_timeout`` seconds for
  the whole download; the type is sniffed from the bytes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import yarl

from hypereal.backends.base import BackendError, MediaBlob
from hypereal.backends.upstream.media import decode_data_uri, sniff_media_type, specific_type
from hypereal.backends.upstream.options import HttpOptions
from hypereal.media.fetch import MAX_REDIRECTS, FetchRefused
from hypereal.media.guarded_session import LazySession, guarded_session, origin_of
from hypereal.observability import metrics

logger = logging.getLogger(__name__)

# Failures caused by the request itself (bad prompt, image too large, schema violation).
CLIENT_ERROR_CODES = frozenset({400, 409, 413, 415, 422})
CREDENTIAL_CODES = frozenset({401, 403})
# Answers worth another try: an idempotent call retries all of them, a POST only 429, a
# refusal before any work was done.
TRANSIENT_CODES = frozenset({429, 502, 503, 504})
POST_RETRY_CODES = frozenset({429})
# Exceptions proving a POST never reached the server, so retrying it cannot run it twice.
_UNSENT_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)
# Failures of an idempotent call worth another try: timeouts, network and protocol errors.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)
# Longest single wait between retries, even when a Retry-After header asks for more: a job's
# own overall timeout is the real bound, and a poll loop should not stall for minutes.
MAX_RETRY_WAIT = 30.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

Files = Sequence[tuple[str, tuple[str, bytes, str]]]


def capitalized(provider: str) -> str:
    """``provider`` at the start of a sentence (``the X`` -> ``The X``; ``fal.ai`` stays)."""
    return "The " + provider[4:] if provider.startswith("the ") else provider


class UpstreamAnswer:
    """A whole upstream answer: status, headers and body bytes."""

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(
        self, status_code: int, headers: Mapping[str, str], content: bytes, reason: str
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.reason_phrase = reason

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The body decoded as JSON. Raises ValueError."""
        return orjson.loads(self.content)

    @property
    def text(self) -> str:
        """The body as text (its declared charset, else UTF-8)."""
        charset = "utf-8"
        for param in self.headers.get("content-type", "").split(";")[1:]:
            name, _, value = param.strip().partition("=")
            if name.lower() == "charset" and value:
                charset = value.strip('"')
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")


class StreamedAnswer:
    """A 2xx upstream answer whose body is read as it arrives."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> UpstreamAnswer:
        """The rest of the body, whole."""
        response = self._response
        content = await response.read()
        return UpstreamAnswer(response.status, response.headers, content, response.reason or "")

    async def chunks(self) -> AsyncGenerator[bytes]:
        """The body's bytes as they arrive."""
        async for chunk in self._response.content.iter_any():
            yield chunk


def json_object(answer: UpstreamAnswer, provider: str) -> dict[str, Any]:
    """The answer's body as a JSON object. Raises BackendError."""
    try:
        body = answer.json()
    except ValueError as exc:
        raise BackendError(f"{capitalized(provider)} answered with invalid JSON") from exc
    if not isinstance(body, dict):
        raise BackendError(f"{capitalized(provider)} answered with unexpected JSON")
    return body


@dataclass(frozen=True)
class _Call:
    """One API call as :meth:`UpstreamHttp.stream` takes it (a download leaves out the
    credentials and follows no redirect itself)."""

    method: str
    url: str
    json: Any = None
    params: Mapping[str, str] | None = None
    form: Mapping[str, str] | None = None
    files: Files = ()
    headers: Mapping[str, str] | None = None
    timeout: float | None = None
    credentials: bool = True
    allow_redirects: bool = True


class UpstreamHttp:
    """One upstream's HTTP client (see the module doc): API calls with credentials, streamed
    answers, output downloads, every failure a :class:`BackendError`. The session is made on
    first use on the running event loop and closed by :meth:`aclose`.

    ``provider`` names the upstream in messages as it reads mid-sentence (``fal.ai``,
    ``the OpenAI-compatible upstream``); ``auth`` is the ``Authorization`` header value."""

    def __init__(
        self,
        provider: str,
        options: HttpOptions,
        *,
        auth: str | None,
        trusted_urls: Sequence[str] = (),
    ) -> None:
        self.provider = provider
        self.options = options
        self.base_url = options.base_url + "/"
        self._origin = _origin(options.base_url)
        self._headers = dict(options.headers)
        if auth:
            self._headers["Authorization"] = auth
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        trusted = [origin_of(url) for url in (options.base_url, *trusted_urls)]
        allowed = options.allowed_networks
        limits = _timeouts(options.request_timeout)
        connections = options.max_connections
        # A gateway holds one upstream connection per request in flight: keep as many alive
        # as it opens.
        self._session = LazySession(
            lambda: guarded_session(allowed, trusted, timeout=limits, limit=connections)
        )

    @property
    def subject(self) -> str:
        """The provider's name at the start of a sentence."""
        return capitalized(self.provider)

    def url(self, path: str) -> str:
        """``path`` under the base URL; an absolute URL is kept as it is."""
        return path if "://" in path else self.base_url + path.lstrip("/")

    def api_url(self, candidate: object, fallback: str) -> str:
        """``candidate`` (a URL the provider returned) when it is on the provider's own origin,
        else ``fallback``: the credentials must never go to a host the operator did not name."""
        if isinstance(candidate, str) and _origin(candidate) == self._origin:
            return candidate
        return fallback

    # ------------------------------------------------------------------- API calls

    async def request(self, method: str, path: str, **kwargs: Any) -> UpstreamAnswer:
        """Send an API call (arguments as for :meth:`stream`) and return the 2xx answer, body
        read. Raises BackendError for any failure."""
        async with self.stream(method, path, **kwargs) as answer:
            return await answer.read()

    async def request_json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`request`, the answer's JSON object. Raises BackendError."""
        return json_object(await self.request(method, path, **kwargs), self.provider)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
        files: Files = (),
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamedAnswer]:
        """An API call (a ``json`` body, or ``form`` fields with ``files`` as multipart
        ``(field, (filename, bytes, content type))``; query ``params``; extra ``headers``;
        ``timeout`` instead of the configured call timeout) whose 2xx answer is read as it
        arrives. Leaving the block closes the connection unless the whole body was read (then
        it goes back to the pool), which tells the server to stop. Raises BackendError for any
        failure, including one while the body is being read."""
        url = self.url(path)
        started = perf_counter()
        try:
            response = await self._send(
                _Call(method, url, json, params, form, files, headers, timeout)
            )
        except (aiohttp.ClientError, FetchRefused, TimeoutError) as exc:
            metrics.upstream_error(self.provider, "transport")
            raise self._transport_error(exc, url, timeout) from exc
        metrics.observe_upstream(self.provider, perf_counter() - started)
        try:
            answer = StreamedAnswer(response)
            if not 200 <= response.status < 300:
                metrics.upstream_error(self.provider, str(response.status))
                raise self.error_for(await answer.read())
            yield answer
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc, url, timeout) from exc
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def _send(self, call: _Call) -> aiohttp.ClientResponse:
        """The first answer not to be retried, its body unread (retry policy: module doc)."""
        post = call.method.upper() == "POST"
        statuses = POST_RETRY_CODES if post else TRANSIENT_CODES
        errors = _UNSENT_ERRORS if post else _TRANSIENT_ERRORS
        if not call.credentials:
            sent: Mapping[str, str] = {}
        else:
            sent = self._json_headers if call.json is not None else self._headers
        if call.headers:
            sent = {**sent, **call.headers}
        payload = orjson.dumps(call.json) if call.json is not None else None
        session = self._session.get()
        limits = _timeouts(call.timeout) if call.timeout is not None else session.timeout
        attempt = 0
        while True:
            data: Any = payload
            if call.form is not None or call.files:
                data = aiohttp.FormData(dict(call.form or {}))  # a FormData is sent once
                for name, (filename, content, content_type) in call.files:
                    data.add_field(name, content, filename=filename, content_type=content_type)
            try:
                response = await session.request(
                    call.method,
                    call.url,
                    headers=sent,
                    data=data,
                    params=call.params,
                    allow_redirects=call.allow_redirects,
                    timeout=limits,
                )
            except errors:
                if attempt >= self.options.retries:
                    raise
                attempt += 1
                await asyncio.sleep(retry_wait(attempt, self.options.retry_backoff, None))
                continue
            if response.status not in statuses or attempt >= self.options.retries:
                return response
            retry_after = response.headers.get("Retry-After")
            async with response:
                await response.read()  # read to the end: the connection stays in the pool
            attempt += 1
            await asyncio.sleep(retry_wait(attempt, self.options.retry_backoff, retry_after))

    # -------------------------------------------------------------------- errors

    def error_for(self, answer: UpstreamAnswer) -> BackendError:
        """The BackendError for a non-2xx answer, carrying the upstream's own message."""
        status = answer.status_code
        message = upstream_message(answer)
        subject = self.subject
        if status in CREDENTIAL_CODES:
            return BackendError(
                f"{subject} rejected the configured credentials (HTTP {status}): "
                f"{message}. Check the backend's `api_key`."
            )
        if status == 402:
            return BackendError(
                f"{subject} account is out of credits (HTTP 402): {message}{_credit_detail(answer)}"
            )
        if status in CLIENT_ERROR_CODES:
            return BackendError(message, client_error=True)
        if status == 404:
            return BackendError(
                f"{subject} does not know this model or endpoint (HTTP 404): {message}"
            )
        if status == 429:
            return BackendError(f"{subject} is rate limiting us (HTTP 429): {message}")
        if status >= 500:
            return BackendError(f"{subject} failed (HTTP {status}): {message}")
        return BackendError(f"{subject} refused the request (HTTP {status}): {message}")

    def _transport_error(self, exc: Exception, url: str, timeout: float | None) -> BackendError:
        # The URL goes to the log only: error messages may reach API callers.
        parts = urlsplit(url)
        logger.warning("%s: %s %s failed: %r", self.provider, parts.hostname, parts.path, exc)
        if isinstance(exc, FetchRefused):
            return BackendError(
                f"Could not reach {self.provider}: it sent us to an address that is not "
                "public (see the backend option `allowed_private_networks`)"
            )
        if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
            limit = timeout if timeout is not None else self.options.request_timeout
            return BackendError(f"{self.subject} did not answer within {limit:g} s")
        return BackendError(f"Could not reach {self.provider}: {exc or type(exc).__name__}")

    # ----------------------------------------------------------------- downloads

    async def download(self, url: str, declared_type: str | None = None) -> MediaBlob:
        """An output file (``http(s)`` or ``data:`` URL), fetched without credentials; its
        type is sniffed from the bytes, else taken from a specific ``declared_type`` or
        Content-Type. Raises BackendError when it cannot be fetched, is too large or of
        unknown type."""
        limit = self.options.max_download_bytes
        if url.startswith("data:"):
            data, header_type = decode_data_uri(url)
            if len(data) > limit:
                raise BackendError(
                    f"Downloading the {self.provider} output failed: the file is larger than "
                    f"the {limit} byte limit"
                )
        elif urlsplit(url).scheme in ("http", "https"):
            try:
                async with asyncio.timeout(self.options.download_timeout):
                    data, header_type = await self._fetch(url, limit)
            except TimeoutError as exc:
                raise self._download_error(
                    f"no complete answer within {self.options.download_timeout:g} s"
                ) from exc
            except FetchRefused as exc:
                raise self._download_error(exc.message) from exc
            except aiohttp.ClientError as exc:
                raise self._download_error(f"{type(exc).__name__}") from exc
        else:
            raise BackendError(f"{self.subject} returned an output URL we cannot fetch")
        content_type = sniff_media_type(data) or specific_type(declared_type)
        content_type = content_type or specific_type(header_type)
        if content_type is None:
            raise BackendError(f"{self.subject} returned an output file of unknown type")
        return MediaBlob(data=data, content_type=content_type)

    def _download_error(self, reason: str) -> BackendError:
        return BackendError(f"Downloading the {self.provider} output failed: {reason}")

    async def _fetch(self, url: str, limit: int) -> tuple[bytes, str | None]:
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._send(_Call("GET", url, credentials=False, allow_redirects=False))
            async with response:
                location = response.headers.get("Location")
                if response.status in _REDIRECTS and location:
                    url = str(response.url.join(yarl.URL(location)))
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise FetchRefused("it was redirected to a URL that is not http(s)")
                    continue
                if response.status != 200:
                    raise FetchRefused(f"the server answered {response.status}")
                if (response.content_length or 0) > limit:
                    raise FetchRefused(f"the file is larger than the {limit} byte limit")
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body.extend(chunk)
                    if len(body) > limit:
                        raise FetchRefused(f"the file is larger than the {limit} byte limit")
                return bytes(body), response.headers.get("Content-Type")
        raise FetchRefused("too many redirects")

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._session.aclose()


def _timeouts(seconds: float) -> aiohttp.ClientTimeout:
    # ``connect`` covers the wait for a free connection too; ``sock_read`` is the longest
    # silence while an answer arrives.
    return aiohttp.ClientTimeout(
        total=None, connect=seconds, sock_connect=min(seconds, 10.0), sock_read=seconds
    )


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def retry_wait(attempt: int, backoff: float, retry_after: str | None) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): the server's ``Retry-After`` (seconds or
    an HTTP date) when it names a positive wait, else ``backoff * 2**attempt`` with full
    jitter; at most 30 s."""
    if retry_after:
        wait = _retry_after_seconds(retry_after.strip())
        if wait is not None and wait > 0:
            return min(wait, MAX_RETRY_WAIT)
    if not backoff:
        return 0.0
    return min(backoff * 2.0**attempt * random.uniform(0.0, 1.0), MAX_RETRY_WAIT)


def _retry_after_seconds(value: str) -> float | None:
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - datetime.now(UTC)).total_seconds()


def _credit_detail(answer: UpstreamAnswer) -> str:
    try:
        body = answer.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and "required" in body and "available" in body:
        return f" (required {body['required']}, available {body['available']})"
    return ""


def upstream_message(answer: UpstreamAnswer) -> str:
    """The human-readable error text of a provider's error body: fal's ``detail`` (a string or
    a list of ``{loc, msg}``), RFC 7807 ``detail``/``title`` (Replicate), OpenAI's
    ``error.message``, Hypereal's ``error``, or the raw text."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text.strip()[:500] or answer.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "error", "message", "title"):
            text = _text_of(body.get(key))
            if text:
                return text
    return answer.text.strip()[:500] or answer.reason_phrase


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
