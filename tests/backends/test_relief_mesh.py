"""ReliefMesh: a textured height-field GLB from an image, read back with trimesh and by
parsing the binary glTF container itself."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import pytest
from PIL import Image, ImageDraw

from hypereal.backends.base import BackendError, JobRequest, JobResult, MediaBlob, MeshBackend

np = pytest.importorskip("numpy")
trimesh = pytest.importorskip("trimesh")

from hypereal.backends.relief_mesh import ReliefMesh, grid_size  # noqa: E402


def png(img: Image.Image) -> MediaBlob:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return MediaBlob(buf.getvalue(), "image/png")


def halves(width: int = 200, height: int = 100) -> Image.Image:
    """Black left half, white right half, a red mark top-left (texture orientation)."""
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rectangle((width // 2, 0, width, height), fill=(255, 255, 255))
    draw.rectangle((0, 0, 9, 9), fill=(255, 0, 0))
    return img


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    async def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))


async def relief(
    fields: dict[str, Any] | None = None,
    image: Image.Image | MediaBlob | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> JobResult:
    media: dict[str, MediaBlob] = {}
    if image is not None:
        media["image"] = image if isinstance(image, MediaBlob) else png(image)
    request = JobRequest(job_id="job-1", input=fields or {}, media=media)
    return await ReliefMesh(options).generate_mesh(request, progress or Progress())


def glb_json(data: bytes) -> dict[str, Any]:
    """The JSON chunk of a GLB, after checking the container header."""
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    chunk_length, chunk_type = struct.unpack("<I4s", data[12:20])
    assert chunk_type == b"JSON"
    parsed: dict[str, Any] = json.loads(data[20 : 20 + chunk_length])
    return parsed


def load(data: bytes) -> Any:
    scene = trimesh.load(io.BytesIO(data), file_type="glb")
    (mesh,) = scene.geometry.values()
    return mesh


async def test_glb_is_a_textured_grid_with_the_expected_counts() -> None:
    progress = Progress()
    result = await relief({"resolution": 40, "depth_scale": 0.2}, halves(), progress)
    assert isinstance(ReliefMesh({}), MeshBackend)
    assert result.output.content_type == "model/gltf-binary"
    assert result.output.data[:4] == b"glTF"

    # 200x100 with 40 along the longer side: 40 x 20 vertices, 2 triangles per cell.
    assert result.data == {
        "vertex_count": 800,
        "face_count": 2 * 39 * 19,
        "grid": [40, 20],
        "texture_size": [200, 100],
        "depth_scale": 0.2,
    }
    mesh = load(result.output.data)
    assert len(mesh.vertices) == 800
    assert len(mesh.faces) == 2 * 39 * 19
    # The longer side spans one unit, centred; heights from 0 to depth_scale.
    (min_x, min_y, min_z), (max_x, max_y, max_z) = mesh.bounds
    assert (min_x, max_x) == pytest.approx((-0.5, 0.5))
    assert (min_y, max_y) == pytest.approx((-0.25, 0.25))
    assert min_z >= -1e-6 and max_z <= 0.2 + 1e-6
    # Faces point to the viewer (+Z).
    assert (mesh.face_normals[:, 2] > 0).all()

    texture = mesh.visual.material.baseColorTexture
    assert texture is not None and texture.size == (200, 100)
    assert mesh.visual.uv.shape == (800, 2)
    assert progress.calls[-1][0] == 1.0


async def test_gltf_has_uvs_normals_and_a_pbr_base_colour_texture() -> None:
    result = await relief({"resolution": 16}, halves())
    gltf = glb_json(result.output.data)
    (primitive,) = gltf["meshes"][0]["primitives"]
    assert {"POSITION", "NORMAL", "TEXCOORD_0"} <= set(primitive["attributes"])
    material = gltf["materials"][primitive["material"]]
    texture = gltf["textures"][material["pbrMetallicRoughness"]["baseColorTexture"]["index"]]
    image = gltf["images"][texture["source"]]
    assert image["mimeType"] in ("image/png", "image/jpeg")
    assert material["doubleSided"] is True
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0.0
    assert material.get("alphaMode", "OPAQUE") == "OPAQUE"


async def test_brightness_raises_the_surface() -> None:
    result = await relief({"resolution": 64, "depth_scale": 0.3}, halves())
    mesh = load(result.output.data)
    x, z = mesh.vertices[:, 0], mesh.vertices[:, 2]
    # Away from the edge (smoothing blends across it) and the red corner mark: black is
    # flat, white is raised.
    assert z[(x < -0.1) & (x > -0.35)].max() < 0.02
    assert z[x > 0.1].min() > 0.28


async def test_texture_coordinates_put_the_image_the_right_way_up() -> None:
    result = await relief({"resolution": 32}, halves())
    mesh = load(result.output.data)
    texture = mesh.visual.material.baseColorTexture.convert("RGB")
    # The top-left vertex must sample the red mark in the image's top-left corner.
    corner = int(np.argmin(mesh.vertices[:, 0] - mesh.vertices[:, 1]))
    u, v = mesh.visual.uv[corner]  # trimesh uses OpenGL UVs: v = 0 is the image bottom
    pixel = texture.getpixel(
        (round(u * (texture.width - 1)), round((1 - v) * (texture.height - 1)))
    )
    assert pixel == (255, 0, 0)


async def test_depth_scale_zero_is_flat() -> None:
    mesh = load((await relief({"resolution": 16, "depth_scale": 0.0}, halves())).output.data)
    assert np.allclose(mesh.vertices[:, 2], 0.0)


async def test_transparent_areas_stay_flat_and_the_material_blends() -> None:
    img = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    ImageDraw.Draw(img).rectangle((32, 0, 63, 63), fill=(255, 255, 255, 255))
    result = await relief({"resolution": 32, "depth_scale": 0.1}, img, smoothing=0)
    mesh = load(result.output.data)
    x, z = mesh.vertices[:, 0], mesh.vertices[:, 2]
    assert np.allclose(z[x < -0.05], 0.0) and np.allclose(z[x > 0.05], 0.1)
    material = glb_json(result.output.data)["materials"][0]
    assert material["alphaMode"] == "BLEND"


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [((200, 100), 40, (40, 20)), ((100, 300), 30, (10, 30)), ((1000, 10), 16, (16, 2))],
)
def test_grid_follows_the_aspect_ratio(
    size: tuple[int, int], resolution: int, expected: tuple[int, int]
) -> None:
    assert grid_size(*size, resolution) == expected


async def test_portrait_image_and_default_resolution() -> None:
    result = await relief({}, halves(90, 180))
    assert result.data is not None and result.data["grid"] == [64, 128]
    assert len(load(result.output.data).vertices) == 64 * 128


async def test_large_images_get_a_capped_texture() -> None:
    result = await relief({"resolution": 16}, halves(400, 200), texture_max_side=100)
    assert result.data is not None and result.data["texture_size"] == [100, 50]
    assert load(result.output.data).visual.material.baseColorTexture.size == (100, 50)


async def test_missing_image_is_a_client_error() -> None:
    with pytest.raises(BackendError) as info:
        await relief({"resolution": 16})
    assert info.value.client_error


async def test_bytes_that_are_not_an_image_are_a_client_error() -> None:
    with pytest.raises(BackendError) as info:
        await relief({}, MediaBlob(b"GIF89a-but-truncated", "image/gif"))
    assert info.value.client_error


@pytest.mark.parametrize(
    "fields", [{"resolution": 8}, {"resolution": 4096}, {"depth_scale": -1}, {"depth_scale": "x"}]
)
async def test_out_of_range_fields_are_client_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(BackendError) as info:
        await relief(fields, halves())
    assert info.value.client_error
