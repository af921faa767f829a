"""Two `hypereal serve` processes on one database (one SQLite file, or one PostgreSQL
database): the balance is exact across processes, and a key revoked through one process is
refused by the other on its next request.

500 concurrent paid image requests are split between the processes; the model is a fixed-price
image model served by the offline `noop` test backend (no GPU, no network beyond loopback),
priced by an operator catalogue file so that the balance is not a multiple of the price."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hypereal.domain import ledger
from hypereal.store.db import Database
from tests.support.infra import ensure_postgres, temporary_postgres_database
from tests.support.processes import process, wait_until_healthy
from tests.support.servers import free_port

HYPEREAL = str(Path(sys.executable).with_name("hypereal"))

MODEL = "two-process-image"
COST = 7
REQUESTS = 500
# Not a multiple of COST, and short of REQUESTS * COST: some requests must answer 402. More
# successes than either process gets requests (REQUESTS / 2): both must have debited.
BALANCE = 300 * COST + 4
SUCCESSES = BALANCE // COST

CATALOGUE = f"""
[[models]]
slug = "{MODEL}"
name = "Two-process test image"
modality = "image"
timeout_seconds = 60
price = {{ credits = {COST} }}
params = [{{ name = "prompt", type = "string", required = true }}]
bindings = [{{ backend = "noop" }}]
"""


@dataclass
class Cluster:
    """Two API processes (A and B) on one database, and an admin key."""

    database_url: str
    urls: tuple[str, str]
    admin_key: str


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'hypereal.db'}"
        return
    if not ensure_postgres():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started")
    with temporary_postgres_database() as url:
        yield url


def base_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(CATALOGUE)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("HYPEREAL_") or key == "HYPEREAL_TEST_PG_DSN"
    }
    return {
        **env,
        "HYPEREAL_DATA_DIR": str(tmp_path / "data"),
        "HYPEREAL_DATABASE_URL": database_url,
        "HYPEREAL_ENABLE_TEST_BACKENDS": "1",
        "HYPEREAL_BACKENDS": json.dumps({"noop": {"type": "noop", "delay_seconds": 0}}),
        "HYPEREAL_CATALOGUE_FILE": str(catalogue),
        "HYPEREAL_BOOTSTRAP_ADMIN": "false",
        # Each process counts requests per key in memory: room for every request here.
        "HYPEREAL_RATE_LIMIT_PER_HOUR": str(100 * REQUESTS),
    }


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([HYPEREAL, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"hypereal {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@contextmanager
def server(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`hypereal serve` on 127.0.0.1:port until the block ends."""
    env = {**env, "HYPEREAL_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    args = [HYPEREAL, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with process(args, env, log) as proc:
        yield proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Cluster]:
    """One pair of processes per database, shared by this module's tests (each test pays with
    an account of its own)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    env = base_env(tmp_path, database_url)
    # Migrates the database first, before either server starts.
    admin_key = cli(env, "keys", "create", "--admin", "--name", "admin").strip().splitlines()[-1]
    with ExitStack() as stack:
        ports = free_port(), free_port()
        while ports[0] == ports[1]:
            ports = ports[0], free_port()
        urls = tuple(f"http://127.0.0.1:{port}" for port in ports)
        started = [
            (url, stack.enter_context(server(env, port, tmp_path / f"api-{name}.log")), name)
            for url, port, name in zip(urls, ports, "ab", strict=True)
        ]
        for url, proc, name in started:  # both start at once; wait for each
            wait_until_healthy(url, proc, tmp_path / f"api-{name}.log")
        yield Cluster(database_url, (urls[0], urls[1]), admin_key)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create_user(client: httpx.AsyncClient, cluster: Cluster, credits: int) -> dict[str, str]:
    """A new account with ``credits`` and a key, made through process A's admin API."""
    created = await client.post(
        f"{cluster.urls[0]}/v1/admin/keys",
        json={"name": "payer", "credits": credits},
        headers=bearer(cluster.admin_key),
    )
    assert created.status_code == 201, created.text
    body = created.json()
    return {"key": body["key"], "id": body["id"], "accountId": body["accountId"]}


async def generate(client: httpx.AsyncClient, url: str, key: str, n: int) -> httpx.Response:
    return await client.post(
        f"{url}/v1/images/generate",
        json={"model": MODEL, "prompt": f"picture {n}"},
        headers=bearer(key),
    )


