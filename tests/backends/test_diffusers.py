"""DiffusersImage / DiffusersVideo with tiny, randomly initialised pipelines built here.

Like diffusers' own test suite, each pipeline is assembled from tiny configs (a 1-layer FLUX
transformer, a 4-channel VAE, 2-layer CLIP/T5 text encoders, a tiny Wan transformer and VAE,
and a tiny Qwen-Image-Edit from ``tiny_qwen_image_edit``); the tokenizers are built from
vocabularies written here, so nothing is downloaded. Each is
``save_pretrained`` to a temporary directory and then loaded back through the backends' own
loading code (``from_pretrained(..., local_files_only=True)``) and run on CPU. The outputs are
noise, but real PNG/JPEG/WebP images and H.264 MP4 files of the right size and length.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any attempt to reach the Hub fails instead of downloading
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import asyncio
import gc
import importlib
import importlib.util
import io
import json
import string
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
av = pytest.importorskip("av")
pytest.importorskip("ftfy")

from PIL import Image  # noqa: E402

from hypereal.backends.base import (  # noqa: E402
    BackendError,
    BackendUnavailable,
    ImageBackend,
    ImageRequest,
    JobRequest,
    MediaBlob,
    VideoBackend,
)
from hypereal.backends.diffusers import (  # noqa: E402
    DiffusersImage,
    DiffusersVideo,
    encode_mp4,
    frame_count,
)
from hypereal.backends.diffusers import options as diffusers_options  # noqa: E402
from hypereal.backends.diffusers import resident as diffusers_resident  # noqa: E402
from hypereal.backends.diffusers import sizes as diffusers_sizes  # noqa: E402
from tests.backends.tiny_qwen_image_edit import save_qwen_image_edit  # noqa: E402


def resident_model() -> str | None:
    """Directory of the pipeline loaded in this process, or None."""
    key = diffusers_resident.RESIDENT.key
    return key.path if key is not None else None


def unload_resident() -> None:
    """Unload the resident pipeline (waits for a running generation to finish)."""
    with diffusers_resident.RESIDENT.lock:
        diffusers_resident.RESIDENT.unload()


# ------------------------------------------------------------------ tiny pipelines


def _clip_tokenizer() -> Any:
    """Byte-level BPE without merges: every byte is a token (plus its end-of-word form)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> Any:
    """A Unigram vocabulary of single characters, laid out like T5's (pad, eos, unk first)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab += [(c, -3.0), ("\u2581" + c, -3.5)]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5_config(cls: Any, vocab_size: int) -> Any:
    return cls(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _flux_components(*, guidance_embeds: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(clip_tok),
            projection_dim=32,
            max_position_embeddings=77,
        )
    )
    t5 = transformers.T5EncoderModel(_t5_config(transformers.T5Config, len(t5_tok)))
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    # Four blocks: 8x downsampling like the real FLUX VAE, so sizes behave as in production.
    vae = diffusers.AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4, 4, 4),
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return {
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": clip,
        "tokenizer": clip_tok,
        "text_encoder_2": t5,
        "tokenizer_2": t5_tok,
        "transformer": transformer,
    }


def _wan_pipeline(*, i2v: bool) -> Any:
    torch.manual_seed(0)
    tokenizer = _t5_tokenizer()
    text_encoder = transformers.UMT5EncoderModel(
        _t5_config(transformers.UMT5Config, len(tokenizer))
    )
    z_dim = 4
    vae = diffusers.AutoencoderKLWan(
        base_dim=3,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    # Image-to-video (Wan 2.2 style, no CLIP image encoder) also takes the encoded first
    # frame and a 4-channel frame mask: z_dim + 4 + z_dim input channels.
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=2 * z_dim + 4 if i2v else z_dim,
        out_channels=z_dim,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    cls = diffusers.WanImageToVideoPipeline if i2v else diffusers.WanPipeline
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


@pytest.fixture(scope="module")
def image_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights_dir with one subdirectory per upstream model, as an operator lays it out."""
    root = tmp_path_factory.mktemp("image-weights")
    diffusers.FluxPipeline(**_flux_components(guidance_embeds=False)).save_pretrained(
        root / "flux-1-schnell"
    )
    diffusers.FluxPipeline(**_flux_components(guidance_embeds=True)).save_pretrained(
        root / "flux-1-dev"
    )
    diffusers.FluxKontextPipeline(**_flux_components(guidance_embeds=True)).save_pretrained(
        root / "flux-kontext-dev"
    )
    return root


