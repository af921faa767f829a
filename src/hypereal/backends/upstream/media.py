"""Input files as data URIs, output ``data:`` URIs decoded, and output types sniffed."""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote_to_bytes

from hypereal.backends.base import BackendError, MediaBlob
from hypereal.media.sniff import sniff_content_type


def to_data_uri(blob: MediaBlob) -> str:
    """``data:<type>;base64,...`` for an input file; every provider accepts data URIs, which
    spares us a public upload location for fetched inputs."""
    return f"data:{blob.content_type};base64,{base64.b64encode(blob.data).decode('ascii')}"


def decode_data_uri(uri: str) -> tuple[bytes, str | None]:
    """Bytes and declared MIME type of a ``data:`` URI; raises BackendError if malformed."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise BackendError("Upstream returned a malformed data URI")
    meta = header[len("data:") :].split(";")
    try:
        if "base64" in meta[1:]:
            data = base64.b64decode(payload, validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise BackendError("Upstream returned a malformed data URI") from exc
    return data, meta[0] or None


def sniff_media_type(data: bytes) -> str | None:
    """The media type named by the file's magic number, or ``None`` when unrecognised
    (JSON is not media: an upstream error body must not pass for a result)."""
    content_type = sniff_content_type(data)
    return None if content_type == "application/json" else content_type


def specific_type(content_type: str | None) -> str | None:
    """The bare MIME type of a Content-Type, or ``None`` when it says nothing
    (``application/octet-stream`` and friends)."""
    value = (content_type or "").split(";", 1)[0].strip().lower()
    return value if value and not value.endswith("octet-stream") else None
