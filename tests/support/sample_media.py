"""Real output files for the fake providers, and the little file server that hands them out.

Every builder returns bytes that start with the format's true magic number (and, for PNG, WAV and
GLB, are complete valid files), so whatever sniffs or decodes them downstream sees real media.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException, Request, Response
from PIL import Image

from hypereal.backends.noop import tone_wav

MIME_BY_KIND = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "video": "video/mp4",
    "audio": "audio/wav",
    "mesh": "model/gltf-binary",
}


def image_bytes(width: int = 64, height: int = 64, fmt: str = "png") -> bytes:
    """A gradient image encoded by Pillow as ``png``, ``jpeg`` or ``webp``."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            (x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), 128)
            for y in range(height)
            for x in range(width)
        ]
    )
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buffer.getvalue()


def mp4_bytes() -> bytes:
    """An ISO-BMFF file head (``ftyp`` isom box, then an empty ``mdat``): sniffs as video/mp4."""
    ftyp = b"ftyp" + b"isom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"
    mdat = b"mdat" + b"\x00" * 8
    return struct.pack(">I", 4 + len(ftyp)) + ftyp + struct.pack(">I", 4 + len(mdat)) + mdat


def wav_bytes(seconds: float = 0.05, rate: int = 8000) -> bytes:
    """A mono 16-bit PCM WAV of a 440 Hz tone."""
    return tone_wav(seconds, rate, 440.0)


def glb_bytes() -> bytes:
    """A valid binary glTF 2.0 container holding one empty scene."""
    document = json.dumps({"asset": {"version": "2.0"}, "scenes": [{}], "scene": 0}).encode()
    document += b" " * (-len(document) % 4)  # chunks are 4-byte aligned, padded with spaces
    chunk = struct.pack("<I4s", len(document), b"JSON") + document
    return struct.pack("<4sII", b"glTF", 2, 12 + len(chunk)) + chunk


def media_for(kind: str, *, width: int = 64, height: int = 64, fmt: str = "png") -> bytes:
    """Bytes for an output ``kind``: ``image``, ``video``, ``audio`` or ``mesh``."""
    if kind == "image":
        return image_bytes(width, height, fmt)
    return {"video": mp4_bytes, "audio": wav_bytes, "mesh": glb_bytes}[kind]()


def progress_log(step: int, total: int) -> str:
    """One tqdm progress line, as model logs on fal and Replicate carry them."""
    percent = round(100 * step / max(total, 1))
    bar = "█" * (percent // 10)
    return f"{percent:3d}%|{bar:<10}| {step}/{total} [00:01<00:01, 9.99it/s]"


@dataclass(frozen=True)
class Download:
    """One GET of a served file, with the Authorization header it carried (if any)."""

    name: str
    authorization: str | None


@dataclass
class MediaStore:
    """Output files a fake provider serves at ``GET /files/{name}`` (the provider's CDN)."""

    downloads: list[Download] = field(default_factory=list)
    _files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: Request, data: bytes, content_type: str, suffix: str) -> str:
        """Store a file; returns its absolute URL on the fake's own origin."""
        name = f"{uuid.uuid4().hex}.{suffix}"
        with self._lock:
            self._files[name] = (data, content_type)
        return str(request.base_url).rstrip("/") + f"/files/{name}"

    def mount(self, app: FastAPI) -> None:
        """Add the ``GET /files/{name}`` route to ``app``."""

        @app.get("/files/{name}")
        async def get_file(name: str, request: Request) -> Response:
            self.downloads.append(Download(name, request.headers.get("authorization")))
            with self._lock:
                found = self._files.get(name)
            if found is None:
                raise HTTPException(404, "no such file")
            return Response(found[0], media_type=found[1])