@pytest.fixture(scope="module")
def qwen_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights_dir with `qwen-image-edit/`, laid out like `hf download Qwen/Qwen-Image-Edit`."""
    root = tmp_path_factory.mktemp("qwen-weights")
    save_qwen_image_edit(root / "qwen-image-edit")
    return root


@pytest.fixture(scope="module")
def video_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("video-weights")
    _wan_pipeline(i2v=False).save_pretrained(root / "wan-t2v")
    _wan_pipeline(i2v=True).save_pretrained(root / "wan-i2v")
    return root


@pytest.fixture(scope="module", autouse=True)
def _free_pipeline() -> Any:
    yield
    unload_resident()


def _image_backend(root: Path, **options: Any) -> DiffusersImage:
    return DiffusersImage({"weights_dir": str(root), **options})


def _png_bytes(
    size: tuple[int, int] = (64, 40), color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _decode(blob: MediaBlob) -> Image.Image:
    image = Image.open(io.BytesIO(blob.data))
    image.load()
    return image


class _StepCounter:
    """Wraps the module's step callback factory to count denoising steps per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[int] = []
        original: Callable[..., Any] = diffusers_resident.step_callback

        def factory(*args: Any, **kwargs: Any) -> Any:
            inner = original(*args, **kwargs)

            def callback(pipe: Any, step: int, timestep: Any, kw: dict[str, Any]) -> Any:
                self.steps.append(step)
                return inner(pipe, step, timestep, kw)

            return callback

        monkeypatch.setattr(diffusers_resident, "step_callback", factory)


# --------------------------------------------------------------------------- images


async def test_flux_png_of_requested_size_rounded_to_16(image_weights: Path) -> None:
    backend = _image_backend(image_weights)
    assert isinstance(backend, ImageBackend)
    [blob] = await backend.generate_images(
        ImageRequest(prompt="a red cat", width=50, height=30, upstream_model="flux-1-schnell")
    )
    assert blob.content_type == "image/png"
    image = _decode(blob)
    assert image.format == "PNG"
    assert image.size == (48, 32)  # 50x30 rounded to multiples of 16
    assert resident_model() == str(image_weights / "flux-1-schnell")


@pytest.mark.parametrize(
    ("output_format", "pil_format", "content_type"),
    [("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp"), ("png", "PNG", "image/png")],
)
async def test_output_formats(
    image_weights: Path, output_format: str, pil_format: str, content_type: str
) -> None:
    backend = _image_backend(image_weights)
    blobs = await backend.generate_images(
        ImageRequest(
            prompt="x",
            width=32,
            height=48,
            output_format=output_format,
            upstream_model="flux-1-schnell",
            params={"num_images": 2, "seed": 1},
        )
    )
    assert len(blobs) == 2
    for blob in blobs:
        assert blob.content_type == content_type
        image = _decode(blob)
        assert (image.format, image.size) == (pil_format, (32, 48))


async def test_aspect_ratio_and_max_pixels(image_weights: Path) -> None:
    backend = _image_backend(image_weights, max_pixels=64 * 64)
    [blob] = await backend.generate_images(
        ImageRequest(prompt="x", aspect_ratio="16:9", upstream_model="flux-1-schnell")
    )
    width, height = _decode(blob).size
    assert width % 16 == 0 and height % 16 == 0
    assert width * height <= 64 * 64
    assert width / height == pytest.approx(16 / 9, rel=0.1)


async def test_same_seed_same_bytes(image_weights: Path) -> None:
    backend = _image_backend(image_weights)

    async def run(seed: int) -> bytes:
        [blob] = await backend.generate_images(
            ImageRequest(
                prompt="a lighthouse",
                width=32,
                height=32,
                upstream_model="flux-1-schnell",
                params={"seed": seed},
            )
        )
        return blob.data

    first, again, other = await run(7), await run(7), await run(8)
    assert first == again
    assert first != other


