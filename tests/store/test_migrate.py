"""Migrations with database URLs that carry %-escapes: Alembic reads its options through
configparser's interpolation, where a bare ``%`` is an error."""

from __future__ import annotations

import asyncpg

from hypereal.domain import keys, ledger
from hypereal.store.db import Database
from hypereal.store.migrate import alembic_config, upgrade_to_head
from tests.support.infra import ensure_postgres, temporary_postgres_database


def test_a_url_with_percent_escapes_is_kept_as_written() -> None:
    url = "postgresql+asyncpg://app:p%40ss%25word@db.internal/hypereal?host=%2Frun%2Fpostgresql"
    assert alembic_config(url).get_main_option("sqlalchemy.url") == url


async def test_a_postgres_database_reached_by_its_unix_socket_migrates_and_serves() -> None:
    """The URL form that a same-host deployment uses for the PostgreSQL socket
    (``?host=/run/postgresql``, escaped by SQLAlchemy as %2F) migrates and takes writes."""
    assert ensure_postgres()
    with temporary_postgres_database() as tcp_url:
        plain = tcp_url.replace("postgresql+asyncpg://", "postgresql://")
        conn = await asyncpg.connect(plain)
        try:
            socket_dir = str(await conn.fetchval("SHOW unix_socket_directories")).split(",")[0]
        finally:
            await conn.close()
        name = tcp_url.rsplit("/", 1)[1]
        database = Database(f"postgresql+asyncpg://postgres@/{name}?host={socket_dir.strip()}")
        try:
            assert "%2F" in str(database.engine.url)  # the form that broke the migration
            await upgrade_to_head(database.engine)
            account = await keys.create_account(database, "socket")
            await ledger.grant(database, account, 5)
            assert await ledger.balance(database, account) == 5
        finally:
            await database.dispose()
