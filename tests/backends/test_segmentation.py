"""SelfieSegmentationEdit on a real photo of a person, with the model the mediapipe wheel ships.

The photo is scikit-image's ``astronaut.png`` (public domain, NASA), found on disk without
importing scikit-image so ``pip install --no-deps scikit-image==0.26.0`` is all the tests
need. The tests skip, saying why, when mediapipe or that file is not installed.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageFilter, ImageStat

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ImageBackend,
    ImageRequest,
    MediaBlob,
)
from hypereal.backends.segmentation import SelfieSegmentationEdit

# mediapipe 0.10.21 calls a protobuf 4 API that warns on every segmenter it builds.
pytestmark = pytest.mark.filterwarnings("ignore:MessageFactory class is deprecated:UserWarning")

FORMAT_OF_TYPE = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}

# In the 512x512 astronaut photo: her face and her suit, and two background corners (the
# lower corners hold her helmet and glove, which are rightly part of the person).
PERSON = [(225, 80), (200, 60), (180, 300), (120, 350)]
BACKGROUND = [(5, 5), (506, 5), (30, 30), (480, 60), (60, 100), (400, 150), (506, 200)]


def astronaut_path() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("test photo missing: pip install --no-deps scikit-image==0.26.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"
    if not path.is_file():
        pytest.skip(f"test photo missing at {path}")
    return path


@pytest.fixture(scope="module")
def backend() -> SelfieSegmentationEdit:
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed")
    return SelfieSegmentationEdit({})


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(astronaut_path()) as img:
        return img.convert("RGB")


def blob(img: Image.Image, fmt: str = "PNG") -> MediaBlob:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return MediaBlob(buf.getvalue(), f"image/{fmt.lower()}")


def decoded(out: MediaBlob) -> Image.Image:
    img = Image.open(io.BytesIO(out.data))
    assert img.format == FORMAT_OF_TYPE[out.content_type]
    img.load()
    return img


async def run(
    backend: SelfieSegmentationEdit, prompt: str, images: Sequence[MediaBlob], **fields: Any
) -> MediaBlob:
    outputs = await backend.generate_images(ImageRequest(prompt=prompt, images=images, **fields))
    assert len(outputs) == 1
    return outputs[0]


def rgb_at(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    pixel = img.convert("RGB").getpixel(xy)
    assert isinstance(pixel, tuple)
    return pixel[0], pixel[1], pixel[2]


def alpha_at(img: Image.Image, xy: tuple[int, int]) -> int:
    value = img.getchannel("A").getpixel(xy)
    assert isinstance(value, int)
    return value


def close(a: Sequence[int], b: Sequence[int], tolerance: int) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def test_implements_image_backend_protocol(backend: SelfieSegmentationEdit) -> None:
    assert isinstance(backend, ImageBackend)


@pytest.mark.parametrize("model", ["general", "landscape"])
async def test_remove_background_keeps_the_person_and_clears_the_corners(
    model: str, photo: Image.Image
) -> None:
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed")
    backend = SelfieSegmentationEdit({"model": model})
    out = await run(backend, "remove the background", [blob(photo)])
    assert out.content_type == "image/png"
    img = decoded(out)
    assert (img.mode, img.size) == ("RGBA", photo.size)
    for xy in PERSON:
        assert alpha_at(img, xy) >= 250, xy
        assert rgb_at(img, xy) == rgb_at(photo, xy)  # the person's pixels are untouched
    for xy in BACKGROUND:
        assert alpha_at(img, xy) <= 5, xy
    # Soft edges: the confidence ramp leaves partly transparent pixels along the outline.
    histogram = img.getchannel("A").histogram()
    assert sum(histogram[20:236]) > 1000


async def test_remove_background_as_webp_keeps_alpha(
    backend: SelfieSegmentationEdit, photo: Image.Image
) -> None:
    out = await run(backend, "remove bg", [blob(photo, "JPEG")], output_format="webp")
    assert out.content_type == "image/webp"
    img = decoded(out)
    assert img.mode == "RGBA"
    assert alpha_at(img, (5, 5)) <= 5
    assert alpha_at(img, (225, 80)) >= 250


async def test_remove_background_as_jpeg_composites_on_white(
    backend: SelfieSegmentationEdit, photo: Image.Image
) -> None:
    out = await run(backend, "remove the background", [blob(photo)], output_format="jpeg")
    assert out.content_type == "image/jpeg"
    img = decoded(out)
    for xy in BACKGROUND:
        assert min(rgb_at(img, xy)) >= 245, xy
    for xy in PERSON:
        assert close(rgb_at(img, xy), rgb_at(photo, xy), 30), xy


async def test_replace_background_with_a_named_colour(
    backend: SelfieSegmentationEdit, photo: Image.Image
) -> None:
    out = await run(backend, "Replace the background with light blue", [blob(photo)])
    img = decoded(out)
    assert img.mode == "RGB"
    for xy in BACKGROUND:
        assert rgb_at(img, xy) == (173, 216, 230), xy  # CSS lightblue
    for xy in PERSON:
        assert rgb_at(img, xy) == rgb_at(photo, xy), xy


async def test_replace_background_with_hex_colour_via_params(
    backend: SelfieSegmentationEdit, photo: Image.Image
) -> None:
    params = {"operation": "replace_background", "background_color": "#ff8800"}
    out = await run(backend, "anything", [blob(photo)], params=params, output_format="webp")
    assert out.content_type == "image/webp"
    img = decoded(out)
    for xy in BACKGROUND:
        assert close(rgb_at(img, xy), (255, 136, 0), 12), xy


async def test_replace_background_with_a_second_image(
    backend: SelfieSegmentationEdit, photo: Image.Image
) -> None:
    # Another size and shape than the photo: it is scaled to cover the frame.
    new_background = Image.new("RGB", (300, 200), (200, 0, 200))
    out = await run(
        backend, "replace the background with this image", [blob(photo), blob(new_background)]
    )
    img = decoded(out)
    assert img.size == photo.size
    for xy in BACKGROUND:
        assert close(rgb_at(img, xy), (200, 0, 200), 2), xy
    for xy in PERSON:
        assert rgb_at(img, xy) == rgb_at(photo, xy), xy


async def test_blur_background_smooths_only_the_background(
    backend: SelfieSegmentationEdit, photo: Image.Image
) -> None:
    img = decoded(await run(backend, "blur the background", [blob(photo)]))

    def detail(image: Image.Image, box: tuple[int, int, int, int]) -> float:
        edges = image.convert("L").crop(box).filter(ImageFilter.FIND_EDGES)
        return ImageStat.Stat(edges).mean[0]

    background_box = (0, 0, 120, 150)  # the flag: sharp stripes in the photo
    assert detail(img, background_box) < detail(photo, background_box) / 2
    face_box = (190, 50, 260, 110)
    difference = ImageChops.difference(img.crop(face_box), photo.crop(face_box))
    assert max(ImageStat.Stat(difference).mean) < 1


async def test_request_size_applies_to_the_result(
    backend: SelfieSegmentationEdit, photo: Image.Image
) -> None:
    out = await run(backend, "remove the background", [blob(photo)], width=256, height=128)
    assert decoded(out).size == (256, 128)


async def test_an_image_without_a_person_is_refused(backend: SelfieSegmentationEdit) -> None:
    gradient = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L"),
            Image.linear_gradient("L").rotate(90),
            Image.new("L", (256, 256), 90),
        ),
    )
    with pytest.raises(BackendError) as err:
        await run(backend, "remove the background", [blob(gradient)])
    assert err.value.client_error
    assert "person" in err.value.message


@pytest.mark.parametrize("prompt", ["make her smile", "add a hat", "upscale 2x"])
async def test_unknown_instruction_is_a_client_error(
    backend: SelfieSegmentationEdit, photo: Image.Image, prompt: str
) -> None:
    with pytest.raises(BackendError) as err:
        await run(backend, prompt, [blob(photo)])
    assert err.value.client_error
    for capability in ("remove", "replace", "blur"):
        assert capability in err.value.message


async def test_replace_without_a_colour_or_image_is_a_client_error(
    backend: SelfieSegmentationEdit, photo: Image.Image
) -> None:
    with pytest.raises(BackendError) as err:
        await run(backend, "change the background", [blob(photo)])
    assert err.value.client_error


@pytest.mark.parametrize("data", [b"", b"<html>not an image</html>"])
async def test_undecodable_source_is_a_client_error(
    backend: SelfieSegmentationEdit, data: bytes
) -> None:
    with pytest.raises(BackendError) as err:
        await run(backend, "remove the background", [MediaBlob(data, "image/png")])
    assert err.value.client_error


async def test_missing_source_is_a_client_error(backend: SelfieSegmentationEdit) -> None:
    with pytest.raises(BackendError) as err:
        await run(backend, "remove the background", [])
    assert err.value.client_error


def test_missing_model_is_backend_unavailable(tmp_path: Path) -> None:
    # Holds with and without mediapipe installed: either is reported as unavailable.
    with pytest.raises(BackendUnavailable) as err:
        SelfieSegmentationEdit({"model_path": str(tmp_path / "absent.tflite")})
    assert "mediapipe" in str(err.value)


def test_corrupt_model_is_backend_unavailable(tmp_path: Path) -> None:
    pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed")
    model = tmp_path / "broken.tflite"
    model.write_bytes(b"not a tflite flatbuffer")
    with pytest.raises(BackendUnavailable):
        SelfieSegmentationEdit({"model_path": str(model)})


def test_background_blur_does_not_smear_the_person_into_a_halo() -> None:
    from hypereal.backends.segmentation import _blurred_background

    # Left half "person" (red, matte 255), right half background (blue).
    rgb = Image.new("RGB", (200, 100), (0, 0, 255))
    rgb.paste((255, 0, 0), (0, 0, 100, 100))
    person = Image.new("L", (200, 100), 0)
    person.paste(255, (0, 0, 100, 100))
    blurred = _blurred_background(rgb, person, radius=10)
    # Just outside the person a plain blur would be half red; only background is averaged.
    red, _, blue = rgb_at(blurred, (104, 50))
    assert red <= 10 and blue >= 245
