"""The SSRF guard: non-global addresses are refused before any connection is made;
allow-listed loopback works; redirects are re-checked hop by hop; data: URIs decode."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi import FastAPI, Response
from fastapi.responses import RedirectResponse
from PIL import Image

from hypereal.media.fetch import FetchRefused, fetch_media
from hypereal.settings import Settings
from tests.support.servers import serve_app


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
