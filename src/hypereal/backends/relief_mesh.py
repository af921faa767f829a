"""Textured relief (height-field) meshes from an image, exported as binary glTF, offline.

:class:`ReliefMesh` is the ``relief-3d`` mesh backend. It is not a generative 3D model: it
lifts the picture into a relief using brightness as a depth proxy (brighter is raised),
textured with the image itself, the way a lithophane or a coin relief works.

The mesh is a regular grid: ``input.resolution`` vertices along the image's longer side
(16-512, default 128) and proportionally many along the shorter one, two triangles per cell,
facing +Z. The longer side spans one unit, centred on the origin, Y up; heights go from 0 to
``input.depth_scale`` units (default 0.15). The luminance is box-averaged onto the grid and
smoothed (Gaussian, ``smoothing`` option) so sensor noise and JPEG blocks do not become
spikes; transparent pixels stay flat. Each vertex carries its UV coordinate and normal; the
material is glTF PBR (metallic-roughness) with the image as ``baseColorTexture``, double
sided, fully rough and non-metallic. Output: ``model/gltf-binary`` (GLB).

Options (all optional):

- ``max_input_pixels``: largest source image accepted (default 40 MP).
- ``max_resolution``: cap on the grid resolution (default 512).
- ``texture_max_side``: the texture is downscaled to at most this many pixels on its longer
  side (default 2048).
- ``smoothing``: Gaussian blur radius applied to the height field, in grid cells (default
  1.0; 0 disables it).

Needs the ``local`` extra (``trimesh`` and ``numpy``); without it the constructor raises
BackendUnavailable.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from PIL import Image

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)
from hypereal.backends.extras import require_local_extra
from hypereal.backends.image_codec import decode_image, input_pixel_cap, pixel_cap_option

try:
    import numpy as np

    # trimesh ships py.typed but leaves most functions unannotated: use it as Any.
    trimesh: Any = importlib.import_module("trimesh")
    _visual: Any = importlib.import_module("trimesh.visual")
    _material: Any = importlib.import_module("trimesh.visual.material")
except ImportError as _exc:  # pragma: no cover - the `local` extra is not installed
    _MISSING: str | None = _exc.name or str(_exc)
else:
    _MISSING = None

__all__ = ["ReliefMesh", "grid_size"]

DEFAULT_RESOLUTION = 128
DEFAULT_DEPTH_SCALE = 0.15
MIN_RESOLUTION = 2


def _client(message: str) -> BackendError:
    return BackendError(message, client_error=True)


def grid_size(image_width: int, image_height: int, resolution: int) -> tuple[int, int]:
    """(columns, rows) of vertices: ``resolution`` along the longer side, the shorter side in
    proportion (at least 2)."""
    if image_width >= image_height:
        rows = max(MIN_RESOLUTION, round(resolution * image_height / image_width))
        return resolution, rows
    columns = max(MIN_RESOLUTION, round(resolution * image_width / image_height))
    return columns, resolution


@dataclass(frozen=True)
class _Relief:
    glb: bytes
    vertices: int
    faces: int
    grid: tuple[int, int]
    texture: tuple[int, int]


def _heights(image: Image.Image, grid: tuple[int, int], smoothing: float) -> Any:
    """Heights in [0, 1] on the ``grid`` (rows x columns), brighter is higher; pixels with
    alpha are scaled by it so transparent areas stay flat."""
    columns, rows = grid
    grey = image.convert("L").resize((columns, rows), Image.Resampling.BOX)
    alpha = None
    if _translucent(image):
        alpha = image.getchannel("A").resize((columns, rows), Image.Resampling.BOX)
    heights = np.asarray(grey, dtype=np.float64) / 255.0
    if smoothing > 0:
        heights = _gaussian_blur(heights, smoothing)
    heights = np.clip(heights, 0.0, 1.0)
    if alpha is not None:
        heights = heights * (np.asarray(alpha, dtype=np.float64) / 255.0)
    return heights


def _gaussian_blur(values: Any, sigma: float) -> Any:
    """Separable Gaussian blur of a 2-D array, borders reflected so they do not sink."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(values, pad, mode="symmetric")
        values = np.apply_along_axis(np.convolve, axis, padded, kernel, mode="valid")
    return values


def _grid_normals(z: Any, xs: Any, ys: Any) -> Any:
    """Unit normals of the surface z(y, x) at each grid vertex, pointing to +Z."""
    dz_dy, dz_dx = np.gradient(z, ys, xs)
    normals = np.stack([-dz_dx, -dz_dy, np.ones_like(z)], axis=-1).reshape(-1, 3)
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def _grid_faces(columns: int, rows: int) -> Any:
    """Two counter-clockwise (seen from +Z) triangles per grid cell."""
    index = np.arange(rows * columns, dtype=np.int64).reshape(rows, columns)
    top_left = index[:-1, :-1].ravel()
    top_right = index[:-1, 1:].ravel()
    bottom_left = index[1:, :-1].ravel()
    bottom_right = index[1:, 1:].ravel()
    first = np.stack([top_left, bottom_left, top_right], axis=1)
    second = np.stack([top_right, bottom_left, bottom_right], axis=1)
    return np.concatenate([first, second])


