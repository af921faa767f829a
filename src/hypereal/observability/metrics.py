"""Prometheus metrics.

Two kinds:

- **counted in this process** (prometheus-client counters and histograms in :data:`REGISTRY`):
  HTTP requests by route template and status with their latency, job run time by model (in
  the process that runs the job), upstream call latency and errors by backend. Label
  children are cached in plain dicts, so a request costs a dict lookup and two updates.
- **read from the database at scrape time** (:func:`database_metrics`): credits debited and
  refunded by model, jobs by state and model, queue depth, webhook attempts and failures.
  The database is the source of truth for these, so they are exact whichever process (API
  server or ``hypereal worker``) did the work, and cost nothing on the request path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from hypereal.store.db import Database
from hypereal.store.writer import Dialect, Ops, Sql

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
# With several server processes (``hypereal serve --processes N``) the parent sets
# PROMETHEUS_MULTIPROC_DIR before they start: prometheus-client then keeps every process's
# counters in files there, and /metrics, whichever process answers it, sums them all.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_THIS_PROCESS = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=_THIS_PROCESS)

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_JOB_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

HTTP_REQUESTS = Counter(
    "hypereal_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ("method", "route", "status"),
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "hypereal_http_request_duration_seconds",
    "Time to answer an HTTP request (to the end of its body), by method and route template.",
    ("method", "route"),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
JOB_RUN_SECONDS = Histogram(
    "hypereal_job_run_seconds",
    "Run time of a job from its start to its end, by model and final state (in the process "
    "that ran it).",
    ("model", "state"),
    buckets=_JOB_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_LATENCY = Histogram(
    "hypereal_upstream_request_duration_seconds",
    "Time until an upstream provider answered (headers), by backend.",
    ("backend",),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "hypereal_upstream_errors",
    "Failed upstream calls by backend and kind (transport, or the HTTP status).",
    ("backend", "kind"),
    registry=REGISTRY,
)

# (method, route, status) -> (counter child, histogram child)
_http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_upstream_children: dict[str, Any] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    children = _http_children.get((method, route, status))
    if children is None:
        children = _http_children[(method, route, status)] = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_LATENCY.labels(method, route),
        )
    children[0].inc()
    children[1].observe(seconds)


def observe_upstream(backend: str, seconds: float) -> None:
    child = _upstream_children.get(backend)
    if child is None:
        child = _upstream_children[backend] = UPSTREAM_LATENCY.labels(backend)
    child.observe(seconds)


def upstream_error(backend: str, kind: str) -> None:
    UPSTREAM_ERRORS.labels(backend, kind).inc()


def observe_job(model: str, state: str, seconds: float) -> None:
    JOB_RUN_SECONDS.labels(model, state).observe(seconds)


# ----------------------------------------------------------------- from the database


@dataclass
class _Snapshot:
    credits: list[Any] = field(default_factory=list)
    jobs: list[Any] = field(default_factory=list)
    attempts: list[Any] = field(default_factory=list)
    deliveries: list[Any] = field(default_factory=list)


def _snapshot_op(_: Dialect) -> Ops[_Snapshot]:
    snapshot = _Snapshot()
    snapshot.credits = yield Sql.all(
        "SELECT kind, model, SUM(amount) AS total FROM ledger_entries "
        "WHERE kind IN ('debit', 'refund') GROUP BY kind, model"
    )
    snapshot.jobs = yield Sql.all(
        "SELECT state, model, COUNT(*) AS n FROM jobs GROUP BY state, model"
    )
    snapshot.attempts = yield Sql.all(
        "SELECT (status_code IS NOT NULL AND status_code >= 200 AND status_code < 300) AS ok, "
        "COUNT(*) AS n FROM webhook_attempts GROUP BY 1"
    )
    snapshot.deliveries = yield Sql.all(
        "SELECT state, COUNT(*) AS n FROM webhook_deliveries GROUP BY state"
    )
    return snapshot


class _DatabaseCollector:
    def __init__(self, snapshot: _Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        debited = CounterMetricFamily(
            "hypereal_credits_debited", "Credits debited, by model.", labels=("model",)
        )
        refunded = CounterMetricFamily(
            "hypereal_credits_refunded", "Credits refunded, by model.", labels=("model",)
        )
        for row in s.credits:
            family = debited if row["kind"] == "debit" else refunded
            family.add_metric((row["model"] or "",), abs(int(row["total"] or 0)))
        yield debited
        yield refunded
        jobs = GaugeMetricFamily(
            "hypereal_jobs", "Jobs by state and model.", labels=("state", "model")
        )
        queued = 0
        for row in s.jobs:
            jobs.add_metric((row["state"], row["model"]), int(row["n"]))
            if row["state"] == "queued":
                queued += int(row["n"])
        yield jobs
        yield GaugeMetricFamily("hypereal_queue_depth", "Jobs waiting to run.", value=queued)
        attempts = CounterMetricFamily(
            "hypereal_webhook_attempts", "Webhook POSTs made (every attempt)."
        )
        failures = CounterMetricFamily(
            "hypereal_webhook_attempt_failures",
            "Webhook POSTs that failed (no answer or a non-2xx status).",
        )
        attempts.add_metric((), sum(int(row["n"]) for row in s.attempts))
        failures.add_metric((), sum(int(row["n"]) for row in s.attempts if not row["ok"]))
        yield attempts
        yield failures
        deliveries = GaugeMetricFamily(
            "hypereal_webhook_deliveries",
            "Webhook deliveries by state (pending, delivered, failed).",
            labels=("state",),
        )
        for row in s.deliveries:
            deliveries.add_metric((row["state"],), int(row["n"]))
        yield deliveries


class DatabaseMetrics:
    """The database-derived families, read at most once per ``max_age`` seconds."""

    def __init__(self, db: Database, max_age: float = 2.0) -> None:
        self.db = db
        self.max_age = max_age
        self._read_at = 0.0
        self._text = b""

    async def text(self) -> bytes:
        now = time.monotonic()
        if not self._text or now - self._read_at >= self.max_age:
            snapshot = await self.db.read(_snapshot_op)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_DatabaseCollector(snapshot))
            self._text = generate_latest(registry)
            self._read_at = now
        return self._text


async def exposition(database: DatabaseMetrics | None) -> bytes:
    """The whole ``/metrics`` page: the counted metrics (of every server process when there
    are several; ``process_*`` of the answering one), then the database's."""
    if MULTIPROCESS_DIR:
        from prometheus_client.multiprocess import MultiProcessCollector

        every_process = CollectorRegistry()
        MultiProcessCollector(every_process, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
        parts: Iterable[bytes] = [generate_latest(every_process), generate_latest(_THIS_PROCESS)]
    else:
        parts = [generate_latest(REGISTRY)]
    if database is not None:
        parts = [*parts, await database.text()]
    return b"".join(parts)
