"""Background removal, replacement and blur with MediaPipe selfie segmentation, offline.

:class:`SelfieSegmentationEdit` is an ``image-edit`` backend that separates *people* from
their background with MediaPipe's selfie segmentation model and then removes (transparent
PNG/WebP), recolours, swaps (second image) or blurs the background. The model is the
``selfie_segmentation.tflite`` (256x256, or the 144x256 landscape variant) that the
``mediapipe==0.10.21`` wheel ships under ``mediapipe/modules/selfie_segmentation/``; it is run
through the MediaPipe Tasks ``ImageSegmenter`` and nothing is downloaded at run time.

The model only knows people: an image in which it finds none is refused with a client
error rather than answered with an empty cut-out.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from PIL import Image, ImageChops, ImageFilter, ImageMath, ImageOps

from hypereal.backends.base import BackendError, BackendUnavailable, ImageRequest, MediaBlob
from hypereal.backends.image_codec import (
    DEFAULT_MAX_INPUT_PIXELS,
    DEFAULT_MAX_OUTPUT_PIXELS,
    decode_image,
    encode_image,
    normalise_format,
    pixel_cap_option,
)
from hypereal.backends.image_ops import apply_request_geometry, parse_colour

__all__ = ["MEDIAPIPE_INSTALL", "SelfieSegmentationEdit"]

MEDIAPIPE_INSTALL = (
    "pip install --no-deps mediapipe==0.10.21 && pip install numpy==1.26.4 protobuf==4.25.9 "
    "opencv-python-headless==4.11.0.86 matplotlib==3.11.2 attrs==26.1.0"
)

# Models shipped inside the mediapipe 0.10.21 wheel (later releases no longer ship them).
_SHIPPED_MODELS: Mapping[str, str] = {
    "general": "modules/selfie_segmentation/selfie_segmentation.tflite",
    "landscape": "modules/selfie_segmentation/selfie_segmentation_landscape.tflite",
}

_OPERATIONS = ("remove_background", "replace_background", "blur_background")
_OPERATION_ALIASES: Mapping[str, str] = {
    "remove_background": "remove_background",
    "remove_bg": "remove_background",
    "remove": "remove_background",
    "background_removal": "remove_background",
    "cutout": "remove_background",
    "replace_background": "replace_background",
    "replace_bg": "replace_background",
    "replace": "replace_background",
    "background_replacement": "replace_background",
    "change_background": "replace_background",
    "blur_background": "blur_background",
    "blur_bg": "blur_background",
    "blur": "blur_background",
    "background_blur": "blur_background",
    "portrait": "blur_background",
}

CAPABILITIES = (
    "this model separates people from their background (MediaPipe selfie segmentation) and "
    "can: remove the background ('remove the background': transparent PNG/WebP, white behind "
    "JPEG), replace it with a colour ('replace the background with light blue', '#ff8800') or "
    "with a second image (images[1]), or blur it ('blur the background'); params.operation: "
    + ", ".join(_OPERATIONS)
)

# The mask is fed at most this large: the model itself sees 256 px, so a bigger input only
# costs time, and the mask is scaled back up to the full image with a smooth filter.
_INFERENCE_SIDE = 1024


@dataclass(frozen=True)
class _Edit:
    operation: str  # one of _OPERATIONS
    colour: tuple[int, int, int] | None = None  # replace with a colour / JPEG matte
    use_second_image: bool = False
    blur_radius: float | None = None


def _client(message: str) -> BackendError:
    return BackendError(message, client_error=True)


def _fraction_option(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise BackendUnavailable(f"option {name!r} must be a number from 0 to 1, got {value!r}")
    return float(value)


def _load_mediapipe() -> tuple[Any, Any, Any]:
    """Import mediapipe (no type stubs, hence Any) or say how to install it."""
    try:
        mp = importlib.import_module("mediapipe")
        tasks = importlib.import_module("mediapipe.tasks.python")
        vision = importlib.import_module("mediapipe.tasks.python.vision")
    except Exception as exc:
        # Not only ImportError: a mediapipe built against numpy 1 / protobuf 4 fails with
        # ImportError, AttributeError or TypeError depending on which dependency is too new.
        raise BackendUnavailable(
            f"SelfieSegmentationEdit needs mediapipe 0.10.21 ({type(exc).__name__}: {exc}). "
            f"Install it with: {MEDIAPIPE_INSTALL}"
        ) from exc
    return mp, tasks, vision


def _colour_near_background(text: str) -> tuple[int, int, int] | None:
    """A colour named next to the word "background": 'blue background', 'background to
    light blue', 'background with #336699'. Words elsewhere ("man in a white shirt") are
    not read as the colour."""
    hex_match = re.search(r"#[0-9a-f]{3}(?:[0-9a-f]{3})?\b|rgb\([^)]*\)", text)
    if hex_match is not None:
        return parse_colour(hex_match.group(0))
    candidates: list[str] = []
    after = re.search(
        r"\b(?:background|backdrop|bg)\b.*?\b(?:to|with|into|as|for|make it|turn it|be)\s+"
        r"(?:a |an |the )?"
        r"(?:solid |plain |pure |flat )?([a-z][a-z -]*)",
        text,
    )
    if after is not None:
        words = after.group(1).split()[:3]
        candidates += [" ".join(words[:n]) for n in range(len(words), 0, -1)]
    # "make the background white": the colour right after the word.
    right_after = re.search(r"\b(?:background|backdrop|bg)\s+(?:colou?r\s+)?([a-z][a-z -]*)", text)
    if right_after is not None:
        words = right_after.group(1).split()[:3]
        candidates += [" ".join(words[:n]) for n in range(len(words), 0, -1)]
    before = re.search(r"([a-z][a-z -]*?)\s+(?:colou?r(?:ed)?\s+)?(?:background|backdrop)\b", text)
    if before is not None:
        words = before.group(1).split()[-3:]
        candidates += [" ".join(words[-n:]) for n in range(len(words), 0, -1)]
    for candidate in candidates:
        colour = parse_colour(candidate)
        if colour is not None:
            return colour
    return None


def _parse_radius(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 250:
        raise _client("Invalid value for 'blur_radius': must be a number of pixels, 0 to 250")
    return float(value)


def _resolve_edit(request: ImageRequest) -> _Edit:
    """Decide the edit from params.operation, else from the prompt."""
    params = request.params
    explicit = params.get("background_color", params.get("background_colour"))
    colour: tuple[int, int, int] | None = None
    if explicit is not None:
        colour = parse_colour(str(explicit))
        if colour is None:
            raise _client(
                f"Invalid background_color {explicit!r}: use a CSS colour name or #rrggbb"
            )
    radius = _parse_radius(params.get("blur_radius"))
    has_second = len(request.images) > 1

    operation = params.get("operation")
    if operation:
        key = re.sub(r"[\s-]+", "_", str(operation).strip().lower())
        resolved = _OPERATION_ALIASES.get(key)
        if resolved is None:
            raise _client(f"Unknown operation {operation!r}: {CAPABILITIES}")
        if resolved == "replace_background" and colour is None and not has_second:
            raise _client(
                "replace_background needs params.background_color or a background image as "
                "the second entry of 'images'"
            )
        return _Edit(resolved, colour, resolved == "replace_background" and colour is None, radius)

    text = " ".join((request.prompt or "").lower().split())
    mentions_background = re.search(r"\b(background|backdrop|bg|behind)\b", text) is not None
    if re.search(r"\b(blur\w*|bokeh|defocus\w*|depth of field|portrait mode)\b", text) and (
        mentions_background or re.search(r"bokeh|portrait mode|depth of field", text)
    ):
        return _Edit("blur_background", colour, False, radius)
    if "transparen" in text:
        return _Edit("remove_background", colour, False, radius)
    if colour is None and mentions_background:
        colour = _colour_near_background(text)
    replace_verb = re.search(
        r"\b(replace|change|swap|switch|set|turn|make|put|use|give|paint|colou?r)\b", text
    )
    if mentions_background and colour is not None:
        return _Edit("replace_background", colour, False, radius)
    if mentions_background and replace_verb and has_second:
        return _Edit("replace_background", None, True, radius)
    remove_verb = re.search(
        r"\b(remove|delete|erase|drop|strip|cut ?out|get rid of|isolate|extract|no)\b", text
    )
    if remove_verb and (mentions_background or re.search(r"cut ?out|isolate|extract", text)):
        return _Edit("remove_background", colour, False, radius)
    if mentions_background and replace_verb:
        raise _client(
            "Say the new background: a colour ('replace the background with white', "
            "'#336699') or a background image as the second entry of 'images'"
        )
    raise _client(f"This model cannot do {request.prompt!r}: {CAPABILITIES}")


def _blurred_background(rgb: Image.Image, person: Image.Image, radius: float) -> Image.Image:
    """Blur only the background: each pixel is a blur of nearby *background* pixels, so the
    person's colours do not bleed into a halo around them."""
    weight = ImageOps.invert(person)
    blur = ImageFilter.GaussianBlur(radius)
    premultiplied = ImageChops.multiply(rgb, Image.merge("RGB", (weight, weight, weight)))
    blurred = premultiplied.filter(blur)
    blurred_weight = weight.filter(blur)
    channels = [
        ImageMath.lambda_eval(
            lambda a: a["c"] * 255.0 / a["max"](a["w"], 1.0),
            c=channel.convert("F"),
            w=blurred_weight.convert("F"),
        ).convert("L")
        for channel in blurred.split()
    ]
    normalised = Image.merge("RGB", tuple(channels))
    # Deep inside the person almost no background weight is nearby and the division is
    # noisy; a plain blur is used there (the person covers those pixels anyway).
    confidence = blurred_weight.point(lambda v: min(255, v * 8))
    return Image.composite(normalised, rgb.filter(blur), confidence)


