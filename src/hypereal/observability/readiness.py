"""Readiness (``GET /ready``): can this process reach its database, broker and media store?

Each check answers ``"ok"`` or why not, within a few seconds; the route answers 503 naming
every dependency that is not ok."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy.engine import make_url

from hypereal.media.store import LocalMediaStore, S3MediaStore
from hypereal.services import Services
from hypereal.store.writer import Dialect, Ops, Sql

CHECK_TIMEOUT_SECONDS = 3.0


def _select_one(_: Dialect) -> Ops[object]:
    row = yield Sql.one("SELECT 1 FROM accounts LIMIT 1")
    return row


def _check_sqlite_file(url: str) -> None:
    """Open the file afresh, read-only: the server's open connections keep reading a deleted
    file, and a new empty one in its place has no tables."""
    path = make_url(url).database
    if not path or path == ":memory:":
        return
    if not Path(path).is_file():
        raise RuntimeError(f"the database file {path} is missing")
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=2)
    try:
        conn.execute("SELECT 1 FROM accounts LIMIT 1").fetchall()
    finally:
        conn.close()


async def check_database(services: Services) -> None:
    db = services.db
    if db.is_sqlite:
        await asyncio.to_thread(_check_sqlite_file, db.url)
    else:
        await db.read(_select_one)


async def check_broker(services: Services) -> None:
    url = services.settings.broker_url
    if not url:
        return  # the in-process queue: nothing to reach
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=CHECK_TIMEOUT_SECONDS)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def check_storage(services: Services) -> None:
    media = services.media
    if isinstance(media, LocalMediaStore):
        await asyncio.to_thread(_check_directory, Path(media.root))
    elif isinstance(media, S3MediaStore):
        await asyncio.to_thread(media.client.head_bucket, Bucket=media.bucket)


def _check_directory(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)  # created on the first write anyway
    if not os.access(root, os.W_OK | os.X_OK):
        raise RuntimeError(f"the media directory {root} is not writable")


CHECKS: dict[str, Callable[[Services], Awaitable[None]]] = {
    "database": check_database,
    "broker": check_broker,
    "storage": check_storage,
}


async def _run(check: Callable[[Services], Awaitable[None]], services: Services) -> str:
    try:
        await asyncio.wait_for(check(services), CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_SECONDS:g} s"
    except Exception as exc:  # any failure is the answer
        return f"{exc.__class__.__name__}: {exc}"[:300]
    return "ok"


async def readiness(services: Services) -> dict[str, str]:
    """Every check's answer, run concurrently: name -> ``"ok"`` or the failure."""
    names = list(CHECKS)
    answers = await asyncio.gather(*(_run(CHECKS[name], services) for name in names))
    return dict(zip(names, answers, strict=True))