async def test_default_and_overridden_steps(
    image_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = _StepCounter(monkeypatch)
    backend = _image_backend(image_weights)
    request = ImageRequest(prompt="x", width=16, height=16, upstream_model="flux-1-schnell")
    await backend.generate_images(request)
    assert len(counter.steps) == 4  # schnell: no guidance embedding -> 4 steps
    counter.steps.clear()
    await backend.generate_images(
        ImageRequest(
            prompt="x",
            width=16,
            height=16,
            upstream_model="flux-1-dev",
            params={"num_inference_steps": 3},
        )
    )
    assert len(counter.steps) == 3
    counter.steps.clear()
    await _image_backend(image_weights, num_inference_steps=2).generate_images(request)
    assert len(counter.steps) == 2


async def test_loading_another_model_evicts_the_resident_one(image_weights: Path) -> None:
    backend = _image_backend(image_weights)
    request = ImageRequest(prompt="x", width=16, height=16, upstream_model="flux-1-schnell")
    await backend.generate_images(request)
    assert resident_model() == str(image_weights / "flux-1-schnell")
    first = weakref.ref(diffusers_resident.RESIDENT.pipe.transformer)

    dev = ImageRequest(
        prompt="x",
        width=16,
        height=16,
        upstream_model="flux-1-dev",
        params={"num_inference_steps": 2},
    )
    await backend.generate_images(dev)
    assert resident_model() == str(image_weights / "flux-1-dev")
    gc.collect()
    assert first() is None, "the first pipeline is still referenced after the switch"

    # Same model again: reused, not reloaded.
    resident = diffusers_resident.RESIDENT.pipe
    await backend.generate_images(dev)
    assert diffusers_resident.RESIDENT.pipe is resident


async def test_kontext_edit(image_weights: Path) -> None:
    backend = _image_backend(image_weights, max_pixels=64 * 64)
    source = MediaBlob(_png_bytes((64, 40)), "image/png")
    [blob] = await backend.generate_images(
        ImageRequest(
            prompt="make it blue",
            width=48,
            height=32,
            images=[source],
            upstream_model="flux-kontext-dev",
            params={"num_inference_steps": 2},
        )
    )
    assert _decode(blob).size == (48, 32)
    assert resident_model() == str(image_weights / "flux-kontext-dev")
    assert type(diffusers_resident.RESIDENT.pipe).__name__ == "FluxKontextPipeline"

    # No size asked: the edit keeps the source's aspect ratio (64:40), within max_pixels.
    [blob] = await backend.generate_images(
        ImageRequest(
            prompt="x",
            images=[source],
            upstream_model="flux-kontext-dev",
            params={"num_inference_steps": 1},
        )
    )
    width, height = _decode(blob).size
    assert width * height <= 64 * 64 and width > height


async def test_edit_without_image_is_a_client_error(image_weights: Path) -> None:
    backend = _image_backend(image_weights)
    with pytest.raises(BackendError) as info:
        await backend.generate_images(ImageRequest(prompt="x", upstream_model="flux-kontext-dev"))
    assert info.value.client_error
    assert "Kontext" in info.value.message

    with pytest.raises(BackendError) as info:
        await backend.generate_images(
            ImageRequest(
                prompt="x",
                images=[MediaBlob(b"not an image", "image/png")],
                upstream_model="flux-kontext-dev",
            )
        )
    assert info.value.client_error


async def test_qwen_image_edit_is_selected_and_needs_an_image(tmp_path: Path) -> None:
    # A Qwen-Image-Edit directory as `hf download Qwen/Qwen-Image-Edit` lays it out (only the
    # index: the request fails validation before anything loads).
    model = tmp_path / "qwen-image-edit"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    backend = _image_backend(tmp_path)
    assert backend._pipeline_kind(model) == "qwen-image-edit"
    assert diffusers_options.PIPELINE_CLASSES["qwen-image-edit"] == "QwenImageEditPipeline"
    assert hasattr(diffusers, "QwenImageEditPipeline")
    with pytest.raises(BackendError) as info:
        await backend.generate_images(ImageRequest(prompt="x", upstream_model="qwen-image-edit"))
    assert info.value.client_error
    assert "Qwen-Image-Edit" in info.value.message

    # With an image, loading is attempted: this directory holds no weights (without
    # torchvision, its missing processor/ folder is what fails first), a server error.
    with pytest.raises(BackendError) as info:
        await backend.generate_images(
            ImageRequest(
                prompt="x",
                images=[MediaBlob(_png_bytes(), "image/png")],
                upstream_model="qwen-image-edit",
            )
        )
    assert not info.value.client_error
    if importlib.util.find_spec("torchvision") is None:
        assert "processor" in info.value.message and str(model / "processor") in info.value.message

    # The option overrides the index.
    forced = _image_backend(tmp_path, pipeline="flux-kontext")
    assert forced._pipeline_kind(model) == "flux-kontext"


async def test_qwen_image_edit(qwen_weights: Path) -> None:
    backend = _image_backend(qwen_weights)
    source = MediaBlob(_png_bytes((64, 40)), "image/png")

    async def edit(seed: int) -> bytes:
        [blob] = await backend.generate_images(
            ImageRequest(
                prompt="make it blue",
                width=50,
                height=30,
                images=[source],
                upstream_model="qwen-image-edit",
                params={"seed": seed, "num_inference_steps": 2},
            )
        )
        assert blob.content_type == "image/png"
        image = _decode(blob)
        assert (image.format, image.size) == ("PNG", (48, 32))  # rounded to multiples of 16
        return blob.data

    first = await edit(7)
    assert resident_model() == str(qwen_weights / "qwen-image-edit")
    pipe = diffusers_resident.RESIDENT.pipe
    assert type(pipe).__name__ == "QwenImageEditPipeline"
    if importlib.util.find_spec("torchvision") is None:
        # transformers' own Qwen2VLProcessor needs torchvision (for video): the backend built
        # the image-only one from processor/.
        assert type(pipe.processor).__name__ == "ImageOnlyQwen2VLProcessor"
        assert type(pipe.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert await edit(7) == first
    assert await edit(8) != first


async def test_bad_request_values_are_client_errors(image_weights: Path) -> None:
    backend = _image_backend(image_weights)
    bad = [
        ImageRequest(prompt="x", output_format="gif", upstream_model="flux-1-schnell"),
        ImageRequest(prompt="x", aspect_ratio="wide", upstream_model="flux-1-schnell"),
        ImageRequest(prompt="x", width=-5, height=16, upstream_model="flux-1-schnell"),
        ImageRequest(prompt="x", params={"seed": -1}, upstream_model="flux-1-schnell"),
        ImageRequest(prompt="x", params={"num_images": 99}, upstream_model="flux-1-schnell"),
        ImageRequest(
            prompt="x", params={"num_inference_steps": 0}, upstream_model="flux-1-schnell"
        ),
    ]
    for request in bad:
        with pytest.raises(BackendError) as info:
            await backend.generate_images(request)
        assert info.value.client_error, request


async def test_unknown_upstream_model_is_a_server_error(image_weights: Path) -> None:
    backend = _image_backend(image_weights)
    with pytest.raises(BackendError) as info:
        await backend.generate_images(ImageRequest(prompt="x", upstream_model="flux-2-pro"))
    assert not info.value.client_error
    assert "flux-2-pro" in info.value.message
    with pytest.raises(BackendError):  # must not escape weights_dir
        await backend.generate_images(ImageRequest(prompt="x", upstream_model="../etc"))


async def test_single_pipeline_directory_as_weights_dir(image_weights: Path) -> None:
    backend = _image_backend(image_weights / "flux-1-schnell")
    [blob] = await backend.generate_images(
        ImageRequest(prompt="x", width=16, height=32, upstream_model="anything")
    )
    assert _decode(blob).size == (16, 32)


def test_missing_weights_are_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="does not exist"):
        DiffusersImage({"weights_dir": str(tmp_path / "nope")})
    with pytest.raises(BackendUnavailable, match="weights_dir"):
        DiffusersImage({})
    with pytest.raises(BackendUnavailable, match=r"model_index\.json"):
        DiffusersVideo({"weights_dir": str(tmp_path)})


def test_bad_options_are_unavailable(image_weights: Path) -> None:
    for options in (
        {"pipeline": "sdxl"},
        {"dtype": "int8"},
        {"offload": "disk"},
        {"max_pixels": 0},
        {"device": "tpu"},
    ):
        with pytest.raises(BackendUnavailable):
            _image_backend(image_weights, **options)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            _image_backend(image_weights, device="cuda")


def test_missing_packages_are_unavailable(
    image_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def fake_import(name: str, package: str | None = None) -> Any:
        if name == "diffusers":
            raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(BackendUnavailable, match="pip install"):
        _image_backend(image_weights)


def test_image_sizes() -> None:
    def size(source: Image.Image | None = None, **kwargs: Any) -> tuple[int, int]:
        w, h, _ = diffusers_sizes.image_size(ImageRequest(prompt="", **kwargs), source, 2**21)
        return w, h

    assert size() == (1024, 1024)
    assert size(width=1000, height=600) == (1008, 608)
    assert size(aspect_ratio="16:9") == (1360, 768)
    assert size(width=512, aspect_ratio="2:1") == (512, 256)
    assert size(params={"size": "768*512"}) == (768, 512)
    assert size(source=Image.new("RGB", (300, 200))) == (1248, 832)
    assert size(width=4096, height=4096) == (1440, 1440)  # capped at max_pixels
    note = diffusers_sizes.image_size(ImageRequest(prompt="", width=50, height=30), None, 2**21)
    assert note[2] is not None and "48x32" in note[2]


# ---------------------------------------------------------------------------- video


def _video_backend(root: Path, **options: Any) -> DiffusersVideo:
    return DiffusersVideo({"weights_dir": str(root), **options})


def _probe_mp4(data: bytes) -> tuple[int, int, int, str]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        return (
            frames,
            stream.codec_context.width,
            stream.codec_context.height,
            stream.codec_context.name,
        )


class _Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []
        self.first_step = asyncio.Event()

    async def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))
        if message.startswith("denoising"):
            self.first_step.set()


