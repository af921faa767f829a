"""Local image and video generation with Hugging Face ``diffusers``, from weights on disk.

Two backend types share this package: ``diffusers_image`` (:class:`DiffusersImage`: FLUX.1
schnell/dev text-to-image, FLUX.1 Kontext and Qwen-Image-Edit image edits) and
``diffusers_video`` (:class:`DiffusersVideo`: Wan 2.x text-to-video and image-to-video).
Nothing is ever downloaded: pipelines load with ``local_files_only=True`` from a directory
the operator filled beforehand, e.g. ``hf download black-forest-labs/FLUX.1-schnell
--local-dir /models/flux-1-schnell``.

Requirements (not installed with hypereal): ``torch`` (CPU or CUDA build), ``diffusers``,
``transformers``, ``accelerate``, plus ``av`` (MP4 encoding) and ``ftfy`` (Wan's prompt
cleaning) for video. Without them, or without the weights directory, the constructor raises
:class:`BackendUnavailable` saying what is missing. Qwen-Image-Edit works without
``torchvision``: its Qwen2-VL processor is then built image-only (transformers' full one needs
torchvision for a video processor the pipeline never uses) from the ``processor/`` folder.

Options (``backends.<name>`` with ``type = "diffusers_image"`` or ``"diffusers_video"``):

``weights_dir`` (required)
    A diffusers pipeline directory (holding ``model_index.json``), or a directory of them
    named by the catalogue's ``upstream_model`` (``weights_dir/flux-1-schnell/...``). A
    request uses ``weights_dir/<upstream_model>`` when it exists, else ``weights_dir`` itself.
``pipeline``
    ``auto`` (default: the ``_class_name`` in ``model_index.json``) or, for images, ``flux``,
    ``flux-kontext``, ``qwen-image-edit``; for video, ``wan`` or ``wan-i2v``.
``device`` / ``dtype``
    ``auto`` (default) picks ``cuda`` when available, else ``cpu``; dtype ``auto`` is
    ``bfloat16`` on CUDA and ``float32`` on CPU (``float16`` also accepted).
``offload``
    ``none`` (default: the whole pipeline on the device), ``model``
    (``enable_model_cpu_offload``: one component on the GPU at a time) or ``sequential``
    (``enable_sequential_cpu_offload``: least memory, slowest). Ignored on CPU.
``num_inference_steps`` / ``guidance_scale``
    Defaults per pipeline: FLUX schnell 4 steps (no guidance), FLUX dev 28 / 3.5, Kontext
    28 / 2.5, Qwen-Image-Edit 50 / 4.0 (its true CFG scale), Wan 50 / 5.0. A request may
    override both with ``num_inference_steps`` / ``guidance_scale`` params (steps are capped by
    ``max_steps``, default 100).
``max_pixels``
    Largest ``width * height`` generated; bigger requests are scaled down keeping their aspect
    ratio (default 2 MP for images, 1280x720 for video).
``max_images`` (images)
    Most images one request may ask for with ``num_images`` (default 4).
``fps`` / ``max_frames`` / ``vae_tiling`` / ``negative_prompt`` (video)
    Frame rate (16, Wan 2.1/2.2 A14B's native rate; use 24 for Wan 2.2 TI2V-5B), an optional
    cap on frames, VAE tiling to decode big videos in less memory (off), and the default
    negative prompt (none).

Sizes: width and height are rounded to the nearest multiple of 16 (FLUX and Wan work on 16x16
pixel patches: 8x VAE downsampling times 2x2 patches); the rounding is logged, and for video
also returned in the job's ``data``. ``aspect_ratio`` alone (or with one side) picks a size of
about 1 MP for images; edits without any size keep their source image's aspect ratio. Video
``resolution`` (``480p``/``720p``/``1080p``) is the short side, the long side follows
``aspect_ratio`` (16:9 by default, the source image's ratio for image-to-video).

Video length: Wan generates ``4k + 1`` frames (its VAE compresses 4 frames into one latent
after the first), so ``duration * fps`` is rounded to the nearest ``4k + 1``: 5 s at 16 fps
is 81 frames (5.06 s). Frames are encoded to H.264 MP4 (yuv420p, ``+faststart``).

Memory: a process keeps ONE pipeline resident, whichever backend instance loaded it; a request
for another model unloads it first (and frees the CUDA cache), and generations run one at a
time. Cancelling the awaiting task interrupts the pipeline at its next denoising step.

- :mod:`.options`: the options, parsed once at construction, and the runtime import.
- :mod:`.resident`: the one pipeline resident in this process and interruptible runs.
- :mod:`.runtime`: loading and running pipelines, shared by both backends.
- :mod:`.sizes`: output sizes (multiples of 16, pixel caps, aspect ratios).
- :mod:`.images` / :mod:`.video`: the two backends.

Source images are decoded by the one guarded codec (:mod:`hypereal.media.images`: format
allow-list, pixel cap checked from the header) and images encoded by it.
"""

from hypereal.backends.diffusers.images import DiffusersImage
from hypereal.backends.diffusers.video import DiffusersVideo, encode_mp4, frame_count

__all__ = ["DiffusersImage", "DiffusersVideo", "encode_mp4", "frame_count"]
