"""A backend that generates nothing: tiny valid files after an optional delay.

For benchmarks and tests only. It is registered (type ``noop``, instance ``noop``, models
``noop-video``, ``noop-audio``, ``noop-3d`` and ``noop-image``) only when the setting
``enable_test_backends`` (``HYPEREAL_ENABLE_TEST_BACKENDS=1``) is on; a production server
never lists it. Options (``[backends.noop]``): ``delay_seconds`` (default 0), ``fail`` (an
error message: every request fails with it).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import math
import struct
import wave
import zlib
from collections.abc import Mapping
from typing import Any

from hypereal.backends.base import (
    BackendError,
    ImageRequest,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)

NOOP_TYPES = {"noop": "hypereal.backends.noop:NoopBackend"}
NOOP_INSTANCES: dict[str, dict[str, Any]] = {"noop": {"type": "noop"}}


def _noop_model(
    modality: str, label: str, params: list[dict[str, Any]], timeout_seconds: int = 600
) -> dict[str, Any]:
    """The catalogue entry of ``noop-<modality>``, served by the noop instance."""
    return {
        "slug": f"noop-{modality}",
        "name": f"No-op {label} (bench/test only)",
        "modality": modality,
        "concurrency": 16,
        "timeout_seconds": timeout_seconds,
        "price": {"credits": 1},
        "params": params,
        "bindings": [{"backend": "noop"}],
    }


NOOP_CATALOGUE: dict[str, Any] = {
    "models": [
        _noop_model(
            "video",
            "video",
            [
                {"name": "prompt", "type": "string", "max_length": 4000},
                {"name": "image", "type": "media"},
                {"name": "duration", "type": "integer", "default": 5, "minimum": 1, "maximum": 60},
            ],
        ),
        _noop_model(
            "audio",
            "audio",
            [
                {"name": "text", "type": "string", "max_length": 5000},
                {"name": "audio", "type": "media"},
                {"name": "format", "type": "string", "default": "wav", "choices": ["wav"]},
            ],
        ),
        _noop_model("3d", "3D", [{"name": "image", "type": "media"}]),
        _noop_model(
            "image",
            "image",
            [
                {"name": "prompt", "type": "string", "required": True},
                {"name": "size", "type": "string", "default": "8*8"},
            ],
            timeout_seconds=60,
        ),
    ]
}


# ------------------------------------------------------------------ tiny valid files


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


@functools.cache
def tiny_mp4() -> bytes:
    """An ISO BMFF file with ``ftyp``, a ``moov`` holding an empty ``mvhd``, and ``mdat``."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2mp41")
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = _box(
        b"mvhd",
        struct.pack(">IIIII", 0, 0, 0, 1000, 0)
        + struct.pack(">IH", 0x10000, 0x100)
        + bytes(10)
        + matrix
        + bytes(24)
        + struct.pack(">I", 1),
    )
    return ftyp + _box(b"moov", mvhd) + _box(b"mdat", b"")


@functools.cache
def tone_wav(seconds: float = 0.25, rate: int = 8000, hz: float = 440.0) -> bytes:
    """A mono 16-bit PCM WAV of a sine tone.

    The no-op files are made once per process and arguments (``functools.cache``): they
    never change, and a no-op generation should cost the platform, not a sine loop."""
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / rate)))
        for i in range(int(seconds * rate))
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return buffer.getvalue()


@functools.cache
def empty_glb() -> bytes:
    """A binary glTF 2.0 file with one empty scene."""
    document = {"asset": {"version": "2.0", "generator": "hypereal noop"}, "scenes": [{}]}
    chunk = json.dumps(document, separators=(",", ":")).encode()
    chunk += b" " * (-len(chunk) % 4)
    body = struct.pack("<I4s", len(chunk), b"JSON") + chunk
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


@functools.cache
def tiny_png(width: int = 8, height: int = 8) -> bytes:
    """A grey RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- backend


class NoopBackend:
    """Serves every modality with tiny files; see the module doc for its options."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.delay = float(options.get("delay_seconds", 0) or 0)
        self.fail = options.get("fail")

    async def _pretend(self, progress: ProgressCallback | None) -> None:
        steps = 4
        for step in range(steps):
            await asyncio.sleep(self.delay / steps)
            if progress is not None:
                await progress((step + 1) / steps, f"step {step + 1} of {steps}")
        if self.fail:
            raise BackendError(str(self.fail))

    async def generate_video(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        await self._pretend(progress)
        return JobResult(MediaBlob(tiny_mp4(), "video/mp4"))

    async def generate_audio(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        await self._pretend(progress)
        return JobResult(
            MediaBlob(tone_wav(), "audio/wav"), data={"text": request.input.get("text")}
        )

    async def generate_mesh(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        await self._pretend(progress)
        return JobResult(MediaBlob(empty_glb(), "model/gltf-binary"))

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        await self._pretend(None)
        return [MediaBlob(tiny_png(), "image/png")]
