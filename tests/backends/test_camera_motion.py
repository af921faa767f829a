"""CameraMotionVideo: real H.264 MP4s from a still image, checked by decoding them with PyAV
and measuring the camera move between the first and the last frame."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import Mapping
from typing import Any

import pytest
from PIL import Image, ImageDraw

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    JobRequest,
    JobResult,
    MediaBlob,
    VideoBackend,
)

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")

from hypereal.backends.camera_motion import (  # noqa: E402 - after the importorskips
    CameraMotionVideo,
    motion_from_prompt,
    output_size,
)


def textured(width: int = 320, height: int = 180, seed: int = 0) -> Image.Image:
    """Smooth random blobs plus a few shapes: structure at every position, so shifts and
    scalings are measurable anywhere in the frame."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 20, 60, 60), fill=(255, 0, 0))
    draw.ellipse((width - 90, height - 80, width - 30, height - 20), fill=(0, 0, 255))
    return img


def png(img: Image.Image) -> MediaBlob:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return MediaBlob(buf.getvalue(), "image/png")


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    async def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))


async def animate(
    fields: Mapping[str, Any],
    image: Image.Image | MediaBlob | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> JobResult:
    defaults = {"duration": 1, "fps": 8, "resolution": "480p"}
    media: dict[str, MediaBlob] = {}
    if image is not None:
        media["image"] = image if isinstance(image, MediaBlob) else png(image)
    request = JobRequest(job_id="job-1", input={**defaults, **fields}, media=media)
    return await CameraMotionVideo(options).generate_video(request, progress or Progress())


def decode(data: bytes) -> tuple[Any, list[Any]]:
    """(video stream, frames as RGB arrays)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return stream, frames


def grey(frame: Any) -> Any:
    return frame.astype(np.float64).mean(axis=2)


def shift_between(first: Any, last: Any) -> tuple[float, float]:
    """(dx, dy) that moves ``first``'s content onto ``last``'s, by phase correlation."""
    a, b = grey(first), grey(last)
    a -= a.mean()
    b -= b.mean()
    window = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    spectrum = np.fft.fft2(b * window) * np.conj(np.fft.fft2(a * window))
    correlation = np.abs(np.fft.ifft2(spectrum / (np.abs(spectrum) + 1e-9)))
    dy, dx = np.unravel_index(int(np.argmax(correlation)), correlation.shape)
    height, width = a.shape
    dy = dy - height if dy > height // 2 else dy
    dx = dx - width if dx > width // 2 else dx
    return float(dx), float(dy)


def best_zoom(small: Any, large: Any) -> float:
    """The factor f for which ``large`` best matches the centre 1/f of ``small`` blown up."""
    height, width = small.shape[:2]
    source = Image.fromarray(small)
    errors = {}
    for factor in (1.0, 1.1, 1.2, 1.3, 1.4, 1.5):
        crop_w, crop_h = width / factor, height / factor
        box = (
            (width - crop_w) / 2,
            (height - crop_h) / 2,
            (width + crop_w) / 2,
            (height + crop_h) / 2,
        )
        scaled = np.asarray(source.resize((width, height), Image.Resampling.BICUBIC, box=box))
        errors[factor] = float(np.mean((grey(scaled) - grey(large)) ** 2))
    return min(errors, key=lambda f: errors[f])


# ------------------------------------------------------------------------- container


async def test_output_is_a_faststart_h264_mp4_with_exactly_duration_times_fps_frames() -> None:
    progress = Progress()
    result = await animate(
        {"prompt": "pan right", "duration": 2, "fps": 12}, textured(), progress=progress
    )
    assert isinstance(CameraMotionVideo({}), VideoBackend)
    assert result.output.content_type == "video/mp4"
    data = result.output.data
    assert data[4:8] == b"ftyp"
    # +faststart: the index (moov) precedes the media data, so players can stream it.
    assert 0 < data.find(b"moov") < data.find(b"mdat")

    stream, frames = decode(data)
    assert stream.codec_context.name == "h264"
    assert stream.codec_context.pix_fmt == "yuv420p"
    assert len(frames) == 24
    assert stream.average_rate == 12
    assert float(stream.duration * stream.time_base) == pytest.approx(2.0)
    # 320x180 is 16:9: 480p gives 854x480 (853.3 rounded to even).
    assert (stream.codec_context.width, stream.codec_context.height) == (854, 480)
    assert frames[0].shape == (480, 854, 3)
    assert result.data == {
        "duration_seconds": 2.0,
        "fps": 12,
        "frames": 24,
        "width": 854,
        "height": 480,
        "motion": "pan-right",
        "codec": "h264",
    }

    fractions = [f for f, _ in progress.calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len(fractions) >= 4  # reported while encoding, not only at the ends


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [
        ((301, 451), "480p", (480, 720)),  # portrait, odd sides
        ((300, 300), "720p", (720, 720)),
        ((1000, 100), "480p", (1120, 480)),  # 10:1 clamped to 21:9
        ((640, 480), "1080p", (1440, 1080)),
    ],
)
def test_output_size_keeps_the_aspect_with_even_sides(
    size: tuple[int, int], resolution: str, expected: tuple[int, int]
) -> None:
    short = {"480p": 480, "720p": 720, "1080p": 1080}[resolution]
    width, height = output_size(*size, short)
    assert (width, height) == expected
    assert width % 2 == 0 and height % 2 == 0


async def test_odd_sized_portrait_image_gives_even_portrait_video() -> None:
    result = await animate({"prompt": "zoom out", "fps": 10}, textured(181, 321))
    stream, frames = decode(result.output.data)
    assert (stream.codec_context.width, stream.codec_context.height) == (480, 852)
    assert len(frames) == 10


# --------------------------------------------------------------------------- motion


@pytest.mark.parametrize(
    ("prompt", "motion"),
    [
        ("slow pan left across the valley", "pan-left"),
        ("The camera pans to the right", "pan-right"),
        ("tilt up to the sky", "pan-up"),
        ("camera moves down", "pan-down"),
        ("zoom in on the face", "zoom-in"),
        ("slowly zooming out", "zoom-out"),
        ("pull back to reveal the city", "zoom-out"),
        ("dolly in", "zoom-in"),
        ("orbit around the statue", "orbit"),
        ("3D parallax effect", "orbit"),
        ("the camera circles around the car", "orbit"),
        ("a dog running around the garden", None),
        ("a panning shot of the skyline", "pan-right"),
        ("zoom in, then pan left", "zoom-in"),  # the first move named wins
        ("a cat sleeping on a sofa", None),
        ("", None),
    ],
)
def test_motion_is_read_from_the_prompt(prompt: str, motion: str | None) -> None:
    assert motion_from_prompt(prompt)[0] == motion


def test_slow_and_fast_words_scale_the_move() -> None:
    assert motion_from_prompt("slow pan left")[1] < 1 < motion_from_prompt("fast pan left")[1]
    assert motion_from_prompt("pan left")[1] == 1


@pytest.mark.parametrize(
    ("prompt", "direction"),
    [
        ("pan left", (1, 0)),  # the camera turns left: the picture slides right
        ("pan right", (-1, 0)),
        ("tilt up", (0, 1)),
        ("pan down", (0, -1)),
    ],
)
async def test_pans_slide_the_picture_the_opposite_way(
    prompt: str, direction: tuple[int, int]
) -> None:
    result = await animate({"prompt": prompt}, textured())
    _, frames = decode(result.output.data)
    dx, dy = shift_between(frames[0], frames[-1])
    width, height = 854, 480
    # A full-speed pan travels a quarter of the frame: (1.25 - 1) x the side.
    if direction[0]:
        assert dx * direction[0] == pytest.approx(0.25 * width, abs=6)
        assert abs(dy) <= 3
    else:
        assert dy * direction[1] == pytest.approx(0.25 * height, abs=6)
        assert abs(dx) <= 3


async def test_moves_are_eased_in_and_out() -> None:
    result = await animate({"prompt": "pan left", "fps": 12}, textured())
    _, frames = decode(result.output.data)
    # Half resolution is plenty to see each step's size, and four times cheaper.
    halved = [frame[::2, ::2] for frame in frames]
    steps = [shift_between(a, b)[0] for a, b in itertools.pairwise(halved)]
    # Slow at both ends, fastest in the middle; always the same direction.
    assert all(step >= 0 for step in steps)
    assert steps[0] < steps[len(steps) // 2] and steps[-1] < steps[len(steps) // 2]


async def test_zoom_in_ends_on_the_magnified_centre_and_zoom_out_starts_there() -> None:
    zoom_in = decode((await animate({"prompt": "zoom in"}, textured())).output.data)[1]
    assert best_zoom(zoom_in[0], zoom_in[-1]) == 1.3
    zoom_out = decode((await animate({"prompt": "zoom out"}, textured())).output.data)[1]
    assert best_zoom(zoom_out[-1], zoom_out[0]) == 1.3


async def test_no_camera_word_gives_a_slow_zoom_in() -> None:
    result = await animate({"prompt": "a quiet lake at dawn"}, textured())
    assert result.data is not None and result.data["motion"] == "zoom-in"
    _, frames = decode(result.output.data)
    assert best_zoom(frames[0], frames[-1]) == 1.2  # 1 + 0.3 x 0.6


async def test_explicit_motion_field_wins_over_the_prompt() -> None:
    result = await animate({"prompt": "zoom in", "motion": "pan-right"}, textured())
    assert result.data is not None and result.data["motion"] == "pan-right"
    _, frames = decode(result.output.data)
    assert shift_between(frames[0], frames[-1])[0] < -150


async def test_orbit_moves_near_and_far_layers_apart() -> None:
    result = await animate({"prompt": "orbit", "fps": 8}, textured(seed=3))
    assert result.data is not None and result.data["motion"] == "orbit"
    _, frames = decode(result.output.data)
    first, last = frames[0], frames[-1]
    band = 480 // 5
    far_dx, _ = shift_between(first[:band], last[:band])  # top: far
    near_dx, _ = shift_between(first[-band:], last[-band:])  # bottom: near
    # Near content travels to the right, far content to the left, by tens of pixels.
    assert near_dx > 20
    assert far_dx < -5
    assert near_dx - far_dx > 50


# ---------------------------------------------------------------------------- errors


async def test_missing_image_is_a_client_error() -> None:
    with pytest.raises(BackendError) as info:
        await animate({"prompt": "pan left"})
    assert info.value.client_error


async def test_bytes_that_are_not_an_image_are_a_client_error() -> None:
    with pytest.raises(BackendError) as info:
        await animate({"prompt": "pan left"}, MediaBlob(b"%PDF-1.4 not an image", "image/png"))
    assert info.value.client_error
    assert "not a decodable image" in info.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"motion": "spin"},
        {"resolution": "4k"},
        {"duration": 0},
        {"duration": 999},
        {"fps": 0},
        {"fps": "24"},
    ],
)
async def test_bad_fields_are_client_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(BackendError) as info:
        await animate(fields, textured())
    assert info.value.client_error


def test_unknown_encoder_option_makes_the_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match=r"no H\.264 encoder"):
        CameraMotionVideo({"codec": "no-such-encoder"})
    with pytest.raises(BackendUnavailable):
        CameraMotionVideo({"crf": 99})


async def test_cancelling_the_job_stops_the_encoder_thread() -> None:
    progress = Progress()
    task = asyncio.ensure_future(
        animate({"prompt": "pan left", "duration": 20, "fps": 24}, textured(), progress=progress)
    )
    for _ in range(600):  # until the encoder has reported some frames (bounded)
        if any(message.startswith("encoded") for _, message in progress.calls):
            break
        await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)  # a frame in flight may still report
    reported = len(progress.calls)
    await asyncio.sleep(1.5)
    # A thread left rendering would go on posting "encoded n/480 frames" every 24 frames.
    assert len(progress.calls) == reported
    assert progress.calls[-1][0] < 0.95
