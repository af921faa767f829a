"""The in-process metrics that requests to the API do not move: upstream latency and errors
by backend (a real loopback server), and job run time by model (a no-op job run to its end)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hypereal.backends.base import BackendError
from hypereal.backends.upstream.http import UpstreamHttp
from hypereal.backends.upstream.options import HttpOptions
from hypereal.observability.metrics import REGISTRY
from tests.support.servers import free_port, serve_app


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _answer(request: Request) -> JSONResponse:
    status = int(request.path_params["status"])
    return JSONResponse({"error": {"message": "no"}} if status >= 400 else {"ok": True}, status)


def _client(base_url: str, provider: str) -> UpstreamHttp:
    options = HttpOptions(
        backend=provider,
        base_url=base_url,
        api_key=None,
        request_timeout=5,
        download_timeout=5,
        retries=0,
        allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),),
    )
    return UpstreamHttp(provider, options, auth=None)


async def test_upstream_latency_and_errors_are_counted_by_backend() -> None:
    app = Starlette(routes=[Route("/status/{status}", _answer)])
    with serve_app(app) as url:
        client = _client(url, "metrics-test-upstream")
        try:
            before = value(
                "hypereal_upstream_request_duration_seconds_count",
                backend="metrics-test-upstream",
            )
            await client.request("GET", "/status/200")
            await client.request("GET", "/status/200")
            with pytest.raises(BackendError):
                await client.request("GET", "/status/503")
        finally:
            await client.aclose()
    after = value(
        "hypereal_upstream_request_duration_seconds_count", backend="metrics-test-upstream"
    )
    assert after - before == 3  # every answer, errors included, is timed
    assert value("hypereal_upstream_errors_total", backend="metrics-test-upstream", kind="503") == 1

    closed = _client(f"http://127.0.0.1:{free_port()}", "metrics-test-closed")
    try:
        with pytest.raises(BackendError):
            await closed.request("GET", "/anything")
    finally:
        await closed.aclose()
    assert (
        value("hypereal_upstream_errors_total", backend="metrics-test-closed", kind="transport")
        == 1
    )


async def test_job_run_time_is_observed_by_model_and_state(tmp_path: Path) -> None:
    from hypereal.app import create_app
    from hypereal.domain import keys, ledger
    from hypereal.services import build_services
    from hypereal.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        enable_test_backends=True,
    )
    services = build_services(settings)
    await services.migrate()
    app = create_app(settings, services=services)
    name = "hypereal_job_run_seconds_count"
    before = value(name, model="noop-audio", state="completed")
    async with app.router.lifespan_context(app):
        account = await keys.create_account(services.db, "t")
        await ledger.grant(services.db, account, 5)
        key = (await keys.create_key(services.db, account)).secret
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            headers = {"Authorization": f"Bearer {key}"}
            job = await c.post(
                "/v1/audio/generate",
                headers=headers,
                json={"model": "noop-audio", "input": {"text": "hi"}},
            )
            assert job.status_code == 202, job.text
            for _ in range(200):
                polled = await c.get(f"/v1/jobs/{job.json()['jobId']}", headers=headers)
                if polled.json()["status"] == "completed":
                    break
                await asyncio.sleep(0.02)
            assert polled.json()["status"] == "completed"
    await services.close()
    assert value(name, model="noop-audio", state="completed") - before == 1