def test_frame_counts() -> None:
    assert frame_count(5, 16) == 81  # Wan's native 81 frames
    assert frame_count(1, 16) == 17
    assert frame_count(10, 16) == 161
    assert frame_count(5, 24) == 121
    assert frame_count(0.1, 16) == 5  # never fewer than 4 + 1
    assert frame_count(10, 16, max_frames=81) == 81
    assert frame_count(10, 16, max_frames=100) == 97


async def test_wan_text_to_video_mp4(video_weights: Path) -> None:
    backend = _video_backend(video_weights)
    assert isinstance(backend, VideoBackend)
    progress = _Progress()
    result = await backend.generate_video(
        JobRequest(
            job_id="job-1",
            input={
                "prompt": "a cat walks",
                "duration": 1,
                "width": 50,
                "height": 30,
                "seed": 3,
                "num_inference_steps": 3,
            },
            upstream_model="wan-t2v",
        ),
        progress,
    )
    assert result.output.content_type == "video/mp4"
    assert result.output.data[4:8] == b"ftyp"
    # +faststart: the index (moov) precedes the media data.
    assert result.output.data.find(b"moov") < result.output.data.find(b"mdat")
    frames, width, height, codec = _probe_mp4(result.output.data)
    assert (frames, width, height, codec) == (17, 48, 32, "h264")  # 1 s at 16 fps -> 4k+1
    assert result.data is not None
    assert result.data["frames"] == 17 and result.data["fps"] == 16
    assert (result.data["width"], result.data["height"], result.data["seed"]) == (48, 32, 3)

    fractions = [fraction for fraction, _ in progress.calls]
    assert fractions == sorted(fractions) and len(set(fractions)) == len(fractions)
    steps = [message for _, message in progress.calls if message.startswith("denoising")]
    assert steps == ["denoising step 1/3", "denoising step 2/3", "denoising step 3/3"]
    assert 0 <= fractions[0] and fractions[-1] < 1


