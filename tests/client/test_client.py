"""``hypereal.client`` against a real ``hypereal serve`` process on 127.0.0.1: jobs waited
and saved, progress, a streamed chat with the local model, typed errors, Retry-After, a
retried submission charged once, webhooks verified, and 20 concurrent async jobs."""

from __future__ import annotations

import asyncio
import socket
import threading
import wave
from pathlib import Path
from typing import Any

import httpx
import pytest

from hypereal.client import (
    AsyncClient,
    AuthenticationError,
    BadRequest,
    ChatResult,
    Client,
    ImageResult,
    InsufficientCredits,
    InvalidWebhook,
    Job,
    JobCanceled,
    ModelUnavailable,
    NotFound,
    RateLimited,
    verify_webhook,
)
from tests.client.conftest import MakeUser, Server
from tests.support.servers import serve_app
from tests.webhooks.test_delivery import Receiver


def client_for(server: Server, key: str, **options: Any) -> Client:
    return Client(base_url=server.url, api_key=key, **options)


def test_tts_job_is_saved_to_a_wav_that_decodes(
    server: Server, make_user: MakeUser, tmp_path: Path
) -> None:
    user = make_user(credits=50)
    with client_for(server, user.key) as client:
        job = client.run("audio-tts", {"text": "Hello from the Python client."})
        assert isinstance(job, Job)
        assert job.status == "completed" and job.done and job.progress == 1.0
        assert job.model == "audio-tts" and job.type == "audio" and job.credits_used == 3
        saved = job.save(tmp_path / "hello.wav")
        with wave.open(str(saved)) as audio:
            assert audio.getnframes() > audio.getframerate() // 2  # more than half a second
            assert audio.getnchannels() == 1
        # A directory keeps the URL's file name.
        in_dir = job.save(tmp_path)
        assert in_dir.name == job.output_url.rsplit("/", 1)[-1]  # type: ignore[union-attr]
        assert in_dir.read_bytes() == saved.read_bytes()
        assert client.balance().balance == 47
        assert client.jobs.get(job.id) == job


def test_camera_motion_progress_rises_to_one(
    server: Server, make_user: MakeUser, picture: Path, tmp_path: Path
) -> None:
    user = make_user(credits=100)
    seen: list[Job] = []
    with client_for(server, user.key) as client:
        job = client.run(
            "camera-motion-i2v",
            {"prompt": "slow zoom in", "image": picture, "duration": 5},
            on_progress=seen.append,
        )
    assert isinstance(job, Job) and job.status == "completed"
    progress = [update.progress for update in seen]
    assert progress == sorted(progress), progress
    assert progress[0] < 1.0 and progress[-1] == 1.0
    assert seen[-1].stage == "completed" and all(u.id == job.id for u in seen)
    assert job.credits_used == 13
    video = job.save(tmp_path / "zoom.mp4").read_bytes()
    assert video[4:8] == b"ftyp"


def test_jobs_submit_get_list_cancel_and_wait(
    server: Server, make_user: MakeUser, picture: Path
) -> None:
    user = make_user(credits=200)
    with client_for(server, user.key) as client:
        # Long enough to be canceled while it runs: 20 s of 1080p.
        long = client.videos.generate(
            "camera-motion-i2v",
            {"image": picture, "prompt": "orbit"},
            duration=20,
            resolution="1080p",
        )
        assert long.status == "processing" and long.poll_url and long.credits_used == 52
        canceled = client.jobs.cancel(long.id)
        assert canceled.status == "canceled" and canceled.credits_used == 0
        assert client.jobs.cancel(long.id).status == "canceled"  # again: still canceled
        with pytest.raises(JobCanceled) as stopped:
            client.jobs.wait(long.id)
        assert stopped.value.job.id == long.id

        mesh = client.threed.generate("relief-3d", image=picture, resolution=16, wait=True)
        assert mesh.status == "completed" and mesh.type == "3d"
        listed = list(client.jobs.list())
        assert [j.id for j in listed] == [mesh.id, long.id]
        assert [j.id for j in client.jobs.list(type="3d")] == [mesh.id]
        assert len(list(client.jobs.list(limit=1))) == 1
        assert [j.id for j in client.jobs.list(page_size=1)] == [mesh.id, long.id]  # 2 pages
        assert client.balance().balance == 200 - 5
        entries = list(client.usage())
        assert [e.type for e in entries] == ["debit", "refund", "debit", "grant"]
        assert entries[1].refund_of == entries[2].id
        assert list(client.usage(page_size=1)) == entries
        assert list(client.usage(limit=3, page_size=2)) == entries[:3]


def test_streamed_chat_with_the_local_model(server: Server, make_user: MakeUser) -> None:
    user = make_user(credits=100)
    with client_for(server, user.key) as client:
        with client.chat(
            "What is the capital of France?", stream=True, max_tokens=12, temperature=0
        ) as stream:
            deltas = list(stream)
        result = stream.result
        assert result is not None and len(deltas) >= 2
        assert result.content == "".join(deltas) == stream.text
        assert result.model == "smollm2-135m-instruct"
        assert result.finish_reason in ("stop", "length")
        assert result.usage is not None and 1 <= result.usage.completion_tokens <= 12
        assert result.credits_used >= 2
        # The same question, not streamed, and through run(): the route comes from the model.
        whole = client.chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
        )
        assert whole.content == result.content  # greedy decoding: the same answer
        ran = client.run("smollm2-135m-instruct", {"prompt": "Hi", "max_tokens": 4})
        assert isinstance(ran, ChatResult) and ran.content
        spent = result.credits_used + whole.credits_used + ran.credits_used
        assert client.balance().balance == 100 - spent


