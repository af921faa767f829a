"""Output downloads of the hosted-provider adapters go through the SSRF guard of
``hypereal.media.fetch``: against the fake fal.ai queue on 127.0.0.1, whose file server is
wrapped here to redirect, stream or misbehave. Refused addresses are never connected to (the
guard refuses before connecting), so no traffic leaves loopback."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hypereal.backends.base import BackendError, BackendUnavailable, ImageRequest
from hypereal.backends.fal import FalQueue
from hypereal.backends.openai_compat import OpenAICompatible
from hypereal.backends.replicate import ReplicatePredictions
from tests.support.fal_server import FalFake
from tests.support.openai_server import OpenAIFake
from tests.support.replicate_server import ReplicateFake, ReplicateScenario
from tests.support.sample_media import image_bytes
from tests.support.servers import serve_app

KEY = "fal-test-key"
FileHandler = Callable[[Scope], Response | None]


class FileServerWrapper:
    """The fake's app, with ``GET /files/...`` answered by ``handler`` when it returns a
    response (else by the fake's own file server)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.handler: FileHandler = lambda scope: None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/files/"):
            response = self.handler(scope)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI lifespan conversation (startup, then shutdown)."""
    message = await receive()
    while message["type"] != "lifespan.shutdown":
        await send({"type": message["type"] + ".complete"})
        message = await receive()
    await send({"type": "lifespan.shutdown.complete"})


class Cdn:
    """A second file server on another loopback port (another origin than the provider's)."""

    def __init__(self) -> None:
        self.hits: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        self.hits.append(scope["path"])
        await Response(image_bytes(), media_type="image/png")(scope, receive, send)


@pytest.fixture
def fake() -> FalFake:
    return FalFake(api_key=KEY)


@pytest.fixture
def files(fake: FalFake) -> FileServerWrapper:
    return FileServerWrapper(fake.app)


@pytest.fixture
def fal_url(files: FileServerWrapper) -> Iterator[str]:
    with serve_app(files) as url:
        yield url


@pytest.fixture
def cdn() -> Iterator[tuple[Cdn, str]]:
    server = Cdn()
    with serve_app(server) as url:
        yield server, url


@pytest.fixture
async def make_backend(fal_url: str) -> AsyncIterator[Callable[..., FalQueue]]:
    made: list[FalQueue] = []

    def make(**options: Any) -> FalQueue:
        backend = FalQueue(
            {"api_key": KEY, "base_url": fal_url, "poll_interval": 0.01, "retry_backoff": 0}
            | options
        )
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


@pytest.fixture
def fal(make_backend: Callable[..., FalQueue]) -> FalQueue:
    return make_backend()


def redirect_to(location: str) -> FileHandler:
    return lambda scope: RedirectResponse(location, status_code=302)


async def generate(backend: FalQueue) -> BackendError:
    with pytest.raises(BackendError) as info:
        await backend.generate_images(ImageRequest(prompt="x", upstream_model="fal-ai/flux/dev"))
    return info.value


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://10.0.0.1/internal.png",  # private
        "http://[::ffff:169.254.169.254]/x",  # metadata, IPv4-mapped
    ],
)
async def test_redirect_of_an_output_to_a_non_public_address_is_refused(
    fal: FalQueue, files: FileServerWrapper, location: str
) -> None:
    files.handler = redirect_to(location)
    error = await generate(fal)
    assert not error.client_error
    assert error.message.startswith("Downloading the fal.ai output failed: Refused to connect")
    assert "is not a public address" in error.message


async def test_redirect_to_another_loopback_port_is_refused_unless_allow_listed(
    make_backend: Callable[..., FalQueue],
    files: FileServerWrapper,
    cdn: tuple[Cdn, str],
) -> None:
    server, cdn_url = cdn
    files.handler = redirect_to(f"{cdn_url}/image.png")
    # Only the configured provider's own origin is trusted, not the machine it runs on.
    plain = make_backend()
    error = await generate(plain)
    assert "Refused to connect to '127.0.0.1': 127.0.0.1 is not a public address" in error.message
    assert server.hits == []  # refused before connecting

    allowed = make_backend(allowed_private_networks=["127.0.0.0/8"])
    [blob] = await allowed.generate_images(
        ImageRequest(prompt="x", upstream_model="fal-ai/flux/dev")
    )
    assert blob.content_type == "image/png" and blob.data == image_bytes()
    assert server.hits == ["/image.png"]


async def test_an_output_url_on_a_non_public_address_is_refused(
    make_backend: Callable[..., FalQueue], fake: FalFake, files: FileServerWrapper
) -> None:
    # The provider's answer itself names the address (no redirect involved).
    original = fake.media.add

    def elsewhere(request: Any, data: bytes, content_type: str, suffix: str) -> str:
        original(request, data, content_type, suffix)
        return "http://127.0.0.1:9/files/x.png"  # another port than the provider's

    fake.media.add = elsewhere  # type: ignore[method-assign]
    backend = make_backend()
    error = await generate(backend)
    assert "127.0.0.1 is not a public address" in error.message


