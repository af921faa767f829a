"""The real PostgreSQL and Redis servers these machines run on 127.0.0.1; started when down
(the same commands the machine image uses), and a throwaway database per test."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypereal.store.db import Database

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait(host: str, port: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _listening(host, port):
            return True
        time.sleep(0.3)
    return False


def ensure_postgres() -> bool:
    """True when PostgreSQL answers on 127.0.0.1:5432, starting the local cluster if needed."""
    if _listening(PG_HOST, PG_PORT):
        return True
    conf = Path("/etc/postgresql")
    if shutil.which("pg_ctlcluster") and conf.is_dir():
        for version in sorted(p.name for p in conf.iterdir()):
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                check=False,
                capture_output=True,
            )
    return _wait(PG_HOST, PG_PORT)


def ensure_redis() -> bool:
    """True when Redis answers on 127.0.0.1:6379, starting a local server if needed."""
    if _listening(REDIS_HOST, REDIS_PORT):
        return True
    if shutil.which("redis-server"):
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=False,
            capture_output=True,
        )
    return _wait(REDIS_HOST, REDIS_PORT)


def postgres_admin_dsn() -> str:
    return os.environ.get("HYPEREAL_TEST_PG_DSN", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test")


@contextmanager
def temporary_postgres_database() -> Iterator[str]:
    """Create a uniquely named database; yield its SQLAlchemy asyncpg URL; drop it after."""
    import asyncio

    import asyncpg

    name = f"hypereal_test_{secrets.token_hex(6)}"
    admin_dsn = postgres_admin_dsn()

    async def _exec(sql: str) -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def run(sql: str) -> None:
        # A thread of its own, so this works inside a running event loop too.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _exec(sql)).result()

    run(f'CREATE DATABASE "{name}"')
    base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def migrated_database(kind: str, folder: Path) -> AsyncIterator[Database]:
    """A :class:`Database` at the latest migration: ``"sqlite"``, a file in ``folder``, or
    ``"postgresql"``, a throwaway database (see :func:`migrated_postgres`)."""
    if kind == "postgresql":
        async with migrated_postgres() as database:
            yield database
        return
    from hypereal.store.db import Database
    from hypereal.store.migrate import upgrade_to_head

    database = Database(f"sqlite+aiosqlite:///{folder / 'hypereal.db'}")
    await upgrade_to_head(database.engine)
    try:
        yield database
    finally:
        await database.dispose()


@asynccontextmanager
async def migrated_postgres() -> AsyncIterator[Database]:
    """A :class:`Database` on a throwaway PostgreSQL database at the latest migration
    (PostgreSQL started when down; the test fails when it cannot be)."""
    import pytest

    from hypereal.store.db import Database
    from hypereal.store.migrate import upgrade_to_head

    if not ensure_postgres():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started")
    with temporary_postgres_database() as url:
        database = Database(url)
        await upgrade_to_head(database.engine)
        try:
            yield database
        finally:
            await database.dispose()
