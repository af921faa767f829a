"""Expiring signed URLs for stored media that is not public (uploaded inputs).

A signed URL is ``/files/{key}?expires={unix seconds}&signature={hex}`` where the signature
is HMAC-SHA256, under the server's media signing secret, of ``"{key}\\n{expires}"``. It
works for anyone holding it until ``expires``; the key's owner may also fetch the file with
their API key. The secret is the ``media_signing_secret`` setting, or else a random one the
server keeps in ``{data_dir}/media-signing.key`` (created on first use, mode 0600): every
process serving the same media must share it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

# Uploaded inputs live under this prefix, then the owning account's id.
INPUTS_PREFIX = "inputs/"
DEFAULT_TTL_SECONDS = 3600
SECRET_FILE = "media-signing.key"


def inputs_kind(account_id: str) -> str:
    """The media kind (key prefix) of ``account_id``'s uploaded inputs."""
    return f"{INPUTS_PREFIX}{account_id}"


def input_owner(key: str) -> str | None:
    """The account that owns an input's key (``inputs/{account}/...``); None for a key that
    is not an input, or an input stored before keys named their owner."""
    if not key.startswith(INPUTS_PREFIX):
        return None
    owner = key[len(INPUTS_PREFIX) :].split("/", 1)[0]
    return owner if owner.startswith("acct_") else None


def is_private(key: str) -> bool:
    """Whether ``key`` is served only to its owner or under a signed URL."""
    return key.startswith(INPUTS_PREFIX)


class MediaSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the media signing secret must be at least 16 bytes")
        self._secret = secret

    def signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, base_url: str, key: str, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> str:
        """The absolute URL of ``key`` under ``base_url``, valid for ``ttl_seconds``."""
        expires = int(time.time()) + ttl_seconds
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return f"{base_url.rstrip('/')}/files/{key}?{query}"

    def verify(self, key: str, expires: str, signature: str) -> bool:
        """True when ``signature`` is this server's for ``key`` and ``expires`` is ahead."""
        if not expires.isdigit() or len(expires) > 12 or int(expires) < time.time():
            return False
        return hmac.compare_digest(self.signature(key, int(expires)), signature)


def load_secret(configured: str | None, data_dir: Path) -> bytes:
    """The configured secret, else the one kept in ``data_dir`` (made on first use)."""
    if configured:
        return configured.encode()
    path = data_dir / SECRET_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    # Written whole to a private file first, then linked into place: a process starting at
    # the same time either links first or reads the complete file of the one that did.
    partial = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    try:
        os.link(partial, path)
    except FileExistsError:
        return path.read_bytes().strip()
    finally:
        partial.unlink()
    return secret
