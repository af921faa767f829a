"""The offline media models end to end through the real app and its built-in backends:
``camera-motion-i2v`` (H.264 MP4) and ``relief-3d`` (GLB) submitted over HTTP, polled, and
their outputs downloaded and decoded."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.conftest import MakeKey, auth

av = pytest.importorskip("av")
trimesh = pytest.importorskip("trimesh")


def png_uri(width: int = 160, height: int = 90) -> str:
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    ImageDraw.Draw(img).ellipse((20, 20, 60, 60), fill=(0, 120, 255))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def finished(client: httpx.AsyncClient, job_id: str, key: str) -> dict[str, Any]:
    async with asyncio.timeout(60):
        while True:
            job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", headers=auth(key))).json()
            if job["status"] != "processing":
                return job
            await asyncio.sleep(0.1)


async def test_camera_motion_job_produces_a_playable_mp4(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = await make_key(credits=100)
    body = {
        "model": "camera-motion-i2v",
        "input": {
            "prompt": "slow pan left",
            "image": png_uri(),
            "duration": 1,
            "fps": 8,
            "resolution": "480p",
        },
    }
    response = await client.post("/v1/videos/generate", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    job = await finished(client, response.json()["jobId"], key)
    assert job["status"] == "completed", job
    download = await client.get(job["outputUrl"].removeprefix("http://testserver"))
    assert download.status_code == 200
    assert download.headers["content-type"] == "video/mp4"
    assert download.content[4:8] == b"ftyp"
    with av.open(io.BytesIO(download.content)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.codec_context.name == "h264"
    assert len(frames) == 8
    assert (frames[0].width, frames[0].height) == (854, 480)


async def test_relief_job_produces_a_textured_glb(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = await make_key(credits=100)
    body = {"model": "relief-3d", "input": {"image": png_uri(), "resolution": 32}}
    response = await client.post("/v1/3d/generate", json=body, headers=auth(key))
    assert response.status_code == 202, response.text
    job = await finished(client, response.json()["jobId"], key)
    assert job["status"] == "completed", job
    download = await client.get(job["outputUrl"].removeprefix("http://testserver"))
    assert download.status_code == 200
    assert download.headers["content-type"] == "model/gltf-binary"
    assert download.content[:4] == b"glTF"
    scene = trimesh.load(io.BytesIO(download.content), file_type="glb")
    (mesh,) = scene.geometry.values()
    assert len(mesh.vertices) == 32 * 18
    assert mesh.visual.material.baseColorTexture is not None


async def test_a_relief_from_bytes_that_are_not_an_image_fails_as_a_client_error(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = await make_key(credits=100)
    junk = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    body = {"model": "relief-3d", "input": {"image": junk}}
    response = await client.post("/v1/3d/generate", json=body, headers=auth(key))
    if response.status_code == 202:  # the image is only decoded by the backend
        job = await finished(client, response.json()["jobId"], key)
        assert job["status"] == "failed"
        assert "image" in job["error"]
    else:
        assert response.status_code == 400, response.text
