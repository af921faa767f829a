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
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

import httpx

from hypereal.backends.base import MediaBlob
from hypereal.domain.errors import BadRequest
from hypereal.media.sniff import sniff_content_type
from hypereal.settings import Settings

MAX_REDIRECTS = 5
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchRefused(BadRequest):
    """A URL we will not fetch or post to (400 with the reason)."""


def parse_networks(cidrs: Sequence[str]) -> list[IPNetwork]:
    """Parse the allow-list; a bad entry is a configuration error (ValueError)."""
    return [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()]


def address_allowed(address: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return True
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


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that only connects to vetted addresses (see module doc)."""

    def __init__(self, allowed: Sequence[IPNetwork]) -> None:
        self.allowed = list(allowed)
        self.inner = httpx.AsyncHTTPTransport(retries=0)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise FetchRefused(f"Only http and https URLs are allowed, not '{url.scheme}:'")
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


def _decode_data_uri(uri: str, field: str) -> bytes:
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise FetchRefused(f"Invalid data: URI in '{field}'")
    if header.endswith(";base64"):
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


async def _download(client: httpx.AsyncClient, url: str, field: str, max_bytes: int) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        async with client.stream("GET", url) as response:
            if response.is_redirect and "location" in response.headers:
                url = str(response.url.join(response.headers["location"]))
                continue
            if response.status_code != 200:
                raise FetchRefused(
                    f"Could not fetch '{field}': the server answered {response.status_code}"
                )
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise FetchRefused(f"'{field}' is larger than the {max_bytes} byte limit")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > max_bytes:
                    raise FetchRefused(f"'{field}' is larger than the {max_bytes} byte limit")
            return bytes(body)
    raise FetchRefused(f"Could not fetch '{field}': too many redirects")


async def fetch_media(
    url: str,
    settings: Settings,
    *,
    field: str = "image",
    expect: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,
) -> MediaBlob:
    """Bytes of an ``http(s)`` URL or ``data:`` URI, with the type sniffed from the bytes.

    ``expect`` ('image', 'audio', 'video') refuses other kinds of content. Raises
    FetchRefused (400) with a clear reason for every refusal.
    """
    if not isinstance(url, str) or not url:
        raise FetchRefused(f"'{field}' must be a URL or a data: URI")
    if url.startswith("data:"):
        data = _decode_data_uri(url, field)
        if len(data) > max_bytes:
            raise FetchRefused(f"'{field}' is larger than the {max_bytes} byte limit")
    else:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise FetchRefused(f"'{field}' must be an http(s) URL or a data: URI")
        try:
            async with guarded_http_client(settings, timeout) as client:
                data = await asyncio.wait_for(_download(client, url, field, max_bytes), timeout)
        except TimeoutError as exc:
            raise FetchRefused(f"Timed out fetching '{field}'") from exc
        except httpx.HTTPError as exc:
            raise FetchRefused(f"Could not fetch '{field}': {exc.__class__.__name__}") from exc
    if not data:
        raise FetchRefused(f"'{field}' is empty")
    return _checked(data, field, expect)