def _translucent(image: Image.Image) -> bool:
    if image.mode not in ("RGBA", "LA"):
        return False
    low = image.getchannel("A").getextrema()[0]
    return isinstance(low, int | float) and low < 255


def _texture(image: Image.Image, max_side: int) -> Image.Image:
    texture = image.convert("RGBA" if _translucent(image) else "RGB")
    if max(texture.size) > max_side:
        texture = texture.copy()
        texture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return texture


def build_relief(
    image: Image.Image,
    resolution: int,
    depth_scale: float,
    *,
    smoothing: float = 1.0,
    texture_max_side: int = 2048,
) -> _Relief:
    """The textured relief of ``image`` as GLB bytes, with its counts."""
    columns, rows = grid_size(image.width, image.height, resolution)
    heights = _heights(image, (columns, rows), smoothing)
    longer = max(image.width, image.height)
    half_w = image.width / longer / 2
    half_h = image.height / longer / 2
    xs = np.linspace(-half_w, half_w, columns)
    ys = np.linspace(half_h, -half_h, rows)  # row 0 is the top of the image
    grid_x, grid_y = np.meshgrid(xs, ys)
    vertices = np.column_stack([grid_x.ravel(), grid_y.ravel(), (heights * depth_scale).ravel()])
    us, vs = np.meshgrid(np.linspace(0.0, 1.0, columns), np.linspace(1.0, 0.0, rows))
    uv = np.column_stack([us.ravel(), vs.ravel()])  # OpenGL convention; glTF flips on export
    faces = _grid_faces(columns, rows)

    texture = _texture(image, texture_max_side)
    material = _material.PBRMaterial(
        name="relief",
        baseColorTexture=texture,
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0,
        roughnessFactor=1.0,
        doubleSided=True,
        alphaMode="BLEND" if texture.mode == "RGBA" else "OPAQUE",
    )
    visual = _visual.TextureVisuals(uv=uv, material=material)
    # Normals straight from the height field's gradient: exact for a grid, and given to
    # trimesh so the GLB carries smooth normals (its own estimate wants scipy).
    normals = _grid_normals(vertices[:, 2].reshape(rows, columns), xs, ys)
    mesh = trimesh.Trimesh(
        vertices=vertices, faces=faces, vertex_normals=normals, visual=visual, process=False
    )
    scene = trimesh.Scene()
    scene.add_geometry(mesh, geom_name="relief", node_name="relief")
    glb = scene.export(file_type="glb")
    if not isinstance(glb, bytes):  # pragma: no cover - trimesh returns bytes for glb
        raise BackendError("GLB export returned no bytes")
    return _Relief(glb, len(vertices), len(faces), (columns, rows), texture.size)


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _client(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


class ReliefMesh:
    """Offline ``relief-3d`` backend: image -> textured height-field GLB. See the module
    docstring for the geometry and the options."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """Check trimesh/numpy and the options; raises BackendUnavailable when unusable."""
        options = options or {}
        require_local_extra("ReliefMesh", "trimesh and numpy", _MISSING)
        self.max_input_pixels = input_pixel_cap(options)
        self.max_resolution = pixel_cap_option(options, "max_resolution", 512)
        self.texture_max_side = pixel_cap_option(options, "texture_max_side", 2048)
        smoothing = options.get("smoothing", 1.0)
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float):
            raise BackendUnavailable(f"option 'smoothing' must be a number, got {smoothing!r}")
        if not 0 <= smoothing <= 50:
            raise BackendUnavailable(f"option 'smoothing' must be from 0 to 50, got {smoothing}")
        self.smoothing = float(smoothing)

    async def generate_mesh(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Build the relief of ``request.media['image']``; client errors for a missing or
        undecodable image and out-of-range parameters."""
        blob = request.media.get("image")
        if blob is None:
            raise _client("This model lifts an image into a relief: pass it in 'image'")
        resolution = int(
            _number(
                request.input.get("resolution", DEFAULT_RESOLUTION),
                "resolution",
                16,
                self.max_resolution,
            )
        )
        depth_scale = _number(
            request.input.get("depth_scale", DEFAULT_DEPTH_SCALE), "depth_scale", 0.0, 1.0
        )
        await progress(0.05, "decoding the image")

        def work() -> _Relief:
            image = decode_image(blob, max_pixels=self.max_input_pixels, what="input image")
            return build_relief(
                image,
                resolution,
                depth_scale,
                smoothing=self.smoothing,
                texture_max_side=self.texture_max_side,
            )

        relief = await anyio.to_thread.run_sync(work)
        await progress(1.0, "exported GLB")
        return JobResult(
            output=MediaBlob(relief.glb, "model/gltf-binary"),
            data={
                "vertex_count": relief.vertices,
                "face_count": relief.faces,
                "grid": list(relief.grid),
                "texture_size": list(relief.texture),
                "depth_scale": depth_scale,
            },
        )
