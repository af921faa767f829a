"""Webhook delivery against a real receiver on 127.0.0.1 that verifies Standard Webhooks
signatures: retries with the same id, 3xx not followed, 410 stops, restarts resume; one
pooled connection across deliveries, a rotated secret signs what follows, and at most
``webhook_max_concurrency`` deliveries at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from sqlalchemy import update
from standardwebhooks import Webhook, WebhookVerificationError
from typer.testing import CliRunner

from hypereal.cli import app as cli_app
from hypereal.domain.webhook_secrets import new_secret
from hypereal.store.models import Account, WebhookDelivery, utcnow
from tests.support.infra import ensure_postgres, temporary_postgres_database
from tests.support.jobs import JobEnv, job_app
from tests.support.polling import eventually
from tests.support.servers import serve_app

PRIVATE_OK = {"allowed_private_networks": ["127.0.0.1/32"]}


@dataclass
class Receiver:
    """Answers ``statuses`` in turn (then 200) and records each verified delivery."""

    statuses: list[int] = field(default_factory=list)
    secret: str | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    redirect_target_hits: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)  # one per TCP connection

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            headers = dict(request.headers)
            if request.client is not None:
                self.peers.append((request.client.host, request.client.port))
            try:
                payload = Webhook(self.secret or "").verify(body, headers) if self.secret else None
                verified = True
            except WebhookVerificationError:
                payload, verified = json.loads(body), False
            self.received.append(
                {
                    "id": headers["webhook-id"],
                    "payload": payload,
                    "ok": verified,
                    "raw": (body, headers),
                }
            )
            status = self.statuses.pop(0) if self.statuses else 200
            extra = {"location": "/elsewhere"} if 300 <= status < 400 else {}
            return Response(status_code=status, headers=extra)

        @app.api_route("/elsewhere", methods=["GET", "POST"])
        async def elsewhere() -> Response:
            self.redirect_target_hits += 1
            return Response(status_code=200)

        return app


@contextmanager
def receiving(receiver: Receiver) -> Iterator[str]:
    with serve_app(receiver.app()) as base:
        yield f"{base}/hook"


async def _submit(env: JobEnv, headers: dict[str, str], url: str, model: str = "test-video") -> str:
    body = {"model": model, "input": {"duration": 1}, "webhook_url": url}
    response = await env.client.post("/v1/videos/generate", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["message"].endswith("sent to your webhook URL.")
    job_id: str = response.json()["jobId"]
    return job_id


async def _deliveries(env: JobEnv, job_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = await env.client.get(f"/v1/jobs/{job_id}/deliveries", headers=headers)
    assert response.status_code == 200
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def _settled(env: JobEnv, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            deliveries = await _deliveries(env, job_id, headers)
            if deliveries and deliveries[0]["status"] != "pending":
                return deliveries[0]
            await asyncio.sleep(0.05)


async def test_signed_webhook_is_retried_until_delivered_with_one_id(tmp_path: Path) -> None:
    receiver = Receiver(statuses=[500, 503])
    with receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK) as env:
            _, headers = await env.new_key()
            secret = (await env.client.get("/v1/webhooks/secret", headers=headers)).json()
            receiver.secret = secret["secret"]
            assert receiver.secret.startswith("whsec_")
            job_id = await _submit(env, headers, url)
            delivery = await _settled(env, job_id, headers)

    assert delivery["status"] == "delivered" and delivery["attempts"] == 3
    assert [a["statusCode"] for a in delivery["attemptLog"]] == [500, 503, 200]
    assert [r["id"] for r in receiver.received] == [delivery["id"]] * 3
    assert all(r["ok"] for r in receiver.received)
    job = receiver.received[-1]["payload"]
    assert job["status"] == "completed" and job["jobId"] == job_id
    assert job["type"] == "video" and job["model"] == "test-video" and job["creditsUsed"] == 3
    assert job["outputUrl"].startswith("http://testserver/files/video/")
    assert "error" not in job


async def test_failure_payload_carries_the_error(tmp_path: Path) -> None:
    receiver = Receiver()
    with receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK) as env:
            _, headers = await env.new_key()
            receiver.secret = (await env.client.get("/v1/webhooks/secret", headers=headers)).json()[
                "secret"
            ]
            job_id = await _submit(env, headers, url, model="test-fail")
            await _settled(env, job_id, headers)
    (received,) = receiver.received
    assert received["ok"]
    assert received["payload"] == {
        "status": "failed",
        "outputUrl": None,
        "jobId": job_id,
        "type": "video",
        "model": "test-fail",
        "creditsUsed": 0,
        "error": "Generation failed: the fake backend was told to fail",
    }


async def test_redirects_are_not_followed_but_retried_and_410_stops(tmp_path: Path) -> None:
    receiver = Receiver(statuses=[302, 410, 500])
    with receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK) as env:
            _, headers = await env.new_key()
            job_id = await _submit(env, headers, url)
            delivery = await _settled(env, job_id, headers)
            await asyncio.sleep(0.5)  # a wrong retry after 410 would land in this window
            delivery = (await _deliveries(env, job_id, headers))[0]
    assert delivery["status"] == "failed"
    assert [a["statusCode"] for a in delivery["attemptLog"]] == [302, 410]
    assert "410" in delivery["lastError"]
    assert receiver.redirect_target_hits == 0
    assert len(receiver.received) == 2


async def test_retries_stop_after_the_schedule(tmp_path: Path) -> None:
    receiver = Receiver(statuses=[500] * 10)
    with receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK, webhook_retry_schedule=[0, 0.1, 0.1]) as env:
            _, headers = await env.new_key()
            job_id = await _submit(env, headers, url)
            delivery = await _settled(env, job_id, headers)
    assert delivery["status"] == "failed" and delivery["attempts"] == 3
    assert len(receiver.received) == 3


async def test_pending_retries_survive_a_restart(tmp_path: Path) -> None:
    receiver = Receiver(statuses=[500])
    with receiving(receiver) as url:
        # First run: one failed attempt; the retry is due far in the future.
        async with job_app(tmp_path, **PRIVATE_OK, webhook_retry_schedule=[0, 3600]) as env:
            _, headers = await env.new_key()
            job_id = await _submit(env, headers, url)

            async def attempted() -> bool:
                deliveries = await _deliveries(env, job_id, headers)
                return bool(deliveries and deliveries[0]["attemptLog"])

            await eventually(attempted)
            key = headers
        # Make the retry due, as if the hour had passed while the server was down.
        async with job_app(tmp_path, **PRIVATE_OK, webhook_retry_schedule=[0, 3600]) as env:
            async with env.services.db.session.begin() as session:
                await session.execute(
                    update(WebhookDelivery).values(next_attempt_at=utcnow() - timedelta(seconds=1))
                )
            delivery = await _settled(env, job_id, key)
    assert delivery["status"] == "delivered" and delivery["attempts"] == 2
    assert receiver.received[0]["id"] == receiver.received[1]["id"] == delivery["id"]


async def test_rotated_secret_signs_later_deliveries(tmp_path: Path) -> None:
    receiver = Receiver()
    with receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK) as env:
            _, headers = await env.new_key()
            old = (await env.client.get("/v1/webhooks/secret", headers=headers)).json()["secret"]
            again = (await env.client.get("/api/v1/webhooks/secret", headers=headers)).json()
            assert again["secret"] == old
            rotated = await env.client.post("/v1/webhooks/secret/rotate", headers=headers)
            new = rotated.json()["secret"]
            assert new != old and new.startswith("whsec_")
            receiver.secret = new
            job_id = await _submit(env, headers, url)
            await _settled(env, job_id, headers)
    assert receiver.received[0]["ok"]
    body, received_headers = receiver.received[0]["raw"]
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, received_headers)


def test_cli_prints_and_rotates_an_accounts_webhook_secret(tmp_path: Path) -> None:
    env_vars = {"HYPEREAL_DATA_DIR": str(tmp_path / "data"), "HYPEREAL_BOOTSTRAP_ADMIN": "0"}
    runner = CliRunner()
    created = runner.invoke(cli_app, ["keys", "create", "--name", "w"], env=env_vars)
    assert created.exit_code == 0, created.output
    account = created.output.split("account: ")[1].split()[0]

    def secret(*extra: str) -> str:
        result = runner.invoke(
            cli_app, ["webhooks", "secret", "--account", account, *extra], env=env_vars
        )
        assert result.exit_code == 0, result.output
        return result.output.strip()

    first = secret()
    assert first.startswith("whsec_") and secret() == first
    rotated = secret("--rotate")
    assert rotated.startswith("whsec_") and rotated != first
    assert secret() == rotated
    unknown = runner.invoke(cli_app, ["webhooks", "secret", "--account", "acct_nope"], env=env_vars)
    assert unknown.exit_code == 1


def _at(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


async def test_each_schedule_entry_is_the_wait_after_the_attempt_before_it(
    tmp_path: Path,
) -> None:
    """Schedule [0, 3600, 60]: attempt 1 as the job ends (no wait), attempt 2 an hour after
    attempt 1 failed, attempt 3 a minute after attempt 2 failed, then no more."""
    receiver = Receiver(statuses=[500, 500, 500, 200])
    with receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK, webhook_retry_schedule=[0, 3600, 60]) as env:
            _, headers = await env.new_key()
            job_id = await _submit(env, headers, url)

            async def attempts(count: int) -> dict[str, Any]:
                async with asyncio.timeout(20):
                    while True:
                        deliveries = await _deliveries(env, job_id, headers)  # [] until done
                        if deliveries and len(deliveries[0]["attemptLog"]) == count:
                            assert len(deliveries) == 1
                            return deliveries[0]
                        await asyncio.sleep(0.05)

            async def make_due() -> None:  # as if the wait had passed
                async with env.services.db.session.begin() as session:
                    await session.execute(
                        update(WebhookDelivery).values(
                            next_attempt_at=utcnow() - timedelta(seconds=1)
                        )
                    )

            # Attempt 1 needs no sweep and no wait: the job's end sends it.
            first = await attempts(1)
            job = (await env.client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
            assert _at(first["attemptLog"][0]["at"]) >= _at(job["completedAt"])
            wait = _at(first["nextAttemptAt"]) - _at(first["attemptLog"][0]["at"])
            assert timedelta(seconds=3600) <= wait < timedelta(seconds=3660)
            assert first["status"] == "pending"

            await make_due()
            second = await attempts(2)
            wait = _at(second["nextAttemptAt"]) - _at(second["attemptLog"][1]["at"])
            assert timedelta(seconds=60) <= wait < timedelta(seconds=120)

            await make_due()
            third = await attempts(3)
    assert third["status"] == "failed" and third["nextAttemptAt"] is None
    assert [a["statusCode"] for a in third["attemptLog"]] == [500, 500, 500]
    assert len(receiver.received) == 3


async def test_deliveries_reuse_the_senders_pooled_connection(tmp_path: Path) -> None:
    receiver = Receiver()
    with receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK) as env:
            _, headers = await env.new_key()
            for _ in range(3):
                job_id = await _submit(env, headers, url)
                assert (await _settled(env, job_id, headers))["status"] == "delivered"
    # One long-lived client: the later deliveries went over the first one's connection.
    assert len(receiver.peers) == 3 and len(set(receiver.peers)) == 1


async def test_a_rotated_secret_signs_every_delivery_after_the_rotate(tmp_path: Path) -> None:
    receiver = Receiver()
    with receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK) as env:
            account_id, headers = await env.new_key()
            secrets = [(await env.client.get("/v1/webhooks/secret", headers=headers)).json()]
            await _settled(env, await _submit(env, headers, url), headers)
            # Rotated through this process, after a delivery signed with the first secret.
            rotated = await env.client.post("/v1/webhooks/secret/rotate", headers=headers)
            secrets.append(rotated.json())
            await _settled(env, await _submit(env, headers, url), headers)
            # Rotated by another process: the next claim reads the new secret.
            other = new_secret()
            async with env.services.db.session.begin() as session:
                await session.execute(
                    update(Account).where(Account.id == account_id).values(webhook_secret=other)
                )
            secrets.append({"secret": other})
            await _settled(env, await _submit(env, headers, url), headers)
    assert len(receiver.received) == 3
    for number, delivery in enumerate(receiver.received):
        body, received_headers = delivery["raw"]
        for index, secret in enumerate(secrets):
            if index == number:
                Webhook(secret["secret"]).verify(body, received_headers)
            else:
                with pytest.raises(WebhookVerificationError):
                    Webhook(secret["secret"]).verify(body, received_headers)


@dataclass
class GatedReceiver:
    """Holds each POST until ``limit`` are in flight at once (or a second passed), so a
    sender exceeding the bound would show more than ``limit`` at once."""

    limit: int
    in_flight: int = 0
    most: int = 0
    delivered: set[str] = field(default_factory=set)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            await request.body()
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            try:
                for _ in range(100):
                    if self.in_flight >= self.limit:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # room for any POST beyond the bound to arrive
            finally:
                self.in_flight -= 1
            self.delivered.add(request.headers["webhook-id"])
            return Response(status_code=204)

        return app


async def test_concurrent_deliveries_per_process_are_bounded(tmp_path: Path) -> None:
    receiver = GatedReceiver(limit=3)
    with serve_app(receiver.app()) as base:
        settings = {**PRIVATE_OK, "webhook_max_concurrency": 3, "engine_poll_seconds": 3600}
        async with job_app(tmp_path, **settings) as env:
            account_id, headers = await env.new_key()
            response = await env.client.post(
                "/v1/videos/generate", json={"model": "test-video"}, headers=headers
            )
            job_id = response.json()["jobId"]
            await env.wait_for(job_id, headers)
            ids = [f"msg_bound_{i}" for i in range(9)]
            async with env.services.db.session.begin() as session:
                for delivery_id in ids:
                    session.add(
                        WebhookDelivery(
                            id=delivery_id,
                            job_id=job_id,
                            account_id=account_id,
                            url=f"{base}/hook",
                            event="job.completed",
                            payload={"jobId": job_id},
                            next_attempt_at=utcnow(),
                        )
                    )
            sender = env.engine.webhooks
            await asyncio.gather(*(sender.deliver(delivery_id) for delivery_id in ids))
    assert receiver.delivered == set(ids)
    assert receiver.most == 3


async def test_retries_and_rotation_on_postgresql(tmp_path: Path) -> None:
    """The claim, record and secret statements on PostgreSQL: a retried delivery keeps its
    id and counts its attempts; after a rotate the next delivery is signed with the new
    secret."""
    if not ensure_postgres():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started")
    receiver = Receiver(statuses=[500, 503])
    with temporary_postgres_database() as database_url, receiving(receiver) as url:
        async with job_app(tmp_path, **PRIVATE_OK, database_url=database_url) as env:
            _, headers = await env.new_key()
            old = (await env.client.get("/v1/webhooks/secret", headers=headers)).json()["secret"]
            first = await _settled(env, await _submit(env, headers, url), headers)
            new = (await env.client.post("/v1/webhooks/secret/rotate", headers=headers)).json()
            second = await _settled(env, await _submit(env, headers, url), headers)
    assert first["status"] == "delivered" and first["attempts"] == 3
    assert [a["statusCode"] for a in first["attemptLog"]] == [500, 503, 200]
    assert first["deliveredAt"] is not None and first["nextAttemptAt"] is None
    assert second["status"] == "delivered" and second["attempts"] == 1
    assert [r["id"] for r in receiver.received] == [first["id"]] * 3 + [second["id"]]
    for delivery in receiver.received[:3]:
        Webhook(old).verify(*delivery["raw"])
    Webhook(new["secret"]).verify(*receiver.received[3]["raw"])
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(*receiver.received[3]["raw"])
