"""Metrics, request ids, structured logs, liveness and readiness."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hypereal.observability import logs
from hypereal.observability.logs import configure_logging
from hypereal.services import Services
from hypereal.settings import Settings
from tests.conftest import MakeKey, auth


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The shared settings with the no-op test models (a job to submit)."""
    return Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        enable_test_backends=True,
    )


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', metric))
        if metric.split("{")[0] == name and found == labels:
            return float(value)
    return 0.0


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_request_counters_move_by_route_template_and_status(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = auth(await make_key(credits=5))
    before = await scrape(client)
    for _ in range(3):
        assert (await client.get("/v1/credits", headers=key)).status_code == 200
    assert (await client.get("/api/v1/credits")).status_code == 401
    assert (await client.get("/v1/jobs/job_nope", headers=key)).status_code == 404
    assert (await client.get("/no/such/page")).status_code == 404
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "hypereal_http_requests_total"
    assert moved(requests, method="GET", route="/v1/credits", status="200") == 3
    assert moved(requests, method="GET", route="/api/v1/credits", status="401") == 1
    # The template, never the raw path (job ids would make a series each).
    assert moved(requests, method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert moved(requests, method="GET", route="<unmatched>", status="404") == 1
    assert "job_nope" not in after and "/no/such/page" not in after
    count = "hypereal_http_request_duration_seconds_count"
    assert moved(count, method="GET", route="/v1/credits") == 3
    bucket = "hypereal_http_request_duration_seconds_bucket"
    assert moved(bucket, method="GET", route="/v1/credits", le="+Inf") == 3


async def test_credits_and_jobs_metrics_come_from_the_database(
    client: httpx.AsyncClient, services: Services, make_key: MakeKey
) -> None:
    from hypereal.domain import jobs, ledger

    key = auth(await make_key(credits=50))
    account = (await client.get("/v1/credits", headers=key)).json()["accountId"]
    entry = await ledger.debit(
        services.db, account, 7, reference="r1", description="test", model="m-one"
    )
    await ledger.refund(services.db, entry.id, amount=2)
    await jobs.submit(
        services.db,
        jobs.NewJob(account_id=account, type="video", model="m-two", input={}, credits=3, media={}),
    )
    text = await scrape(client)
    assert sample(text, "hypereal_credits_debited_total", model="m-one") == 7
    assert sample(text, "hypereal_credits_refunded_total", model="m-one") == 2
    assert sample(text, "hypereal_credits_debited_total", model="m-two") == 3
    assert sample(text, "hypereal_jobs", state="queued", model="m-two") == 1
    assert sample(text, "hypereal_queue_depth") >= 1
    assert "hypereal_webhook_attempts_total" in text
    assert "hypereal_webhook_attempt_failures_total" in text


async def test_a_request_id_round_trips_and_one_is_made_otherwise(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = auth(await make_key())
    given = await client.get("/v1/credits", headers={**key, "X-Request-Id": "abc-123.x"})
    assert given.headers["x-request-id"] == "abc-123.x"
    made = await client.get("/v1/credits", headers=key)
    assert re.fullmatch(r"[0-9a-f]{24}", made.headers["x-request-id"])
    other = await client.get("/v1/credits", headers=key)
    assert other.headers["x-request-id"] != made.headers["x-request-id"]
    # On errors and outside the API too; an unusable id (spaces, too long) is replaced.
    refused = await client.get("/api/v1/credits", headers={"X-Request-Id": "req-401"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "req-401"
    health = await client.get("/health", headers={"X-Request-Id": "has spaces"})
    assert re.fullmatch(r"[0-9a-f]{24}", health.headers["x-request-id"])
    long = await client.get("/health", headers={"X-Request-Id": "x" * 200})
    assert long.headers["x-request-id"] != "x" * 200


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging(level="INFO", json=True, stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logs._access_writer = None  # the access line back to the (now quiet) logging path


async def test_access_lines_are_json_with_the_request_id_key_and_account(
    client: httpx.AsyncClient,
    make_key: MakeKey,
    json_logs: io.StringIO,
) -> None:
    secret = await make_key(credits=1)
    response = await client.get(
        "/v1/credits", headers={**auth(secret), "X-Request-Id": "trace-me-1"}
    )
    account = response.json()["accountId"]
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line]
    (access,) = [line for line in lines if line.get("request_id") == "trace-me-1"]
    assert access["event"] == "request" and access["logger"] == "hypereal.access"
    assert access["level"] == "info" and access["status"] == 200
    assert access["route"] == "/v1/credits" and access["method"] == "GET"
    assert access["account_id"] == account and access["key_id"].startswith("key_")
    assert isinstance(access["duration_ms"], float) and access["timestamp"].endswith("Z")
    # Other loggers' lines are JSON too, without uvicorn's coloured copy of its message.
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]", 7, extra={"color_message": "\x1b[36m%d\x1b[0m"}
    )
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line]
    (started,) = [line for line in lines if line["event"] == "Started server process [7]"]
    assert started["level"] == "info" and started["logger"] == "uvicorn.error"
    assert "color_message" not in started


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_taskiqs_line_per_queue_message_is_kept_only_at_debug(level: str) -> None:
    """A worker reads a queue message per job: taskiq's INFO line for each (which names its
    message id, not the job) is dropped unless the level is DEBUG; its warnings stay."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    receiver = logging.getLogger("taskiq.receiver.receiver")
    try:
        configure_logging(level=level, json=True, stream=stream)
        receiver.info("Executing task %s with ID: %s", "hypereal.run_job", "abc")
        receiver.warning("Cannot parse message: %s", "x")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        receiver.setLevel(logging.NOTSET)
        logs._access_writer = None
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines() if line]
    executing = "Executing task hypereal.run_job with ID: abc"
    assert ("Cannot parse message: x" in events) and ((executing in events) == (level == "DEBUG"))


async def test_a_job_submission_logs_its_job_id_and_model(
    client: httpx.AsyncClient, make_key: MakeKey, json_logs: io.StringIO
) -> None:
    key = auth(await make_key(credits=5))
    response = await client.post(
        "/api/v1/audio/generate",
        headers={**key, "X-Request-Id": "job-trace"},
        json={"model": "noop-audio", "input": {"text": "hi"}},
    )
    assert response.status_code == 202, response.text
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line]
    (access,) = [line for line in lines if line.get("request_id") == "job-trace"]
    assert access["job_id"] == response.json()["jobId"]
    assert access["model"] == "noop-audio"
    assert access["route"] == "/api/v1/audio/generate" and access["status"] == 202


def test_logs_are_plain_text_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = Terminal()
    try:
        configure_logging(level="INFO", stream=stream)
        logging.getLogger("hypereal.test").info("hello %s", "there")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logs._access_writer = None
    line = stream.getvalue().strip()
    assert "hello there" in line and "hypereal.test" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


async def test_health_is_liveness_and_ready_checks_every_dependency(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
    }


async def test_ready_is_503_naming_the_database_when_it_is_gone(
    client: httpx.AsyncClient, services: Services
) -> None:
    path = services.db.url.split("///", 1)[1]
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    ready = await client.get("/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith(
        ("RuntimeError: the database file", "OperationalError: no such table")
    )
    assert body["checks"]["storage"] == "ok" and body["checks"]["broker"] == "ok"
    assert body["error"].startswith("Not ready: database (")
    assert (await client.get("/health")).status_code == 200  # still alive


async def test_ready_is_503_naming_the_broker_when_redis_is_unreachable(
    tmp_path: Path,
) -> None:
    from hypereal.app import create_app
    from hypereal.services import build_services
    from hypereal.settings import Settings
    from tests.support.servers import free_port

    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    services = build_services(settings)
    await services.migrate()
    app = create_app(settings, services=services, lifespan_hooks=())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        ready = await client.get("/ready")
    await services.close()
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["storage"] == "ok"
    assert checks["broker"] != "ok"
    assert "broker (" in ready.json()["error"]


async def test_ready_is_503_when_the_postgresql_database_is_dropped(tmp_path: Path) -> None:
    from hypereal.app import create_app
    from hypereal.services import build_services
    from tests.support.infra import (
        ensure_postgres,
        postgres_admin_dsn,
        temporary_postgres_database,
    )

    if not ensure_postgres():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started")
    import asyncpg

    with temporary_postgres_database() as url:
        settings = Settings(data_dir=tmp_path / "data", bootstrap_admin=False, database_url=url)
        services = build_services(settings)
        await services.migrate()
        app = create_app(settings, services=services, lifespan_hooks=())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/ready")).status_code == 200
            name = url.rsplit("/", 1)[1]
            admin = await asyncpg.connect(postgres_admin_dsn())
            try:
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            finally:
                await admin.close()
            ready = await client.get("/ready")
        await services.close()
    assert ready.status_code == 503, ready.text
    assert ready.json()["checks"]["database"] != "ok"
    assert ready.json()["error"].startswith("Not ready: database (")


async def test_added_response_headers_go_through_the_list_or_a_send_wrapper() -> None:
    """``add_response_headers``: with ObservabilityMiddleware outside, the headers join its
    list (``send`` unchanged); without it, ``send`` is wrapped and adds them to the start,
    in a new message (the response's own list untouched)."""
    from starlette.types import Message

    from hypereal.observability.middleware import RESPONSE_HEADERS, add_response_headers

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    limits = [(b"x-ratelimit-limit", b"10")]
    listed: list[tuple[bytes, bytes]] = [(b"x-request-id", b"r1")]
    scope: dict[str, object] = {RESPONSE_HEADERS: listed}
    assert add_response_headers(scope, send, limits) is send
    assert listed == [(b"x-request-id", b"r1"), (b"x-ratelimit-limit", b"10")]

    wrapped = add_response_headers({}, send, limits)
    own = [(b"content-type", b"application/json")]
    start: Message = {"type": "http.response.start", "status": 200, "headers": own}
    await wrapped(start)
    await wrapped({"type": "http.response.body", "body": b"{}"})
    assert sent[0]["headers"] == [*own, (b"x-ratelimit-limit", b"10")]
    assert own == [(b"content-type", b"application/json")]
    assert sent[1] == {"type": "http.response.body", "body": b"{}"}
