"""The offline ``image-edit`` backend: deterministic Pillow edits, no model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio.to_thread

from hypereal.backends.base import ImageRequest, MediaBlob
from hypereal.backends.image_codec import (
    DEFAULT_MAX_OUTPUT_PIXELS,
    decode_image,
    encode_image,
    input_pixel_cap,
    pixel_cap_option,
)
from hypereal.backends.image_ops.instructions import plan_request
from hypereal.backends.image_ops.operations import apply_plan
from hypereal.backends.image_ops.plan import Plan, refuse


class ImageOperations:
    """Offline ``image-edit`` backend: deterministic Pillow edits chosen by
    ``params.operation`` or parsed from the prompt.

    Options (all optional): ``max_input_pixels`` and ``max_output_pixels`` (pixel caps,
    default 40 MP each), ``max_images`` (source images edited per request, default 4).
    Every source image in the request is edited the same way; one output per source.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """Read the options; raises BackendUnavailable when one is malformed."""
        options = options or {}
        self.max_input_pixels = input_pixel_cap(options)
        self.max_output_pixels = pixel_cap_option(
            options, "max_output_pixels", DEFAULT_MAX_OUTPUT_PIXELS
        )
        self.max_images = pixel_cap_option(options, "max_images", 4)

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Edit each source image in ``request.images`` per the plan; one output each."""
        if not request.images:
            raise refuse("This model edits an image: pass the source image in 'images'")
        if len(request.images) > self.max_images:
            raise refuse(f"At most {self.max_images} source images per request")
        plan = plan_request(request)
        return await anyio.to_thread.run_sync(self._run, plan, list(request.images))

    def _run(self, plan: Plan, sources: list[MediaBlob]) -> list[MediaBlob]:
        outputs = []
        for index, blob in enumerate(sources):
            what = "source image" if len(sources) == 1 else f"source image #{index + 1}"
            img = decode_image(blob, max_pixels=self.max_input_pixels, what=what)
            img = apply_plan(img, plan, self.max_output_pixels)
            outputs.append(encode_image(img, plan.output_format, quality=plan.quality))
        return outputs
