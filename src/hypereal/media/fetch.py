"""Fetching user-supplied URLs (input images/audio) and posting to user URLs (webhooks)
without becoming an SSRF proxy.

Every connection goes through :class:`GuardedTransport`: it resolves the host itself,
refuses non-global addresses (loopback, private, link-local/metadata, CGNAT, multicast,
reserved) unless allow-listed by ``allowed_private_networks``, and connects to the vetted
IP it resolved (so a DNS answer cannot change between check and connect), keeping the Host
header and TLS SNI of the original name. Redirects are never followed implicitly;
:func:`fetch_media` follows a few, each hop through the same guard.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import httpx

from hypereal.media.blob import MediaBlob
from hypereal.media.sniff import sniff_content_type
from hypereal.settings import Settings

MAX_REDIRECTS = 5
DEFAULT_TIMEOUT = 30.0  # webhooks and other guarded clients; fetches use the settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchRefused(Exception):
    """A URL we will not fetch or post to; ``message`` says why. The request that named it
    is at fault: callers above answer 400 with the message (``status``)."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parse_networks(cidrs: Sequence[str]) -> list[IPNetwork]:
    """Parse the allow-list; a bad entry is a configuration error (ValueError)."""
    return [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()]


# IPv6 prefixes whose last 32 bits are an IPv4 address the packets end up at.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated, RFC 4291
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix, RFC 6052
# Local-use NAT64 (RFC 8215): never global, whatever it embeds.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries traffic to: IPv4-mapped
    (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), IPv4-translated, NAT64
    (``64:ff9b::a.b.c.d``), 6to4 (``2002:AABB:CCDD::``) and Teredo (server and client).
    Empty for an ordinary IPv6 address."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    if any(address in net for net in (_IPV4_COMPATIBLE, _IPV4_TRANSLATED, _NAT64)):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def address_allowed(address: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    """Whether we may connect to ``address``: allow-listed, or global and not multicast.

    An IPv6 address embedding an IPv4 one (see :func:`embedded_ipv4`) is judged by the
    IPv4 address(es) it embeds, so ``::ffff:127.0.0.1``, ``::7f00:1``, ``64:ff9b::7f00:1``
    and ``2002:7f00:1::`` are loopback, unless the IPv6 address itself is allow-listed.
    """
    if any(address in network for network in allowed):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return False
        embedded = embedded_ipv4(address)
        if embedded:
            return all(address_allowed(inner, allowed) for inner in embedded)
    return address.is_global and not address.is_multicast


async def vetted_addresses(host: str, port: int, allowed: Sequence[IPNetwork]) -> list[str]:
    """Resolve ``host``; every address it resolves to must be allowed.

    Raises FetchRefused naming the first refused address, or when it doesn't resolve.
    """
    try:
        literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        candidates = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise FetchRefused(f"Could not resolve host '{host}'") from exc
        candidates = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in candidates:
        if not address_allowed(address, allowed):
            raise FetchRefused(f"Refused to connect to '{host}': {address} is not a public address")
    return list(dict.fromkeys(str(a) for a in candidates))


Origin = tuple[str, str, int]  # scheme, host (lower case), port


def url_origin(url: httpx.URL | str) -> Origin:
    """``(scheme, host, port)`` of ``url``, the port filled in from the scheme."""
    url = httpx.URL(url)
    scheme = url.scheme.lower()
    return scheme, url.host.lower(), url.port or (443 if scheme == "https" else 80)


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that only connects to vetted addresses (see module doc).

    ``trusted_origins`` are connected to as named, without the address check: the origin of
    an upstream provider the operator configured (which may well be on a private network).
    Only the exact origin is trusted, not other ports or names of the same machine.
    """

    def __init__(
        self, allowed: Sequence[IPNetwork], trusted_origins: Collection[Origin] = ()
    ) -> None:
        self.allowed = list(allowed)
        self.trusted_origins = frozenset(trusted_origins)
        self.inner = httpx.AsyncHTTPTransport(retries=0)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise FetchRefused(f"Only http and https URLs are allowed, not '{url.scheme}:'")
        if url_origin(url) in self.trusted_origins:
            return await self.inner.handle_async_request(request)
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await vetted_addresses(url.host, port, self.allowed)
        request.url = url.copy_with(host=addresses[0])
        request.headers["Host"] = url.netloc.decode("ascii")
        if url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": url.host}
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def guarded_http_client(settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> httpx.AsyncClient:
    """An AsyncClient that never follows redirects and only reaches vetted addresses."""
    return httpx.AsyncClient(
        transport=GuardedTransport(parse_networks(settings.allowed_private_networks)),
        follow_redirects=False,
        timeout=timeout,
    )


def _too_large(field: str, max_bytes: int) -> FetchRefused:
    return FetchRefused(f"'{field}' is larger than the {max_bytes} byte limit")


def _decode_data_uri(uri: str, field: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URI; one too large is refused from its encoded length,
    before anything is decoded."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise FetchRefused(f"Invalid data: URI in '{field}'")
    base64_encoded = header.endswith(";base64")
    # Base64 decodes to 3 bytes per 4 characters (padding aside); percent-encoding to at
    # least one byte per 3 characters.
    least = (len(payload.rstrip("=")) * 3) // 4 if base64_encoded else len(payload) // 3
    if least > max_bytes:
        raise _too_large(field, max_bytes)
    if base64_encoded:
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise FetchRefused(f"Invalid base64 in the data: URI in '{field}'") from exc
    return unquote_to_bytes(payload)


def _checked(data: bytes, field: str, expect: str | None) -> MediaBlob:
    content_type = sniff_content_type(data) or "application/octet-stream"
    if expect and not content_type.startswith(expect + "/"):
        raise FetchRefused(f"'{field}' is not a supported {expect} file (got {content_type})")
    return MediaBlob(data=data, content_type=content_type)


@dataclass(frozen=True)
class Fetched:
    """A downloaded body and the Content-Type its server declared (not trusted: sniff)."""

    data: bytes
    declared_type: str | None


async def _download(client: httpx.AsyncClient, url: str, field: str, max_bytes: int) -> Fetched:
    for _ in range(MAX_REDIRECTS + 1):
        async with client.stream("GET", url) as response:
            if response.is_redirect and "location" in response.headers:
                url = str(response.url.join(response.headers["location"]))
                continue
            if response.status_code != 200:
                raise FetchRefused(
                    f"Could not fetch '{field}': the server answered {response.status_code}"
                )
            try:
                declared = int(response.headers.get("content-length") or 0)
            except ValueError:
                declared = 0
            if declared > max_bytes:
                raise _too_large(field, max_bytes)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > max_bytes:
                    raise _too_large(field, max_bytes)
            return Fetched(bytes(body), response.headers.get("content-type"))
    raise FetchRefused(f"Could not fetch '{field}': too many redirects")


async def fetch_url(
    client: httpx.AsyncClient, url: str, *, field: str, max_bytes: int, timeout: float
) -> Fetched:
    """GET an ``http(s)`` URL through ``client`` (one with a :class:`GuardedTransport` that
    does not follow redirects): up to MAX_REDIRECTS redirects are followed, each hop vetted
    by the transport again; more than ``max_bytes`` (declared or received) and more than
    ``timeout`` seconds for the whole fetch are refused. Every failure is a FetchRefused
    naming ``field``."""
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise FetchRefused(f"'{field}' must be an http(s) URL")
    try:
        return await asyncio.wait_for(_download(client, url, field, max_bytes), timeout)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise FetchRefused(
            f"Timed out fetching '{field}': no complete answer within {timeout:g} s"
        ) from exc
    except httpx.HTTPError as exc:
        raise FetchRefused(f"Could not fetch '{field}': {exc.__class__.__name__}") from exc
    except httpx.InvalidURL as exc:
        # A host httpx will not parse (an IPv4 address with leading-zero octets, 0177.0.0.1,
        # ...) fails as the request is built, before any lookup or connection.
        raise FetchRefused(f"Invalid URL in '{field}': {exc}") from exc


async def fetch_media(
    url: str,
    settings: Settings,
    *,
    field: str = "image",
    expect: str | None = None,
    max_bytes: int | None = None,
    timeout: float | None = None,
) -> MediaBlob:
    """Bytes of an ``http(s)`` URL or ``data:`` URI, with the type sniffed from the bytes.

    ``expect`` ('image', 'audio', 'video') refuses other kinds of content. ``max_bytes`` and
    ``timeout`` (seconds for the whole fetch, redirects included) default to the settings
    ``fetch_max_bytes`` and ``fetch_timeout_seconds``. Raises FetchRefused (400) with a clear
    reason for every refusal.
    """
    max_bytes = settings.fetch_max_bytes if max_bytes is None else max_bytes
    timeout = settings.fetch_timeout_seconds if timeout is None else timeout
    if not isinstance(url, str) or not url:
        raise FetchRefused(f"'{field}' must be a URL or a data: URI")
    if url.startswith("data:"):
        data = _decode_data_uri(url, field, max_bytes)
        if len(data) > max_bytes:
            raise _too_large(field, max_bytes)
    else:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise FetchRefused(f"'{field}' must be an http(s) URL or a data: URI")
        async with guarded_http_client(settings, timeout) as client:
            fetched = await fetch_url(
                client, url, field=field, max_bytes=max_bytes, timeout=timeout
            )
        data = fetched.data
    if not data:
        raise FetchRefused(f"'{field}' is empty")
    return _checked(data, field, expect)