async def test_wan_resolution_and_aspect_ratio(video_weights: Path) -> None:
    backend = _video_backend(video_weights, max_pixels=64 * 48, fps=8)
    result = await backend.generate_video(
        JobRequest(
            job_id="job-2",
            input={
                "prompt": "x",
                "duration": 1,
                "resolution": "480p",
                "aspect_ratio": "9:16",
                "num_inference_steps": 1,
            },
            upstream_model="wan-t2v",
        ),
        _Progress(),
    )
    assert result.data is not None
    width, height = result.data["width"], result.data["height"]
    assert height > width and width * height <= 64 * 48
    assert width % 16 == 0 and height % 16 == 0
    assert result.data["frames"] == 9  # 1 s at 8 fps -> 8 -> 4*2 + 1
    assert _probe_mp4(result.output.data)[:3] == (9, width, height)


async def test_wan_image_to_video(video_weights: Path) -> None:
    backend = _video_backend(video_weights)
    request = JobRequest(
        job_id="job-3",
        input={
            "prompt": "it moves",
            "duration": 0.5,
            "width": 48,
            "height": 32,
            "num_inference_steps": 2,
        },
        media={"image": MediaBlob(_png_bytes((80, 40)), "image/png")},
        upstream_model="wan-i2v",
    )
    result = await backend.generate_video(request, _Progress())
    assert _probe_mp4(result.output.data)[:3] == (9, 48, 32)
    assert type(diffusers_resident.RESIDENT.pipe).__name__ == "WanImageToVideoPipeline"

    with pytest.raises(BackendError) as info:
        await backend.generate_video(
            JobRequest(job_id="job-4", input={"prompt": "x"}, upstream_model="wan-i2v"),
            _Progress(),
        )
    assert info.value.client_error


