"""The bytes of one media file with their MIME type: what backends return, fetches give and
stores keep."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaBlob:
    """Bytes of one media file with its MIME type (sniffed or known, never guessed)."""

    data: bytes
    content_type: str
