"""A tiny, randomly initialised Qwen-Image-Edit pipeline directory, built offline from configs.

:func:`save_qwen_image_edit` lays it out like ``hf download Qwen/Qwen-Image-Edit``:
``model_index.json`` naming ``QwenImageEditPipeline`` (its processor a ``Qwen2VLProcessor``)
and the ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``processor`` and
``scheduler`` subfolders, ``processor/`` holding ``preprocessor_config.json``,
``video_preprocessor_config.json``, the tokenizer files and ``chat_template.jinja``.

Shapes follow diffusers' own ``tests/pipelines/qwenimage`` dummies, except that the VAE
downsamples 8x like the real one, so sizes behave as in production, and is very thin (the
pipeline encodes the source resized to about 1 MP whatever the output size). The Qwen2
tokenizer is byte-level BPE without merges (every byte is a token) plus the chat/vision special
tokens of the pipeline's prompt template; the image processor is capped at 56x56 pixels, so
the vision tower sees a handful of patches whatever the source image's size.

The processor folder is written by hand rather than by ``Qwen2VLProcessor.save_pretrained``:
building a ``Qwen2VLProcessor`` needs its torchvision-only video processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel

SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
HIDDEN = 16
Z_DIM = 4
# Qwen2-VL's chat template, cut down to text and images.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer() -> Any:
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=1024)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _text_encoder(tokenizer: Any) -> Any:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = transformers.Qwen2_5_VLConfig(
        text_config={
            "hidden_size": HIDDEN,
            "intermediate_size": HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": HIDDEN,
            "intermediate_size": HIDDEN,
            "num_heads": 2,
            "out_hidden_size": HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        vocab_size=len(tokenizer),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def _write_processor(directory: Path, tokenizer: Any) -> None:
    """``processor/`` as the real repository has it (image and video configs, tokenizer, chat
    template), the configs naming the torchvision-backed classes like the published ones."""
    transformers.Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=28 * 28,
        max_pixels=56 * 56,
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_config = directory / "preprocessor_config.json"
    config = json.loads(image_config.read_text())
    config.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor")
    image_config.write_text(json.dumps(config, indent=2))
    video = {k: v for k, v in config.items() if k != "image_processor_type"}
    video["video_processor_type"] = "Qwen2VLVideoProcessor"
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def save_qwen_image_edit(directory: Path) -> Path:
    """Write the tiny pipeline to ``directory`` (created); returns it."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = _text_encoder(tokenizer)
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=Z_DIM * 4,
        out_channels=Z_DIM,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=2,  # its 3D convolutions encode the ~1 MP condition image: keep them thin
        z_dim=Z_DIM,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * Z_DIM,
        latents_std=[1.0] * Z_DIM,
    )
    pipeline = diffusers.QwenImageEditPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=None,  # written below, see the module docstring
        transformer=transformer,
    )
    pipeline.save_pretrained(directory)
    _write_processor(directory / "processor", tokenizer)
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2))
    return directory