async def test_redirects_within_the_provider_origin_are_followed(
    fal: FalQueue, fake: FalFake, files: FileServerWrapper
) -> None:
    def once(scope: Scope) -> Response | None:
        if scope["query_string"]:
            return None  # the fake's own file
        return RedirectResponse(scope["path"] + "?hop=1", status_code=307)

    files.handler = once
    [blob] = await fal.generate_images(ImageRequest(prompt="x", upstream_model="fal-ai/flux/dev"))
    assert blob.content_type == "image/png"
    assert len(fake.media.downloads) == 1


async def test_redirect_loops_end(fal: FalQueue, files: FileServerWrapper) -> None:
    files.handler = lambda scope: RedirectResponse(scope["path"], status_code=302)
    error = await generate(fal)
    assert error.message.endswith("too many redirects")


async def test_an_output_over_max_download_bytes_is_refused(
    make_backend: Callable[..., FalQueue], files: FileServerWrapper
) -> None:
    backend = make_backend(max_download_bytes=100)
    # Declared length over the cap: refused from the header.
    error = await generate(backend)
    assert error.message.endswith("is larger than the 100 byte limit")

    # No Content-Length (chunked): refused once 100 bytes have arrived.
    def chunked(scope: Scope) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(50):
                yield b"\x89PNG\r\n\x1a\n" + b"\0" * 56

        return StreamingResponse(body(), media_type="image/png")

    files.handler = chunked
    error = await generate(backend)
    assert error.message.endswith("is larger than the 100 byte limit")

    roomy = make_backend(max_download_bytes=len(image_bytes()))
    files.handler = lambda scope: None
    [blob] = await roomy.generate_images(ImageRequest(prompt="x", upstream_model="fal-ai/flux/dev"))
    assert blob.data == image_bytes()


@pytest.mark.parametrize("value", [["not-a-cidr"], "10.0.0.0/33", [1]])
def test_a_bad_allowed_private_networks_option_is_a_configuration_error(value: Any) -> None:
    with pytest.raises(BackendUnavailable, match="allowed_private_networks"):
        FalQueue({"api_key": KEY, "allowed_private_networks": value})
    with pytest.raises(BackendUnavailable, match="allowed_private_networks"):
        ReplicatePredictions({"api_key": "r8_x", "allowed_private_networks": value})


async def test_openai_compatible_image_urls_go_through_the_same_guard(
    cdn: tuple[Cdn, str],
) -> None:
    """The OpenAI-compatible adapter (and the hosted-Hypereal one, which shares its HTTP
    client) downloads ``response_format: url`` images through the guard too."""
    openai = OpenAIFake()
    files = FileServerWrapper(openai.app)
    server, cdn_url = cdn
    request = ImageRequest(prompt="x", upstream_model="dall-e-3")
    with serve_app(files) as url:
        options = {"base_url": f"{url}/v1", "api_key": openai.api_key, "retry_backoff": 0}
        plain = OpenAICompatible({**options, "image_response_format": "url"})
        allowed = OpenAICompatible(
            {**options, "image_response_format": "url", "allowed_private_networks": "127.0.0.0/8"}
        )
        try:
            [own] = await plain.generate_images(request)  # the provider's own origin
            assert own.content_type == "image/png"

            files.handler = redirect_to("http://169.254.169.254/latest/meta-data/")
            with pytest.raises(
                BackendError, match=re.escape("169.254.169.254 is not a public address")
            ):
                await plain.generate_images(request)

            files.handler = redirect_to(f"{cdn_url}/image.png")
            with pytest.raises(BackendError, match=re.escape("127.0.0.1 is not a public address")):
                await plain.generate_images(request)
            assert server.hits == []
            [blob] = await allowed.generate_images(request)
            assert blob.data == image_bytes() and server.hits == ["/image.png"]
        finally:
            await plain.aclose()
            await allowed.aclose()


async def test_a_data_uri_output_over_max_download_bytes_is_refused() -> None:
    replicate = ReplicateFake(api_key="r8_test")
    replicate.default = ReplicateScenario(output_as_data_uri=True)
    request = ImageRequest(prompt="x", upstream_model="black-forest-labs/flux-schnell")
    with serve_app(replicate.app) as url:
        options = {"api_key": "r8_test", "base_url": f"{url}/v1", "retry_backoff": 0}
        tight = ReplicatePredictions({**options, "max_download_bytes": 10})
        try:
            with pytest.raises(BackendError, match="larger than the 10 byte limit"):
                await tight.generate_images(request)
        finally:
            await tight.aclose()


async def test_fal_api_redirects_go_through_the_guard_too(
    make_backend: Callable[..., FalQueue],
) -> None:
    """The API client is the same guarded session: a provider answer redirecting an API call
    to a non-public address is refused before connecting."""
    with serve_app(redirect_everything("http://169.254.169.254/latest/meta-data/")) as url:
        backend = make_backend(base_url=url)
        error = await generate(backend)
    assert not error.client_error
    assert "allowed_private_networks" in error.message


def redirect_everything(location: str) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await RedirectResponse(location, status_code=307)(scope, receive, send)

    return app
