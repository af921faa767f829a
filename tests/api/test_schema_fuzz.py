"""Property-based API tests: schemathesis generates requests from the app's own OpenAPI
schema (both prefixes) and checks every answer with all its checks: no server error, every
status, content type, header and body as documented, invalid data refused, valid data
accepted, authentication honoured.

The server runs for real on loopback. Cheap routes are called with a funded admin key;
routes that charge or generate with a 0-credit key, so a valid request ends at its 402 and
nothing expensive runs. Every backend the catalogue names is configured (the hosted ones
against a closed loopback port: a 0-credit key never reaches them), so no model is a 503.

Reproducible: a fixed seed, and Hypothesis' example database kept in the repo
(``tests/api/schemathesis-db``), so a failure found once is replayed first on every run.
Bounded: ``MAX_EXAMPLES`` per operation (``HYPEREAL_FUZZ_EXAMPLES`` overrides it).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

from hypereal.app import create_app  # noqa: E402
from hypereal.domain import keys, ledger  # noqa: E402
from hypereal.services import build_services  # noqa: E402
from hypereal.settings import Settings  # noqa: E402
from tests.support.servers import serve_app  # noqa: E402

SEED = 20261206
MAX_EXAMPLES = int(os.environ.get("HYPEREAL_FUZZ_EXAMPLES", "12"))
DATABASE = Path(__file__).parent / "schemathesis-db"
CLOSED = "http://127.0.0.1:9"  # nothing listens: never reached with a 0-credit key

# Routes that charge or run a model: called with the 0-credit key.
EXPENSIVE = (
    "/chat",
    "/spicy-chat",
    "/chat/completions",
    "/messages",
    "/images/generate",
    "/images/edit",
    "/images/generations",
    "/images/edits",
    "/audio/speech",
    "/audio/transcriptions",
    "/videos/generate",
    "/audio/generate",
    "/3d/generate",
)

# Valid by the schema but refused for reasons no schema can state, so "valid data accepted"
# also takes: 400 (a media URL that cannot be fetched, a job cursor that is no job of this
# account, a voice the serving backend lacks, a prompt over the model's context) and 402
# (the 0-credit key on the routes that charge).
POSITIVE_STATUSES = ["2xx", "3xx", "400", "401", "402", "403", "404", "409", "429", "5xx"]


def _app() -> Any:
    hosted = {"api_key": "fuzz", "base_url": CLOSED}
    data_dir = Path(tempfile.mkdtemp(prefix="hypereal-fuzz-"))
    atexit.register(shutil.rmtree, data_dir, True)  # also when only collected
    app_settings = Settings(
        data_dir=data_dir,
        bootstrap_admin=False,
        rate_limit_per_hour=10**9,
        backends={
            name: {"type": kind, **hosted}
            for name, kind in (
                ("hypereal", "hypereal"),
                ("fal", "fal"),
                ("replicate", "replicate"),
                ("openai", "openai"),
                ("openrouter", "openai"),
            )
        },
    )
    return create_app(app_settings, services=build_services(app_settings))


APP = _app()
CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "checks": {"positive_data_acceptance": {"expected-statuses": POSITIVE_STATUSES}},
        "generation": {"max-examples": MAX_EXAMPLES},
    }
)
schema = schemathesis.openapi.from_dict(APP.openapi(), config=CONFIG)


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[str, dict[str, str]]]:
    async def prepare() -> dict[str, str]:
        # Its own services on the same database: the server's belong to its event loop.
        services = build_services(APP.state.services.settings)
        try:
            admin = await keys.create_account(services.db, "fuzz admin", is_admin=True)
            await ledger.grant(services.db, admin, 10**6)
            broke = await keys.create_account(services.db, "fuzz 0 credits")
            return {
                "admin": (await keys.create_key(services.db, admin)).secret,
                "broke": (await keys.create_key(services.db, broke)).secret,
            }
        finally:
            await services.close()

    with serve_app(APP) as url:  # migrates the database as it starts
        yield url, asyncio.run(prepare())


def _key_for(path: str, secrets: dict[str, str]) -> str:
    bare = path.removeprefix("/api/v1").removeprefix("/v1")
    return secrets["broke" if bare in EXPENSIVE else "admin"]


@schema.parametrize()
@settings(
    database=DirectoryBasedExampleDatabase(str(DATABASE)),
    # Hypothesis' "ci" profile (loaded when CI is set) derandomizes, which forbids a database;
    # the run is reproducible anyway: schemathesis' fixed seed, and the database replays.
    derandomize=False,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: Any, live: tuple[str, dict[str, str]]) -> None:
    url, secrets = live
    headers = {"Authorization": f"Bearer {_key_for(case.path, secrets)}"}
    case.call_and_validate(base_url=url, headers=headers, timeout=60)