async def admin_balance(client: httpx.AsyncClient, cluster: Cluster, url: str, account: str) -> int:
    answer = await client.get(
        f"{url}/v1/admin/accounts/{account}/balance", headers=bearer(cluster.admin_key)
    )
    assert answer.status_code == 200, answer.text
    return int(answer.json()["balance"])


async def spend_concurrently(cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=120) as setup:
        user = await create_user(setup, cluster, BALANCE)
        assert await admin_balance(setup, cluster, cluster.urls[1], user["accountId"]) == BALANCE
    # A client of its own for the burst: no kept-alive connection from the calls above that
    # the server might close (idle) just as a request of the burst reuses it.
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = asyncio.Event()

        async def one(n: int) -> httpx.Response:
            await start.wait()
            return await generate(client, cluster.urls[n % 2], user["key"], n)

        tasks = [asyncio.create_task(one(n)) for n in range(REQUESTS)]
        await asyncio.sleep(0)  # every request waits at the start line
        start.set()
        answers = await asyncio.gather(*tasks)

        statuses = Counter(answer.status_code for answer in answers)
        assert set(statuses) <= {200, 402}, {
            status: next(a.text for a in answers if a.status_code == status)
            for status in statuses
            if status not in (200, 402)
        }
        assert statuses[200] == SUCCESSES, statuses
        assert statuses[402] == REQUESTS - SUCCESSES, statuses
        # Both processes debited (each got REQUESTS / 2 < SUCCESSES requests).
        for parity in (0, 1):
            assert any(a.status_code == 200 for a in answers[parity::2]), parity
        assert all(a.json()["creditsUsed"] == COST for a in answers if a.status_code == 200)

        remaining = BALANCE - SUCCESSES * COST
        assert 0 <= remaining < COST
        for url in cluster.urls:
            assert await admin_balance(client, cluster, url, user["accountId"]) == remaining

    db = Database(cluster.database_url)
    try:
        assert await ledger.balance(db, user["accountId"]) == remaining
        assert await ledger.ledger_sum(db, user["accountId"]) == remaining
        entries = await ledger.entries(db, user["accountId"], limit=10 * REQUESTS)
        kinds = Counter(entry.kind for entry in entries)
        assert kinds == {"grant": 1, "debit": SUCCESSES}, kinds
        assert sum(entry.amount for entry in entries) == remaining
        assert {entry.amount for entry in entries if entry.kind == "debit"} == {-COST}
        # Every debit saw the balance its predecessors left: no two took the same credits.
        afters = sorted((e.balance_after for e in entries if e.kind == "debit"), reverse=True)
        assert afters == [BALANCE - COST * (i + 1) for i in range(SUCCESSES)]
    finally:
        await db.dispose()


def test_concurrent_paid_requests_on_two_processes_spend_the_balance_exactly(
    cluster: Cluster,
) -> None:
    asyncio.run(spend_concurrently(cluster))


async def revoke_across_processes(cluster: Cluster) -> None:
    process_a, process_b = cluster.urls
    async with httpx.AsyncClient(timeout=30) as client:
        user = await create_user(client, cluster, 10 * COST)
        credits = await client.get(f"{process_b}/v1/credits", headers=bearer(user["key"]))
        assert credits.status_code == 200, credits.text
        assert (await generate(client, process_b, user["key"], 0)).status_code == 200

        revoked = await client.post(
            f"{process_a}/v1/admin/keys/{user['id']}/revoke", headers=bearer(cluster.admin_key)
        )
        assert revoked.status_code == 200, revoked.text

        refused = await generate(client, process_b, user["key"], 1)
        assert refused.status_code == 401, refused.text
        # Refused before any charge: the one image before the revocation is all it paid.
        assert await admin_balance(client, cluster, process_b, user["accountId"]) == 9 * COST
        assert (await generate(client, process_a, user["key"], 2)).status_code == 401
        for url in cluster.urls:
            answer = await client.get(f"{url}/v1/credits", headers=bearer(user["key"]))
            assert answer.status_code == 401, answer.text


def test_a_key_revoked_through_one_process_is_refused_by_the_other(cluster: Cluster) -> None:
    asyncio.run(revoke_across_processes(cluster))
