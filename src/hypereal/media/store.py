"""Where generated media lives: a local directory served at ``/files/...`` (default) or an
S3-compatible bucket. Both hand out absolute URLs."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from hypereal.media.sniff import extension_for
from hypereal.store.ids import new_id

PRESIGNED_URL_SECONDS = 7 * 24 * 3600  # S3's maximum


class MediaStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store ``data`` under ``key``; return its absolute URL."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The stored bytes, or None."""
        ...

    def url_for(self, key: str) -> str: ...


def new_media_key(kind: str, content_type: str) -> str:
    """``image/2026/11/img_xxx.png``: dated folders keep directories small."""
    now = datetime.now(UTC)
    return f"{kind}/{now:%Y/%m}/{new_id(kind[:3])}.{extension_for(content_type)}"


# Files up to this size are written on the event loop's thread: into the page cache, that is
# a few system calls, while a hop to a worker thread made the loop wait for the GIL behind
# the thread's Python code (a tenth of an image request's time in the bench's profile).
INLINE_WRITE_BYTES = 256 * 1024


class LocalMediaStore:
    """Files under a directory; the API serves them at ``{base_url}/files/{key}``."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        self._resolved_root = root.resolve()
        self.base_url = base_url.rstrip("/")
        self._folders: set[Path] = set()  # folders known to exist (made by a write)

    def path_for(self, key: str) -> Path | None:
        """The file for ``key``, or None when the key is not a plain relative path under the
        root (empty, absolute, ``..``/``.``/empty segments, backslashes, NUL bytes).

        Checked on the text, with no file system call: resolving the path cost two
        ``realpath`` walks (a dozen ``lstat``) per stored image, a fifth of an image request."""
        if not key or "\x00" in key or "\\" in key or key.startswith("/"):
            return None
        if any(part in ("", ".", "..") for part in key.split("/")):
            return None
        return self._resolved_root / key

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self.path_for(key)
        if path is None:
            raise ValueError(f"invalid media key {key!r}")

        if len(data) <= INLINE_WRITE_BYTES:
            self._write(path, data)
        else:
            await asyncio.to_thread(self._write, path, data)
        return self.url_for(key)

    def _write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` through a ``.part`` file renamed over it, so readers
        never see half a file. The folder is made on its first write only (a folder removed
        since is made again), with plain ``os`` calls: this runs once per stored file."""
        folder = path.parent
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        partial = f"{path}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(partial, flags, 0o644)
        except FileNotFoundError:  # the folder was removed since
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(partial, path)

    async def get(self, key: str) -> bytes | None:
        path = self.path_for(key)
        if path is None or not path.is_file():
            return None
        return await asyncio.to_thread(path.read_bytes)

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/files/{key}"


class S3MediaStore:
    """An S3-compatible bucket (AWS, MinIO, R2 ...) through boto3 in a worker thread.

    URLs are ``{public_url}/{key}`` when a public base (bucket website, CDN) is configured,
    otherwise presigned GET URLs valid for seven days.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        public_url: str | None,
    ) -> None:
        import boto3  # imported here so the local-only install need not load it

        self.bucket = bucket
        self.public_url = public_url.rstrip("/") if public_url else None
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
        )

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        await asyncio.to_thread(
            self.client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
        )
        return self.url_for(key)

    async def get(self, key: str) -> bytes | None:
        def _get() -> bytes | None:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except self.client.exceptions.NoSuchKey:
                return None
            body: bytes = response["Body"].read()
            return body

        return await asyncio.to_thread(_get)

    def url_for(self, key: str) -> str:
        if self.public_url:
            return f"{self.public_url}/{key}"
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=PRESIGNED_URL_SECONDS,
        )
        return url
