"""Identifiers handed to clients: a short type prefix plus random URL-safe characters."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    """``job_3kT9...``-style id: 16 random bytes, base64url, no padding."""
    return f"{prefix}_{secrets.token_urlsafe(16).replace('-', 'x').replace('_', 'y')}"


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
