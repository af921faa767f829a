"""The SSRF guard: non-global addresses (IPv6 forms embedding IPv4 ones too) are refused
before any connection is made; allow-listed loopback works; redirects are re-checked hop by
hop; a server that never answers times out; data: URIs decode, too-large ones refused
before decoding."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress

import httpx
import pytest
from fastapi import FastAPI, Response
from fastapi.responses import RedirectResponse
from PIL import Image

from hypereal.media.fetch import (
    FetchRefused,
    address_allowed,
    embedded_ipv4,
    fetch_media,
    parse_networks,
    vetted_addresses,
)
from hypereal.settings import Settings
from tests.support.servers import serve_app, silent_server


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def image_server() -> FastAPI:
    app = FastAPI()

    @app.get("/cat.png")
    async def cat() -> Response:
        return Response(png_bytes(), media_type="text/plain")  # a lying header

    @app.get("/to-private")
    async def to_private() -> RedirectResponse:
        return RedirectResponse("http://10.20.30.40/secret")

    @app.get("/to-octal")
    async def to_octal() -> RedirectResponse:
        return RedirectResponse("http://0177.0.0.1:8690/k0")

    @app.get("/to-cat")
    async def to_cat() -> RedirectResponse:
        return RedirectResponse("/cat.png")

    @app.get("/big")
    async def big() -> Response:
        return Response(b"\x89PNG\r\n\x1a\n" + b"0" * 5000, media_type="image/png")

    @app.get("/notes.txt")
    async def notes() -> Response:
        return Response(b"hello", media_type="image/png")

    return app


LOOPBACK = Settings(allowed_private_networks=["127.0.0.0/8"])
DEFAULT = Settings()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost/x.png",
        "http://10.1.2.3/x.png",
        "http://192.168.1.1/x.png",
        "http://172.16.0.5/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://100.64.0.1/x.png",
        "http://0.0.0.0/x.png",
    ],
)
async def test_non_global_addresses_are_refused_without_connecting(url: str) -> None:
    with pytest.raises(FetchRefused, match="not a public address"):
        await fetch_media(url, DEFAULT)


@pytest.mark.parametrize(
    "url", ["http://0177.0.0.1:8690/k0", "http://01.02.03.04/x.png", "https://010.0.0.1/"]
)
async def test_leading_zero_ipv4_octets_are_a_400_naming_the_field_without_connecting(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[object] = []

    async def no_connection(self: object, request: object) -> None:
        attempts.append(request)
        raise AssertionError("a connection was attempted")

    async def no_lookup(self: object, host: object, *args: object, **kwargs: object) -> None:
        attempts.append(host)
        raise AssertionError("a name was looked up")

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", no_connection)
    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", no_lookup)
    # Even where loopback is allowed: the host is not a valid URL host at all.
    for settings in (DEFAULT, LOOPBACK):
        with pytest.raises(FetchRefused, match=r"'input\.image'") as refused:
            await fetch_media(url, settings, field="input.image")
        assert refused.value.status == 400
    assert attempts == []


async def test_redirect_to_a_leading_zero_ipv4_host_is_refused() -> None:
    with serve_app(image_server()) as base:
        with pytest.raises(FetchRefused, match="'image'"):
            await fetch_media(f"{base}/to-octal", LOOPBACK, field="image")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "gopher://x"])
async def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(FetchRefused, match="http"):
        await fetch_media(url, DEFAULT)


async def test_allow_listed_loopback_is_fetched_and_sniffed_from_bytes() -> None:
    with serve_app(image_server()) as base:
        blob = await fetch_media(f"{base}/cat.png", LOOPBACK, expect="image")
        followed = await fetch_media(f"{base}/to-cat", LOOPBACK, expect="image")
    assert blob.content_type == "image/png" and blob.data == png_bytes()
    assert followed.data == blob.data


async def test_loopback_needs_the_allow_list() -> None:
    with serve_app(image_server()) as base:
        with pytest.raises(FetchRefused, match="not a public address"):
            await fetch_media(f"{base}/cat.png", DEFAULT)


async def test_redirect_to_a_private_address_is_refused() -> None:
    with serve_app(image_server()) as base:
        with pytest.raises(FetchRefused, match=r"10\.20\.30\.40 is not a public address"):
            await fetch_media(f"{base}/to-private", LOOPBACK)


async def test_size_cap_and_content_checks() -> None:
    with serve_app(image_server()) as base:
        with pytest.raises(FetchRefused, match="byte limit"):
            await fetch_media(f"{base}/big", LOOPBACK, max_bytes=1000)
        with pytest.raises(FetchRefused, match="not a supported image"):
            await fetch_media(f"{base}/notes.txt", LOOPBACK, expect="image")
        with pytest.raises(FetchRefused, match="answered 404"):
            await fetch_media(f"{base}/missing.png", LOOPBACK)


async def test_data_uris_decode_and_are_checked() -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    blob = await fetch_media(uri, DEFAULT, expect="image")
    assert blob.content_type == "image/png"
    with pytest.raises(FetchRefused, match="not a supported image"):
        await fetch_media("data:text/plain,hello", DEFAULT, expect="image")
    with pytest.raises(FetchRefused, match="Invalid data: URI"):
        await fetch_media("data:image/png;base64", DEFAULT)


# IPv6 addresses that carry traffic to an IPv4 address, each embedding 127.0.0.1 / 10.0.0.1.
EMBEDDED_PRIVATE = {
    "::ffff:127.0.0.1": "127.0.0.1",  # IPv4-mapped
    "::7f00:1": "127.0.0.1",  # IPv4-compatible
    "::ffff:0:7f00:1": "127.0.0.1",  # IPv4-translated (SIIT)
    "64:ff9b::7f00:1": "127.0.0.1",  # NAT64 well-known prefix
    "2002:7f00:1::": "127.0.0.1",  # 6to4
    "64:ff9b::a00:1": "10.0.0.1",
    "2002:a00:1::5": "10.0.0.1",
}


@pytest.mark.parametrize(("v6", "v4"), EMBEDDED_PRIVATE.items())
def test_ipv6_embedding_a_private_ipv4_address_is_judged_by_it(v6: str, v4: str) -> None:
    address = ipaddress.IPv6Address(v6)
    assert embedded_ipv4(address) == [ipaddress.IPv4Address(v4)]
    assert not address_allowed(address, [])
    # The embedded address is what the allow-list is checked against.
    assert address_allowed(address, parse_networks([v4 + "/32"]))


@pytest.mark.parametrize("v6", list(EMBEDDED_PRIVATE))
async def test_ipv6_literals_embedding_private_ipv4_are_refused_without_connecting(
    v6: str,
) -> None:
    with pytest.raises(FetchRefused, match="not a public address"):
        await vetted_addresses(v6, 80, [])


@pytest.mark.parametrize(
    "v6",
    [
        "::ffff:8.8.8.8",
        "::808:808",
        "64:ff9b::808:808",
        "2002:808:808::1",
        "2606:4700:4700::1111",  # an ordinary global IPv6 address
    ],
)
def test_ipv6_embedding_a_public_ipv4_address_or_none_is_allowed(v6: str) -> None:
    assert address_allowed(ipaddress.IPv6Address(v6), [])


def test_local_use_nat64_and_plain_ipv6_specials_are_refused() -> None:
    for v6 in ("64:ff9b:1::808:808", "::1", "::", "fe80::1", "fc00::1", "ff02::1"):
        assert not address_allowed(ipaddress.IPv6Address(v6), []), v6


async def test_a_server_that_never_answers_times_out_with_a_clear_400() -> None:
    settings = Settings(allowed_private_networks=["127.0.0.0/8"], fetch_timeout_seconds=0.3)
    async with silent_server() as base:
        # The default timeout is 30 s: returning within 10 s shows the setting is used.
        with pytest.raises(FetchRefused) as refused:
            await asyncio.wait_for(fetch_media(f"{base}/cat.png", settings, field="image"), 10)
    assert refused.value.status == 400  # the caller answers 400 with the message
    assert refused.value.message.startswith("Timed out fetching 'image'")


async def test_data_uri_over_the_cap_is_refused_from_its_encoded_length() -> None:
    capped = Settings(fetch_max_bytes=1000)
    # 1336 base64 characters can only decode to about 1002 bytes: refused before decoding
    # (these are not even valid base64, which a decode-first check would report as empty).
    with pytest.raises(FetchRefused, match="larger than the 1000 byte limit"):
        await fetch_media("data:image/png;base64," + "!" * 1336, capped)
    too_big = base64.b64encode(b"\x00" * 1001).decode()
    with pytest.raises(FetchRefused, match="larger than the 1000 byte limit"):
        await fetch_media("data:application/octet-stream;base64," + too_big, capped)
    with pytest.raises(FetchRefused, match="larger than the 1000 byte limit"):
        await fetch_media("data:," + "%00" * 1001, capped)
    exact = base64.b64encode(b"\x01" * 1000).decode()
    blob = await fetch_media("data:application/octet-stream;base64," + exact, capped)
    assert blob.data == b"\x01" * 1000
