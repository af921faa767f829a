"""ImageOperations: deterministic Pillow edits, prompt parsing, safe decoding/encoding."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

from hypereal.backends.base import BackendError, ImageBackend, ImageRequest, MediaBlob
from hypereal.backends.image_ops import ImageOperations
from hypereal.backends.image_ops.instructions import plan_request

FORMAT_OF_TYPE = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


def blob(img: Image.Image, fmt: str = "PNG", **save: Any) -> MediaBlob:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return MediaBlob(buf.getvalue(), f"image/{fmt.lower()}")


def decoded(out: MediaBlob) -> Image.Image:
    """Open an output and check its content type names the bytes' real format."""
    img = Image.open(io.BytesIO(out.data))
    assert img.format == FORMAT_OF_TYPE[out.content_type]
    img.load()
    return img


def scene(width: int = 400, height: int = 300) -> Image.Image:
    """A photo stand-in with structure: gradient, a red square top-left, a blue disc."""
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 19, 19), fill=(255, 0, 0))
    draw.ellipse((width // 2, height // 3, width // 2 + 80, height // 3 + 80), fill=(0, 0, 255))
    return img


async def edit(
    prompt: str = "",
    images: Sequence[MediaBlob] | None = None,
    backend: ImageOperations | None = None,
    **fields: Any,
) -> list[MediaBlob]:
    request = ImageRequest(
        prompt=prompt, images=list(images) if images is not None else [blob(scene())], **fields
    )
    return await (backend or ImageOperations({})).generate_images(request)


async def edit_one(prompt: str = "", **kwargs: Any) -> Image.Image:
    outputs = await edit(prompt, **kwargs)
    assert len(outputs) == 1
    return decoded(outputs[0])


def test_implements_image_backend_protocol() -> None:
    assert isinstance(ImageOperations({}), ImageBackend)


async def test_upscale_2x_doubles_dimensions() -> None:
    out = await edit_one("upscale 2x")
    assert out.size == (800, 600)


async def test_upscale_4x_from_params_operation() -> None:
    out = await edit_one("ignored", params={"operation": "upscale", "scale": 4})
    assert out.size == (1600, 1200)


async def test_upscale_is_lanczos_plus_unsharp_mask_not_pixel_repetition() -> None:
    # Soft random texture: every resampler gives a visibly different result on it.
    source = Image.effect_noise((100, 100), 60).filter(ImageFilter.GaussianBlur(1)).convert("RGB")
    out = (await edit_one("upscale 2x", images=[blob(source)])).convert("L")
    nearest = source.resize((200, 200), Image.Resampling.NEAREST).convert("L")
    lanczos = source.resize((200, 200), Image.Resampling.LANCZOS).convert("L")
    # A real resampler interpolates: not the blocky nearest-neighbour image ...
    assert ImageStat.Stat(ImageChops.difference(out, nearest)).mean[0] > 2
    # ... and the unsharp mask raises edge contrast above plain Lanczos.
    laplacian = ImageFilter.Kernel((3, 3), [0, -1, 0, -1, 4, -1, 0, -1, 0], scale=1, offset=128)
    edges_out = ImageStat.Stat(out.filter(laplacian)).stddev[0]
    edges_lanczos = ImageStat.Stat(lanczos.filter(laplacian)).stddev[0]
    assert edges_out > edges_lanczos * 1.2


async def test_upscale_rejects_unsupported_factor() -> None:
    with pytest.raises(BackendError) as err:
        await edit("upscale 7x")
    assert err.value.client_error


async def test_crop_to_aspect_ratio_is_centred() -> None:
    # Row y of the gradient has value y, so the first kept row tells the offset.
    gradient = Image.linear_gradient("L")  # 256x256
    out = await edit_one("crop to 16:9", images=[blob(gradient)])
    assert out.size == (256, 144)
    assert out.getpixel((10, 0)) == (256 - 144) // 2


async def test_crop_box_from_params() -> None:
    source = scene()
    out = await edit_one("crop", images=[blob(source)], params={"crop": "10,5,30,40"})
    assert out.size == (30, 40)
    assert out.getpixel((0, 0)) == source.getpixel((10, 5))


async def test_crop_box_from_prompt_keeps_the_comma_separated_numbers() -> None:
    out = await edit_one("crop 0,0,20,20 and convert to png")
    assert out.size == (20, 20)
    assert out.convert("RGB").getpixel((10, 10)) == (255, 0, 0)


async def test_crop_box_outside_the_image_is_a_client_error() -> None:
    with pytest.raises(BackendError) as err:
        await edit("crop", params={"crop": "390,0,50,50"})
    assert err.value.client_error


async def test_make_it_square() -> None:
    assert (await edit_one("make it square")).size == (300, 300)


@pytest.mark.parametrize(
    ("prompt", "fields", "size"),
    [
        ("resize to 200x100", {}, (200, 100)),  # cover: exact size, centre-cropped
        ("resize to 50%", {}, (200, 150)),
        ("resize to 100px", {}, (100, 75)),  # longest side
        ("shrink to 120 wide", {}, (120, 90)),
        ("scale by 0.25", {}, (100, 75)),
        ("resize", {"width": 80, "height": 80}, (80, 80)),
        ("resize to 200x100", {"params": {"fit": "contain"}}, (133, 100)),
        ("resize to 200x100", {"params": {"fit": "stretch"}}, (200, 100)),
        ("ignored", {"params": {"operation": "resize", "width": 40}}, (40, 30)),
    ],
)
async def test_resize_gives_the_requested_dimensions(
    prompt: str, fields: dict[str, Any], size: tuple[int, int]
) -> None:
    assert (await edit_one(prompt, **fields)).size == size


async def test_resize_without_a_size_is_a_client_error() -> None:
    with pytest.raises(BackendError) as err:
        await edit("resize it")
    assert err.value.client_error
    assert "800x600" in err.value.message


@pytest.mark.parametrize(
    ("fields", "content_type"),
    [
        ({"output_format": "png"}, "image/png"),
        ({"output_format": "jpeg"}, "image/jpeg"),
        ({"output_format": "webp"}, "image/webp"),
    ],
)
async def test_output_format_sets_bytes_and_content_type(
    fields: dict[str, Any], content_type: str
) -> None:
    (out,) = await edit("rotate 180", **fields)
    assert out.content_type == content_type
    assert decoded(out).size == (400, 300)


async def test_convert_to_webp_from_the_prompt_overrides_the_default_png() -> None:
    (out,) = await edit("convert to webp", images=[blob(scene(), "JPEG")])
    assert out.content_type == "image/webp"
    assert decoded(out).size == (400, 300)


async def test_quality_changes_jpeg_size() -> None:
    (low,) = await edit("convert to jpeg", params={"quality": 10})
    (high,) = await edit("convert to jpeg quality 95")
    assert decoded(low).format == decoded(high).format == "JPEG"
    assert len(low.data) < len(high.data) / 2


async def test_transparent_pixels_become_white_in_jpeg() -> None:
    img = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (25, 0, 50, 50))
    out = (await edit_one("convert to jpeg", images=[blob(img)])).convert("RGB")
    left, right = out.getpixel((5, 25)), out.getpixel((45, 25))
    assert isinstance(left, tuple) and isinstance(right, tuple)
    assert min(left) > 245
    assert right[2] > 200 and right[0] < 40


async def test_png_and_webp_keep_transparency() -> None:
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    for fmt in ("png", "webp"):
        out = await edit_one("flip", images=[blob(img)], output_format=fmt)
        assert out.mode == "RGBA"
        assert out.getpixel((5, 5))[3] == 0  # type: ignore[index]


async def test_rotate_90_is_clockwise() -> None:
    # Red square top-left; a quarter turn clockwise puts it top-right.
    out = (await edit_one("rotate 90")).convert("RGB")
    assert out.size == (300, 400)
    assert out.getpixel((295, 5)) == (255, 0, 0)


async def test_rotate_left_is_counterclockwise() -> None:
    out = (await edit_one("rotate left")).convert("RGB")
    assert out.size == (300, 400)
    assert out.getpixel((5, 395)) == (255, 0, 0)


async def test_free_rotation_expands_with_transparent_corners() -> None:
    out = await edit_one("rotate 45 degrees")
    assert out.mode == "RGBA"
    assert out.width > 400 and out.height > 300
    assert out.getpixel((0, 0))[3] == 0  # type: ignore[index]


@pytest.mark.parametrize(
    ("prompt", "where"),
    [("flip horizontal", (395, 5)), ("mirror it", (395, 5)), ("flip vertically", (5, 295))],
)
async def test_flip(prompt: str, where: tuple[int, int]) -> None:
    out = (await edit_one(prompt)).convert("RGB")
    assert out.size == (400, 300)
    assert out.getpixel(where) == (255, 0, 0)
    assert out.getpixel((5, 5)) != (255, 0, 0)


async def test_black_and_white_makes_a_grayscale_image() -> None:
    out = await edit_one("make it black and white")
    assert out.mode == "L"
    assert out.getpixel((5, 5)) == 76  # ITU-R 601 luma of pure red


async def test_chained_instructions_run_in_order() -> None:
    (out,) = await edit("crop to square, then upscale 2x and convert to webp")
    assert out.content_type == "image/webp"
    assert decoded(out).size == (600, 600)


async def test_request_size_is_honoured_when_the_prompt_does_not_resize() -> None:
    out = await edit_one("make it black and white", width=100, height=50)
    assert (out.size, out.mode) == ((100, 50), "L")


async def test_request_aspect_ratio_is_honoured() -> None:
    assert (await edit_one("flip", aspect_ratio="1:1")).size == (300, 300)


@pytest.mark.parametrize(
    "prompt", ["add a hat", "remove the background", "make it black and white and add a rainbow"]
)
async def test_unknown_instruction_is_a_client_error_listing_capabilities(prompt: str) -> None:
    with pytest.raises(BackendError) as err:
        await edit(prompt)
    assert err.value.client_error
    for capability in ("crop", "resize", "upscale", "rotate", "flip", "grayscale", "webp"):
        assert capability in err.value.message


async def test_unknown_params_operation_is_a_client_error() -> None:
    with pytest.raises(BackendError) as err:
        await edit("x", params={"operation": "inpaint"})
    assert err.value.client_error
    assert "upscale" in err.value.message


async def test_an_empty_instruction_is_refused_not_echoed() -> None:
    with pytest.raises(BackendError) as err:
        await edit("please")
    assert err.value.client_error


@pytest.mark.parametrize(
    "data", [b"", b"definitely not an image", blob(scene()).data[:200]], ids=str
)
async def test_undecodable_source_is_a_client_error(data: bytes) -> None:
    with pytest.raises(BackendError) as err:
        await edit("rotate 90", images=[MediaBlob(data, "image/png")])
    assert err.value.client_error


async def test_missing_source_is_a_client_error() -> None:
    with pytest.raises(BackendError) as err:
        await edit("rotate 90", images=[])
    assert err.value.client_error


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with almost no pixel data: the
    shape of a decompression bomb, without building one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


async def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A valid 8000x8000 PNG of 8 KB that would decode to 64 MP, over the 40 MP default cap.
    bomb = blob(Image.new("1", (8_000, 8_000)))
    assert len(bomb.data) < 20_000
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        await edit("rotate 90", images=[bomb])
    assert err.value.client_error
    assert "40,000,000" in err.value.message
    assert time.monotonic() - started < 1  # refused from the header, nothing was decoded


async def test_header_claiming_billions_of_pixels_is_refused() -> None:
    with pytest.raises(BackendError) as err:
        await edit("rotate 90", images=[MediaBlob(png_header_only(60_000, 60_000), "image/png")])
    assert err.value.client_error


async def test_pillow_bomb_limit_still_applies_when_our_cap_is_raised() -> None:
    backend = ImageOperations({"max_input_pixels": 10**10})
    with pytest.raises(BackendError) as err:
        await edit(
            "rotate 90", images=[MediaBlob(png_header_only(60_000, 60_000), "")], backend=backend
        )
    assert err.value.client_error


async def test_max_input_pixels_option() -> None:
    backend = ImageOperations({"max_input_pixels": 10_000})
    with pytest.raises(BackendError) as err:
        await edit("rotate 90", backend=backend)  # 400x300 = 120,000 pixels
    assert err.value.client_error
    assert "10,000" in err.value.message


async def test_max_output_pixels_stops_an_upscale_before_it_runs() -> None:
    backend = ImageOperations({"max_output_pixels": 200_000})
    with pytest.raises(BackendError) as err:
        await edit("upscale 2x", backend=backend)  # 800x600 = 480,000 pixels
    assert err.value.client_error


async def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    source = blob(scene(), "JPEG", exif=exif)
    assert (await edit_one("convert to png", images=[source])).size == (300, 400)


async def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    deep = Image.new("I;16", (20, 20), 32768)  # mid grey in 16 bits
    out = await edit_one("convert to png", images=[blob(deep)])
    assert out.mode == "L"
    assert 120 <= out.getpixel((5, 5)) <= 135  # type: ignore[operator]


async def test_each_source_image_is_edited() -> None:
    outputs = await edit("upscale 2x", images=[blob(scene(100, 50)), blob(scene(30, 60))])
    assert [decoded(o).size for o in outputs] == [(200, 100), (60, 120)]


async def test_work_runs_off_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.005)
            ticks += 1

    big = blob(scene(1500, 1500))
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        started = time.monotonic()
        await edit("upscale 2x", images=[big])
        elapsed = time.monotonic() - started
        tg.cancel_scope.cancel()
    # A loop blocked by the edit could not have ticked while it ran.
    assert elapsed > 0.05
    assert ticks >= 3


def test_an_instruction_is_planned_without_decoding_anything() -> None:
    plan = plan_request(ImageRequest(prompt="crop to 16:9 and convert to webp quality 70"))
    assert [step.op for step in plan.steps] == ["crop"]
    assert plan.output_format == "webp" and plan.quality == 70
    with pytest.raises(BackendError) as err:
        plan_request(ImageRequest(prompt="paint it like van gogh"))
    assert err.value.client_error