class SelfieSegmentationEdit:
    """Offline ``image-edit`` backend: person/background separation with MediaPipe selfie
    segmentation, then background removal, replacement (colour or image) or blur.

    Options (all optional): ``model`` (``"general"``, default, or ``"landscape"``: the
    faster 144x256 variant), ``model_path`` (another selfie-segmentation ``.tflite``),
    ``max_input_pixels``/``max_output_pixels`` (default 40 MP each), ``mask_low``/
    ``mask_high`` (confidences mapped to fully transparent/opaque; default 0.1/0.9, the
    ramp between keeps edges soft), ``min_person_fraction`` (share of the image that must
    be person, default 0.005).

    The request's ``aspect_ratio`` and ``width``/``height`` are applied to the result as a
    centred crop / exact-size cover resize.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """Load mediapipe and the model; raises BackendUnavailable when either is missing."""
        options = options or {}
        self._mp, self._tasks, self._vision = _load_mediapipe()
        model_path = options.get("model_path")
        if model_path is None:
            variant = str(options.get("model", "general"))
            if variant not in _SHIPPED_MODELS:
                raise BackendUnavailable(
                    f"option 'model' must be one of {sorted(_SHIPPED_MODELS)}, got {variant!r}"
                )
            path = Path(self._mp.__file__).parent / _SHIPPED_MODELS[variant]
        else:
            path = Path(str(model_path))
        if not path.is_file():
            raise BackendUnavailable(
                f"Selfie segmentation model not found at {path}. The mediapipe==0.10.21 wheel "
                "ships it; later mediapipe releases do not (set option 'model_path' to a "
                f"selfie_segmentation.tflite). Install: {MEDIAPIPE_INSTALL}"
            )
        # Read once: requests never touch the disk and a later package upgrade that drops
        # the file cannot break a running server.
        self._model = path.read_bytes()
        self.model_path = path
        self.max_input_pixels = pixel_cap_option(
            options, "max_input_pixels", DEFAULT_MAX_INPUT_PIXELS
        )
        self.mask_low = _fraction_option(options, "mask_low", 0.1)
        self.mask_high = _fraction_option(options, "mask_high", 0.9)
        if self.mask_low >= self.mask_high:
            raise BackendUnavailable("option 'mask_low' must be below 'mask_high'")
        self.min_person_fraction = _fraction_option(options, "min_person_fraction", 0.005)
        self.max_output_pixels = pixel_cap_option(
            options, "max_output_pixels", DEFAULT_MAX_OUTPUT_PIXELS
        )
        try:
            self._new_segmenter().close()
        except Exception as exc:
            raise BackendUnavailable(
                f"MediaPipe could not load the segmentation model {path}: {exc}"
            ) from exc

    def _new_segmenter(self) -> Any:
        # One segmenter per call (about 10 ms to build): nothing is shared between worker
        # threads and nothing needs closing when the server stops.
        vision = self._vision
        options = vision.ImageSegmenterOptions(
            base_options=self._tasks.BaseOptions(model_asset_buffer=self._model),
            running_mode=vision.RunningMode.IMAGE,
            output_confidence_masks=True,
            output_category_mask=False,
        )
        return vision.ImageSegmenter.create_from_options(options)

    def person_mask(self, rgb: Image.Image) -> Image.Image:
        """The person matte of an RGB image as an L image of the same size (255 = person).

        Blocking (runs the model); call it from a worker thread.
        """
        small = rgb
        if max(rgb.size) > _INFERENCE_SIDE:
            small = rgb.copy()
            small.thumbnail((_INFERENCE_SIDE, _INFERENCE_SIDE), Image.Resampling.BILINEAR)
        np = importlib.import_module("numpy")
        pixels = np.ascontiguousarray(np.asarray(small, dtype=np.uint8))
        frame = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=pixels)
        with self._new_segmenter() as segmenter:
            masks = segmenter.segment(frame).confidence_masks
            # numpy_view() borrows MediaPipe's buffer: copy before the segmenter closes.
            person = np.array(masks[0].numpy_view(), dtype=np.float32)
            # mediapipe 0.10 gives (h, w), mediapipe 1.x (h, w, 1).
            person = person.reshape(person.shape[0], person.shape[1])
            if len(masks) > 1:
                # Multi-class segmenters put "background" first; person = not background.
                person = 1.0 - person
        confidence: Image.Image = Image.fromarray(person)
        low, span = self.mask_low, self.mask_high - self.mask_low
        # Linear ramp low..high -> 0..255: speckle below low vanishes, the soft edge stays.
        matte = confidence.point(lambda v: (v - low) * (255.0 / span)).convert("L")
        if matte.size != rgb.size:
            matte = matte.resize(rgb.size, Image.Resampling.BILINEAR)
        return matte

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Edit ``request.images[0]``'s background; ``images[1]`` is an optional new
        background. Returns one image in ``request.output_format``."""
        if not request.images:
            raise _client("This model edits a photo: pass the source image in 'images'")
        edit = _resolve_edit(request)
        output_format = normalise_format(request.output_format)
        quality = request.params.get("quality")
        if quality is not None and (
            isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100
        ):
            raise _client("Invalid value for 'quality': must be an integer from 1 to 100")
        second = request.images[1] if edit.use_second_image else None
        blob = await anyio.to_thread.run_sync(
            self._run, edit, request, second, output_format, quality
        )
        return [blob]

    def _run(
        self,
        edit: _Edit,
        request: ImageRequest,
        background: MediaBlob | None,
        output_format: str,
        quality: int | None,
    ) -> MediaBlob:
        out = self._edit(edit, request.images[0], background)
        # The frame is unchanged by the edit; a requested aspect_ratio/size is then applied
        # the same way the image-ops backend applies it, never silently dropped.
        out = apply_request_geometry(out, request, self.max_output_pixels)
        return encode_image(
            out, output_format, quality=quality, background=edit.colour or (255, 255, 255)
        )

    def _edit(self, edit: _Edit, source: MediaBlob, background: MediaBlob | None) -> Image.Image:
        img = decode_image(source, max_pixels=self.max_input_pixels)
        rgb = img.convert("RGB")
        person = self.person_mask(rgb)
        if img.mode in ("RGBA", "LA"):
            # Pixels already transparent in the source stay transparent.
            person = ImageChops.multiply(person, img.getchannel("A"))
        histogram = person.histogram()
        if sum(histogram[128:]) < self.min_person_fraction * rgb.width * rgb.height:
            raise _client(
                "No person found in the image. This model (MediaPipe selfie segmentation) "
                "only separates people from their background, not other objects."
            )
        if edit.operation == "remove_background":
            # JPEG output gets flattened over edit.colour (white by default) when encoded.
            out = rgb.copy()
            out.putalpha(person)
            return out
        if edit.operation == "blur_background":
            radius = edit.blur_radius or max(2.0, round(max(rgb.size) * 0.015))
            new_background = _blurred_background(rgb, person, radius)
        elif background is not None:
            replacement = decode_image(
                background, max_pixels=self.max_input_pixels, what="background image"
            ).convert("RGB")
            # Cover the frame without distortion: scale, then crop the overflow centred.
            new_background = ImageOps.fit(replacement, rgb.size, Image.Resampling.LANCZOS)
        else:
            new_background = Image.new("RGB", rgb.size, edit.colour or (255, 255, 255))
        return Image.composite(rgb, new_background, person)