async def test_async_streamed_chat(server: Server, make_user: MakeUser) -> None:
    user = make_user(credits=20)
    async with AsyncClient(base_url=server.url, api_key=user.key) as client:
        stream = await client.chat("Say hello.", stream=True, max_tokens=6, temperature=0)
        deltas = [delta async for delta in stream]
        assert stream.result is not None and stream.result.content == "".join(deltas)
        assert (await client.balance()).balance == 20 - stream.result.credits_used


def test_402_is_insufficient_credits_with_both_numbers(
    server: Server, make_user: MakeUser, picture: Path
) -> None:
    user = make_user(credits=10)
    with client_for(server, user.key) as client:
        with pytest.raises(InsufficientCredits) as raised:
            client.run("camera-motion-i2v", {"image": picture, "prompt": "pan", "duration": 10})
        assert raised.value.required == 26 and raised.value.available == 10
        assert raised.value.status == 402
        assert "26 required, 10 available" in str(raised.value)
        assert client.balance().balance == 10
        assert list(client.jobs.list()) == []


class RecordingClient(Client):
    """Records the waits between retries; ``during_wait`` runs in place of sleeping."""

    def __init__(self, *args: Any, during_wait: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[float] = []
        self.during_wait = during_wait

    def _sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.during_wait is not None:
            self.during_wait()


def test_429_is_retried_after_retry_after(server: Server, make_user: MakeUser) -> None:
    user = make_user(credits=5, rate_limit=2)
    headers = {"Authorization": f"Bearer {user.key}"}
    for _ in range(2):
        assert httpx.get(f"{server.url}/v1/credits", headers=headers).status_code == 200
    refused = httpx.get(f"{server.url}/v1/credits", headers=headers)
    assert refused.status_code == 429
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 3600

    def raise_the_limit() -> None:  # what waiting out the window would do, without the hour
        with server.admin() as admin:
            patched = admin.patch(f"/v1/admin/keys/{user.key_id}", json={"rateLimitPerHour": 50})
        assert patched.status_code == 200, patched.text

    client = RecordingClient(
        base_url=server.url, api_key=user.key, max_retry_wait=3600, during_wait=raise_the_limit
    )
    with client:
        assert client.balance().balance == 5
    assert len(client.waits) == 1
    assert retry_after - 1 <= client.waits[0] <= retry_after  # the server's Retry-After


def test_429_longer_than_max_retry_wait_raises_rate_limited(
    server: Server, make_user: MakeUser
) -> None:
    user = make_user(credits=5, rate_limit=1)
    with RecordingClient(base_url=server.url, api_key=user.key) as client:  # waits <= 60 s
        client.balance()
        with pytest.raises(RateLimited) as raised:
            client.balance()
    assert raised.value.retry_after is not None and raised.value.retry_after > 60
    assert client.waits == []  # an hour is not waited for by default


class DroppingProxy:
    """A TCP proxy to the server that loses the answer to the first ``drops`` POSTs: the
    request reaches the server, which processes it, and the connection is closed as the
    answer comes back. Records each request's head."""

    def __init__(self, upstream: str, drops: int = 1) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.drops = drops
        self.heads: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        drop = threading.Event()

        def forward() -> None:
            try:
                while data := client.recv(65536):
                    if data.startswith((b"GET ", b"POST ")):
                        self.heads.append(data.split(b"\r\n\r\n", 1)[0].decode())
                        if data.startswith(b"POST ") and self.drops > 0:
                            self.drops -= 1
                            drop.set()
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                close(upstream)

        def backward() -> None:
            try:
                while data := upstream.recv(65536):
                    if drop.is_set():
                        break  # the answer is lost on the way back
                    client.sendall(data)
            except OSError:
                pass
            finally:
                close(client)

        threading.Thread(target=forward, daemon=True).start()
        backward()


def close(sock: socket.socket) -> None:
    """Shut down, then close: a shutdown also wakes the other thread's ``recv``."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def header(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def test_a_retried_submission_charges_once(server: Server, make_user: MakeUser) -> None:
    user = make_user(credits=30)
    proxy = DroppingProxy(server.url)
    try:
        with (
            client_for(server, user.key) as direct,
            Client(base_url=proxy.url, api_key=user.key) as client,
        ):
            job = client.audio.generate("audio-tts", text="Charged once.", wait=True)
            assert job.status == "completed"
            posts = [h for h in proxy.heads if h.startswith("POST ")]
            assert len(posts) == 2  # the first answer was lost; the retry was answered
            keys = {header(h, "idempotency-key") for h in posts}
            assert len(keys) == 1 and None not in keys
            # Waiting asks the server to hold the polls (harmless where unsupported); speech
            # answers synchronously, so there may be no poll at all.
            polls = [h for h in proxy.heads if h.startswith(f"GET /v1/jobs/{job.id}")]
            assert all(header(h, "prefer") == "wait=10" for h in polls)
            assert direct.balance().balance == 27
            assert [j.id for j in direct.jobs.list()] == [job.id]

            # The same key twice by hand: the first job again, charged once.
            first = direct.audio.generate("audio-tts", text="Again", idempotency_key="k-1")
            second = direct.audio.generate("audio-tts", text="Again", idempotency_key="k-1")
            assert first.id == second.id
            assert direct.balance().balance == 24
    finally:
        proxy.close()


async def test_async_client_runs_20_jobs_concurrently(
    server: Server, make_user: MakeUser, tmp_path: Path
) -> None:
    user = make_user(credits=100)
    async with AsyncClient(base_url=server.url, api_key=user.key) as client:
        jobs = await asyncio.gather(
            *(client.run("audio-tts", {"text": f"Job number {n}."}) for n in range(20))
        )
        assert all(isinstance(job, Job) and job.status == "completed" for job in jobs)
        assert len({job.id for job in jobs if isinstance(job, Job)}) == 20
        saved = await asyncio.gather(
            *(job.asave(tmp_path / f"{n}.wav") for n, job in enumerate(jobs))
        )
        for path in saved:
            with wave.open(str(path)) as audio:
                assert audio.getnframes() > 0
        assert (await client.balance()).balance == 100 - 20 * 3
        listed = [job.id async for job in client.jobs.list()]
        assert sorted(listed) == sorted(job.id for job in jobs)


def test_typed_errors(server: Server, make_user: MakeUser, picture: Path) -> None:
    user = make_user(credits=100)
    with client_for(server, user.key) as client:
        with pytest.raises(NotFound):
            client.jobs.get("job_does_not_exist")
        with pytest.raises(BadRequest) as bad:
            client.run("camera-motion-i2v", {"image": picture, "duration": 100})
        assert "duration" in bad.value.message
        with pytest.raises(NotFound):
            client.run("no-such-model", {})
        # Listed as unavailable: refused before anything is sent.
        with pytest.raises(ModelUnavailable):
            client.run("nano-banana-t2i", {"prompt": "a cat"})
        # Submitted anyway: the server's 503, not retried.
        with pytest.raises(ModelUnavailable):
            client.images.generate("a cat", model="nano-banana-t2i")
        assert client.balance().balance == 100
    with pytest.raises(AuthenticationError):
        client_for(server, "ck_not_a_key").balance()


def test_image_edit_result_is_saved(
    server: Server, make_user: MakeUser, picture: Path, tmp_path: Path
) -> None:
    user = make_user(credits=20)
    with client_for(server, user.key) as client:
        edited = client.images.edit("rotate 90", picture, model="image-transform")
        assert isinstance(edited, ImageResult) and edited.credits_used == 2
        from PIL import Image

        with Image.open(edited.save(tmp_path / "rotated")) as image:
            assert image.size == (64, 96)
        ran = client.run("image-transform", {"prompt": "rotate 90", "images": [picture]})
        assert isinstance(ran, ImageResult) and len(ran.urls) == 1


def test_verify_webhook_on_a_real_delivery(server: Server, make_user: MakeUser) -> None:
    user = make_user(credits=20)
    receiver = Receiver()  # no secret: records the raw deliveries
    with serve_app(receiver.app()) as hooks, client_for(server, user.key) as client:
        secret = client.webhook_secret()
        job = client.audio.generate(
            "audio-tts", text="Webhook", webhook_url=f"{hooks}/hook", wait=True
        )
        for _ in range(200):
            if receiver.received:
                break
            threading.Event().wait(0.05)
        body, headers = receiver.received[0]["raw"]
    reported = verify_webhook(body, headers, secret)
    assert reported.id == job.id and reported.status == "completed"
    assert reported.output_url == job.output_url and reported.credits_used == 3
    with pytest.raises(InvalidWebhook):
        verify_webhook(body.replace(b"completed", b"failed"), headers, secret)
    with pytest.raises(InvalidWebhook):
        verify_webhook(body, headers, "whsec_" + "A" * 32)


def test_unreachable_server_is_a_connection_error() -> None:
    from hypereal.client import APIConnectionError
    from tests.support.servers import free_port

    client = Client(base_url=f"http://127.0.0.1:{free_port()}", api_key="ck_x", max_retries=1)
    with client, pytest.raises(APIConnectionError):
        client.balance()


def test_no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYPEREAL_API_KEY", raising=False)
    with pytest.raises(AuthenticationError):
        Client(base_url="http://127.0.0.1:9")


def test_environment_configures_the_client(
    server: Server, make_user: MakeUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = make_user(credits=7)
    monkeypatch.setenv("HYPEREAL_BASE_URL", server.url + "/v1")  # the OpenAI-style base works
    monkeypatch.setenv("HYPEREAL_API_KEY", user.key)
    with Client() as client:
        assert client.base_url == server.url
        assert client.balance().balance == 7
