"""``diffusers_image``: FLUX.1 schnell/dev text-to-image, FLUX.1 Kontext and Qwen-Image-Edit
image edits."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from hypereal.backends.base import BackendError, ImageRequest, MediaBlob
from hypereal.backends.diffusers import resident
from hypereal.backends.diffusers.options import EDIT_KINDS, EDIT_NAMES, IMAGE_PIPELINES
from hypereal.backends.diffusers.resident import run_interruptible
from hypereal.backends.diffusers.runtime import DiffusersBackend, decode_source, pick_seed
from hypereal.backends.diffusers.sizes import image_size
from hypereal.backends.image_codec import encode_image, normalise_format

log = logging.getLogger("hypereal.backends.diffusers")


@dataclass(frozen=True)
class _ImagePlan:
    model_dir: Path
    kind: str
    width: int
    height: int
    source: Image.Image | None
    num_images: int
    seed: int
    steps: int | None
    guidance: Any
    output_format: str
    prompt: str
    negative_prompt: str | None


class DiffusersImage(DiffusersBackend):
    """Text-to-image (FLUX.1 schnell/dev) and image edits (FLUX.1 Kontext, Qwen-Image-Edit)
    from a local diffusers pipeline directory. See the module docstring for options."""

    _kinds = IMAGE_PIPELINES
    _video = False

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Generate ``params['num_images']`` (default 1) images; raises BackendError."""
        output_format = normalise_format(request.output_format)
        model_dir = self._model_dir(request.upstream_model)
        kind = self._pipeline_kind(model_dir)
        source = None
        if kind in EDIT_KINDS:
            if not request.images:
                raise BackendError(
                    f"{EDIT_NAMES[kind]} edits an image: send the source image", client_error=True
                )
            source = decode_source(request.images[0])
        width, height, note = image_size(request, source, self._options.max_pixels)
        if note:
            log.info("diffusers %s: %s", request.upstream_model or model_dir.name, note)
        num_images = request.params.get("num_images", 1)
        max_images = int(self._options.extra.get("max_images", 4))
        if (
            isinstance(num_images, bool)
            or not isinstance(num_images, int)
            or not 1 <= num_images <= max_images
        ):
            raise BackendError(f"num_images must be from 1 to {max_images}", client_error=True)
        steps = request.params.get("num_inference_steps")
        if steps is not None:
            self._steps(steps, 1)  # validate now, on the event loop, before queueing
        guidance = request.params.get("guidance_scale")
        if guidance is not None:
            self._guidance(guidance, 0.0)
        negative = request.params.get("negative_prompt")
        plan = _ImagePlan(
            model_dir=model_dir,
            kind=kind,
            width=width,
            height=height,
            source=source,
            num_images=num_images,
            seed=pick_seed(request.params.get("seed")),
            steps=steps,
            guidance=guidance,
            output_format=output_format,
            prompt=request.prompt,
            negative_prompt=negative if isinstance(negative, str) else None,
        )
        interrupt = threading.Event()
        key = self._key(model_dir, kind)
        return await run_interruptible(
            lambda: self._with_pipeline(
                key, interrupt, lambda pipe: self._generate(pipe, plan, interrupt)
            ),
            interrupt,
        )

    def _generate(self, pipe: Any, plan: _ImagePlan, interrupt: threading.Event) -> list[MediaBlob]:
        """One pipeline call. Runs in the worker thread with the resident lock held."""
        kwargs: dict[str, Any] = {
            "prompt": plan.prompt,
            "width": plan.width,
            "height": plan.height,
            "num_images_per_prompt": plan.num_images,
            "generator": self._generator(plan.seed),
            "callback_on_step_end": resident.step_callback(interrupt),
            "output_type": "pil",
        }
        if plan.kind == "flux":
            # FLUX.1 [schnell] is the timestep-distilled model without guidance embedding: it
            # wants 4 steps, no guidance, and its T5 prompt stops at 256 tokens.
            schnell = not getattr(pipe.transformer.config, "guidance_embeds", True)
            kwargs["num_inference_steps"] = self._steps(plan.steps, 4 if schnell else 28)
            kwargs["guidance_scale"] = self._guidance(plan.guidance, 0.0 if schnell else 3.5)
            kwargs["max_sequence_length"] = 256 if schnell else 512
        elif plan.kind == "flux-kontext":
            kwargs["image"] = plan.source
            kwargs["num_inference_steps"] = self._steps(plan.steps, 28)
            kwargs["guidance_scale"] = self._guidance(plan.guidance, 2.5)
            # Kontext rescales its output to `max_area` (1 MP by default) at the requested
            # aspect ratio; pinning the area to the request keeps the requested size.
            kwargs["max_area"] = plan.width * plan.height
        else:  # qwen-image-edit: true classifier-free guidance needs a negative prompt
            kwargs["image"] = plan.source
            kwargs["num_inference_steps"] = self._steps(plan.steps, 50)
            kwargs["true_cfg_scale"] = self._guidance(plan.guidance, 4.0)
            kwargs["negative_prompt"] = plan.negative_prompt or " "
        images = pipe(**kwargs).images
        return [encode_image(image, plan.output_format, quality=95) for image in images]
