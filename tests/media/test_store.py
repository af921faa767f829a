"""Media stores: local files served at /files with the right Content-Type; S3-compatible
storage through the same interface against a real S3 protocol server (moto) on loopback."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from hypereal.media.store import LocalMediaStore, S3MediaStore, new_media_key
from hypereal.services import Services
from tests.support.servers import free_port


def webp_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, format="WEBP")
    return buffer.getvalue()


async def test_local_store_serves_files_with_the_right_content_type(
    services: Services, client: httpx.AsyncClient
) -> None:
    assert isinstance(services.media, LocalMediaStore)
    key = new_media_key("image", "image/webp")
    url = await services.media.put(key, webp_bytes(), "image/webp")
    assert url == f"http://testserver/files/{key}"
    response = await client.get(url)  # no auth needed
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert response.content == webp_bytes()
    glb = await services.media.put("mesh/x/model.glb", b"glTF\x02\x00\x00\x00", "model/gltf-binary")
    assert (await client.get(glb)).headers["content-type"] == "model/gltf-binary"


async def test_local_store_refuses_paths_outside_its_root(
    services: Services, client: httpx.AsyncClient
) -> None:
    assert isinstance(services.media, LocalMediaStore)
    with pytest.raises(ValueError):
        await services.media.put("../../escape.png", b"x", "image/png")
    assert (await client.get("/files/../hypereal.db")).status_code == 404
    assert (await client.get("/files/image/none.png")).json() == {"error": "File not found"}
    for key in ["/etc/passwd", "a/../../x", "a//b", "./a", "a\\b", "a\x00b", ""]:
        assert services.media.path_for(key) is None, key
    assert (await client.get("/files/a%00b")).status_code == 404
    assert (await client.get("/files/image%2F..%2F..%2Fhypereal.db")).status_code == 404
    assert services.media.path_for("image/2026/12/x.png") == (
        services.media.root.resolve() / "image/2026/12/x.png"
    )


async def test_local_store_writes_whole_files_and_remakes_a_removed_folder(
    tmp_path: Path,
) -> None:
    store = LocalMediaStore(tmp_path / "media", "http://media.test")
    big = bytes(range(256)) * 2048  # 512 KiB: written from a worker thread
    await store.put("image/2026/12/a.png", b"first", "image/png")
    await store.put("image/2026/12/b.bin", big, "application/octet-stream")
    folder = tmp_path / "media" / "image" / "2026" / "12"
    assert (folder / "a.png").read_bytes() == b"first"
    assert (folder / "b.bin").read_bytes() == big
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.bin"]  # no .part left
    await store.put("image/2026/12/a.png", b"second", "image/png")  # replaced whole
    assert (folder / "a.png").read_bytes() == b"second"
    shutil.rmtree(tmp_path / "media")  # an operator clears the media folder
    url = await store.put("image/2026/12/c.png", b"third", "image/png")
    assert url == "http://media.test/files/image/2026/12/c.png"
    assert (folder / "c.png").read_bytes() == b"third"


async def test_s3_store_round_trips_through_an_s3_protocol_server() -> None:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        store = S3MediaStore(
            "media",
            endpoint_url=endpoint,
            region="us-east-1",
            access_key_id="test",
            secret_access_key="test",
            public_url=None,
        )
        store.client.create_bucket(Bucket="media")
        key = new_media_key("image", "image/webp")
        url = await store.put(key, webp_bytes(), "image/webp")
        assert url.startswith(f"{endpoint}/media/{key}?")  # presigned
        async with httpx.AsyncClient() as http:
            response = await http.get(url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/webp"
        assert response.content == webp_bytes()
        assert await store.get(key) == webp_bytes()
        assert await store.get("image/none.png") is None
        public = S3MediaStore(
            "media",
            endpoint_url=endpoint,
            region="us-east-1",
            access_key_id="test",
            secret_access_key="test",
            public_url="https://cdn.example/media/",
        )
        assert public.url_for(key) == f"https://cdn.example/media/{key}"
    finally:
        server.stop()
