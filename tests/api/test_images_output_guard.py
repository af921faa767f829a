"""An upstream's output file that the download guard refuses (a redirect to a non-public
address, a file over the size cap) fails the image request with a clear JSON error, and the
credits debited for it are refunded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from hypereal.app import create_app
from hypereal.domain import ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.api.test_images import user
from tests.backends.test_upstream_download import FileServerWrapper, redirect_to
from tests.support.fal_server import FalFake
from tests.support.servers import serve_app


@pytest.fixture
def files() -> FileServerWrapper:
    return FileServerWrapper(FalFake().app)


@pytest.fixture
def fal_url(files: FileServerWrapper) -> Iterator[str]:
    with serve_app(files) as url:
        yield url


@pytest.fixture
async def services(tmp_path: Path, fal_url: str) -> AsyncIterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        backends={
            "fal": {
                "type": "fal",
                "api_key": "fal-test-key",
                "base_url": fal_url,
                "poll_interval": 0.01,
                "retry_backoff": 0,
                "max_download_bytes": 2000,
            }
        },
    )
    services = build_services(settings)
    await services.migrate()
    yield services
    await services.close()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services.settings, services=services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


async def assert_refunded(services: Services, account: str) -> None:
    assert await ledger.balance(services.db, account) == 10
    kinds = [e.kind for e in await ledger.entries(services.db, account)]
    assert kinds == ["refund", "debit", "grant"]


async def generate(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await client.post(
        "/v1/images/generate", headers=headers, json={"prompt": "x", "model": "flux-1-dev"}
    )


async def test_output_redirected_to_the_metadata_address_is_refused_and_refunded(
    client: httpx.AsyncClient, services: Services, files: FileServerWrapper
) -> None:
    files.handler = redirect_to("http://169.254.169.254/latest/meta-data/")
    headers, account = await user(services, 10)
    response = await generate(client, headers)
    assert response.status_code >= 500
    error = response.json()["error"]
    assert error.startswith("Image generation failed")
    assert "Refused to connect to '169.254.169.254'" in error
    assert "is not a public address" in error
    await assert_refunded(services, account)


async def test_output_over_the_size_cap_is_refused_and_refunded(
    client: httpx.AsyncClient, services: Services
) -> None:
    # The fake's 1024x1024 PNG (5.5 kB) is over the 2000 bytes this backend accepts.
    headers, account = await user(services, 10)
    response = await client.post(
        "/v1/images/generate",
        headers=headers,
        json={"prompt": "x", "model": "flux-1-dev", "size": "1024*1024"},
    )
    assert response.status_code >= 500
    assert "is larger than the 2000 byte limit" in response.json()["error"]
    await assert_refunded(services, account)

    # Its default 64x64 PNG fits: the cap, not the upstream, refused the first.
    response = await generate(client, headers)
    assert response.status_code == 200, response.text
    file = await client.get(response.json()["data"][0]["url"])
    assert file.headers["content-type"] == "image/png"
