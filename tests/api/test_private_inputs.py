"""Uploaded inputs (``media/inputs/{account}/...``) are not public: ``/files`` serves them to
their owner's API key or under an unexpired signed URL (HMAC-SHA256 with the server's
secret), and to nobody else; generated outputs stay public by URL."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from hypereal.app import create_app
from hypereal.domain import jobs, keys, ledger
from hypereal.media.signing import MediaSigner, input_owner, load_secret
from hypereal.services import Services, build_services
from hypereal.settings import Settings


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        enable_test_backends=True,
    )
    services = build_services(settings)
    await services.migrate()
    app = create_app(settings, services=services)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                yield c, services
    finally:
        await services.close()


async def new_key(services: Services, credits: int = 100) -> tuple[str, str]:
    account = await keys.create_account(services.db, "t")
    await ledger.grant(services.db, account, credits)
    return (await keys.create_key(services.db, account)).secret, account


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def submitted(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    body = {"model": "noop-video", "input": {"prompt": "x", "image": uri}}
    response = await client.post("/v1/videos/generate", json=body, headers=bearer(key))
    assert response.status_code == 202, response.text
    job_id = response.json()["jobId"]
    async with asyncio.timeout(30):
        while True:
            job: dict[str, Any] = (
                await client.get(f"/v1/jobs/{job_id}", headers=bearer(key))
            ).json()
            if job["status"] != "processing":
                return job
            await asyncio.sleep(0.05)


async def test_an_input_is_served_to_its_owner_or_a_signed_url_only(
    setup: tuple[httpx.AsyncClient, Services],
) -> None:
    client, services = setup
    key, account = await new_key(services)
    job = await submitted(client, key)
    assert job["status"] == "completed", job
    stored = (await jobs.get_job(services.db, account, job["jobId"])).media["image"]
    assert stored.startswith(f"inputs/{account}/") and input_owner(stored) == account
    path = f"/files/{stored}"

    # No key, no signature: as if it did not exist.
    anonymous = await client.get(path)
    assert anonymous.status_code == 404
    assert anonymous.json() == {"error": "File not found"}
    assert (await client.head(path)).status_code == 404
    # Another account's key, or a key that is no key: the same.
    other, _ = await new_key(services)
    assert (await client.get(path, headers=bearer(other))).status_code == 404
    assert (await client.get(path, headers=bearer("ck_not_a_key"))).status_code == 404

    # The owner's key.
    owned = await client.get(path, headers=bearer(key))
    assert owned.status_code == 200
    assert owned.content == png_bytes()
    assert owned.headers["content-type"] == "image/png"
    assert owned.headers["cache-control"] == "private, no-store"

    # The signed URL the owner's job view hands out works without a key, for an hour.
    signed = job["inputUrls"]["image"]
    assert signed.startswith(f"http://testserver{path}?")
    query = parse_qs(urlsplit(signed).query)
    assert 3500 < int(query["expires"][0]) - time.time() <= 3600
    fetched = await client.get(signed)
    assert fetched.status_code == 200 and fetched.content == png_bytes()

    # A signature for another file, a tampered expiry, or an expired URL: 403.
    expires, signature = query["expires"][0], query["signature"][0]
    later = str(int(expires) + 60)
    for params in (
        {"expires": expires, "signature": "0" * 64},
        {"expires": later, "signature": signature},
        {"expires": expires},
    ):
        refused = await client.get(path, params=params)
        assert refused.status_code == 403, params
        assert refused.json() == {"error": "Invalid or expired signature"}
    past = int(time.time()) - 1
    expired = {"expires": str(past), "signature": services.media_signer.signature(stored, past)}
    assert (await client.get(path, params=expired)).status_code == 403

    # The output stays public by its URL, as clients download it.
    output = await client.get(job["outputUrl"])
    assert output.status_code == 200
    assert output.headers["cache-control"].startswith("public")


def test_the_signing_secret_is_configured_or_kept_in_the_data_dir(tmp_path: Path) -> None:
    made = load_secret(None, tmp_path)
    assert len(made) == 64
    assert (tmp_path / "media-signing.key").stat().st_mode & 0o777 == 0o600
    assert load_secret(None, tmp_path) == made  # the same across restarts and processes
    assert load_secret("an operator's secret value", tmp_path) == b"an operator's secret value"
    first, second = MediaSigner(made), MediaSigner(b"another secret, 16+ bytes")
    assert first.signature("inputs/a/x.png", 10) != second.signature("inputs/a/x.png", 10)
    with pytest.raises(ValueError):
        MediaSigner(b"short")