async def test_cancellation_interrupts_the_pipeline(video_weights: Path) -> None:
    backend = _video_backend(video_weights, max_steps=1000)
    request = JobRequest(
        job_id="job-5",
        input={
            "prompt": "x",
            "duration": 0.25,
            "width": 32,
            "height": 32,
            "num_inference_steps": 1000,
        },
        upstream_model="wan-t2v",
    )
    # Load the model first, so that cancellation lands in the denoising loop.
    await backend.generate_video(
        JobRequest(
            job_id="warm",
            input={**request.input, "num_inference_steps": 1},
            upstream_model="wan-t2v",
        ),
        _Progress(),
    )
    transformer = diffusers_resident.RESIDENT.pipe.transformer
    calls: list[int] = []
    hook = transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        progress = _Progress()
        task = asyncio.create_task(backend.generate_video(request, progress))
        await asyncio.wait_for(progress.first_step.wait(), 30)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancel_seconds = time.monotonic() - started
        # generate_video returned only after the worker thread stopped: the pipeline is idle
        # and no more denoising happens.
        assert not diffusers_resident.RESIDENT.lock.locked()
        ran = len(calls)
        await asyncio.sleep(0.3)
        assert len(calls) == ran
        # Two transformer calls per step (CFG); cancelled right after step 1, it stops within
        # a few steps of the 1000 asked for (4 calls here; the bound leaves room for slow CI).
        assert ran < 100, f"{ran} transformer calls: the pipeline was not interrupted"
        assert cancel_seconds < 10
        assert not diffusers_resident.RESIDENT.pipe._interrupt
    finally:
        hook.remove()

    # The pipeline stays usable after an interrupted call.
    result = await backend.generate_video(
        JobRequest(
            job_id="after",
            input={**request.input, "num_inference_steps": 1},
            upstream_model="wan-t2v",
        ),
        _Progress(),
    )
    assert _probe_mp4(result.output.data)[0] == 5


async def test_video_and_image_share_one_resident_pipeline(
    image_weights: Path, video_weights: Path
) -> None:
    await _video_backend(video_weights).generate_video(
        JobRequest(
            job_id="v",
            input={
                "prompt": "x",
                "duration": 0.25,
                "width": 16,
                "height": 16,
                "num_inference_steps": 1,
            },
            upstream_model="wan-t2v",
        ),
        _Progress(),
    )
    wan = weakref.ref(diffusers_resident.RESIDENT.pipe.transformer)
    await _image_backend(image_weights).generate_images(
        ImageRequest(prompt="x", width=16, height=16, upstream_model="flux-1-schnell")
    )
    gc.collect()
    assert wan() is None
    assert resident_model() == str(image_weights / "flux-1-schnell")

    # aclose (server shutdown) unloads the pipeline its backend loaded, not another's.
    await _video_backend(video_weights).aclose()
    assert resident_model() == str(image_weights / "flux-1-schnell")
    await _image_backend(image_weights).aclose()
    assert resident_model() is None


def test_encode_mp4_crops_odd_sizes() -> None:
    import numpy as np

    frames = np.zeros((5, 33, 47, 3), dtype=np.uint8)
    data = encode_mp4(av, frames, 16)
    assert _probe_mp4(data)[:3] == (5, 46, 32)
