"""Async generation through the API: submit, poll, download, validation, idempotency,
other accounts, listing. (Cancel/failure/refunds: test_jobs_lifecycle.py.)"""

from __future__ import annotations

import wave
from io import BytesIO
from pathlib import Path

from hypereal.domain import jobs, ledger
from tests.support.jobs import CALLS, job_app, png_data_uri, wav_data_uri


async def test_video_job_completes_and_its_output_downloads_as_mp4(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=100)
        body = {
            "model": "test-video",
            "input": {"prompt": "pan left", "image": png_data_uri(), "duration": 4, "x": 1},
        }
        response = await env.client.post("/v1/videos/generate", json=body, headers=headers)
        assert response.status_code == 202
        started = response.json()
        assert set(started) == {"jobId", "status", "message", "creditsUsed", "pollUrl"}
        assert started["status"] == "processing" and started["creditsUsed"] == 8
        job_id = started["jobId"]
        assert started["pollUrl"] == (
            f"http://testserver/v1/jobs/{job_id}?model=test-video&type=video"
        )
        assert await ledger.balance(env.services.db, account) == 92

        job = await env.wait_for(job_id, headers)
        assert job["status"] == "completed" and job["stage"] == "completed"
        assert job["jobId"] == job_id and job["type"] == "video" and job["model"] == "test-video"
        assert job["creditsUsed"] == 8 and "error" not in job
        assert job["createdAt"].endswith("Z") and job["completedAt"].endswith("Z")
        assert job["outputUrl"].startswith("http://testserver/files/")

        download = await env.client.get(job["outputUrl"].removeprefix("http://testserver"))
        assert download.status_code == 200
        assert download.headers["content-type"] == "video/mp4"
        assert download.content[4:8] == b"ftyp"

        # The backend got the validated fields without the media field, and the image bytes.
        (call,) = CALLS.calls
        assert dict(call.request.input) == {"prompt": "pan left", "duration": 4}
        assert call.request.media["image"].content_type == "image/png"
        assert call.request.media["image"].data.startswith(b"\x89PNG")
        assert await ledger.balance(env.services.db, account) == 92


async def test_audio_jobs_output_wav_and_mp3_with_the_right_content_type(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        _, headers = await env.new_key()
        tts = {"model": "test-tts", "input": {"text": "hello", "voice": "amy"}}
        clone = {
            "model": "test-tts",
            "input": {"text": "hi", "audio": wav_data_uri(), "format": "mp3"},
        }
        ids = []
        for body in (tts, clone):
            response = await env.client.post("/api/v1/audio/generate", json=body, headers=headers)
            assert response.status_code == 202, response.text
            assert "/api/v1/jobs/" in response.json()["pollUrl"]
            assert response.json()["pollUrl"].endswith("type=audio")
            ids.append(response.json()["jobId"])

        wav_job = await env.wait_for(ids[0], headers)
        assert wav_job["status"] == "completed" and wav_job["result"] == {"text": "hello"}
        wav_file = await env.client.get(wav_job["outputUrl"].removeprefix("http://testserver"))
        assert wav_file.headers["content-type"] == "audio/wav"
        with wave.open(BytesIO(wav_file.content)) as decoded:
            assert decoded.getnframes() > 0

        mp3_job = await env.wait_for(ids[1], headers)
        mp3_file = await env.client.get(mp3_job["outputUrl"].removeprefix("http://testserver"))
        assert mp3_file.headers["content-type"] == "audio/mpeg"
        assert mp3_file.content.startswith(b"ID3")
        clone_call = next(c for c in CALLS.calls if "audio" in c.request.media)
        assert clone_call.request.media["audio"].content_type == "audio/wav"
        assert clone_call.request.input["text"] == "hi"


async def test_3d_job_outputs_a_glb(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        _, headers = await env.new_key()
        body = {"model": "test-3d", "input": {"image": png_data_uri()}}
        response = await env.client.post("/v1/3d/generate", json=body, headers=headers)
        assert response.status_code == 202 and response.json()["creditsUsed"] == 7
        job = await env.wait_for(response.json()["jobId"], headers)
        assert job["status"] == "completed" and job["type"] == "3d"
        glb = await env.client.get(job["outputUrl"].removeprefix("http://testserver"))
        assert glb.headers["content-type"] == "model/gltf-binary"
        assert glb.content[:4] == b"glTF"


async def test_submission_errors_are_400_402_and_charge_nothing(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=5)
        cases = [
            ({"input": {"prompt": "x"}}, 400, {"error": "Model is required"}),
            ({"model": "nope"}, 400, {"error": "Unsupported video model: nope"}),
            ({"model": "test-tts", "input": {"text": "x"}}, 400, None),  # audio model
            ({"model": "test-video", "input": {"duration": 99}}, 400, None),
            ({"model": "test-video", "input": {"image": "ftp://x", "duration": 1}}, 400, None),
            ({"model": "test-video", "input": {"duration": 3}}, 402, None),
            (
                {
                    "model": "test-video",
                    "input": {"duration": 1},
                    "webhook_url": "http://127.0.0.1/",
                },
                400,
                None,
            ),
        ]
        for body, status, expected in cases:
            response = await env.client.post("/v1/videos/generate", json=body, headers=headers)
            assert response.status_code == status, (body, response.text)
            if expected is not None:
                assert response.json() == expected
        too_long = await env.client.post(
            "/v1/videos/generate", json={"model": "test-video"}, headers=headers
        )
        assert too_long.json() == {"error": "Insufficient credits", "required": 10, "available": 5}
        assert (
            "duration"
            in (
                await env.client.post(
                    "/v1/videos/generate",
                    json={"model": "test-video", "input": {"duration": 99}},
                    headers=headers,
                )
            ).json()["error"]
        )
        assert (
            "webhook_url"
            in (
                await env.client.post(
                    "/v1/videos/generate",
                    json={
                        "model": "test-video",
                        "input": {"duration": 1},
                        "webhook_url": "http://127.0.0.1/h",
                    },
                    headers=headers,
                )
            ).json()["error"]
        )
        assert await ledger.balance(env.services.db, account) == 5
        assert await jobs.list_jobs(env.services.db, account, limit=10) == []


async def test_a_lone_surrogate_in_any_text_field_is_a_400_and_charges_nothing(
    tmp_path: Path,
) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=100)
        headers = {**headers, "Content-Type": "application/json"}
        cases = [
            (b'{"model":"test-tts","input":{"text":"\\ud800"}}', "input.text"),
            (b'{"model":"test-tts","input":{"text":"a\\udfffb"}}', "input.text"),
            (b'{"model":"test-tts","input":{"text":"hi","voice":"\\ud800"}}', "input.voice"),
            (b'{"model":"test-tts","text":"\\ud800"}', "input.text"),  # top-level field
            (b'{"model":"\\ud800","input":{"text":"hi"}}', "model"),
        ]
        for body, field in cases:
            response = await env.client.post("/v1/audio/generate", content=body, headers=headers)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"].startswith(f"Invalid value for '{field}': "), body
        assert await ledger.balance(env.services.db, account) == 100
        assert await jobs.list_jobs(env.services.db, account, limit=10) == []


async def test_a_leading_zero_ipv4_media_url_is_a_400_naming_the_field(tmp_path: Path) -> None:
    # Refused as an invalid URL before any connection (nothing listens there anyway).
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=100)
        for url in ("http://0177.0.0.1:8690/k0", "http://01.02.03.04/x.png"):
            for path, model in (
                ("/v1/videos/generate", "test-video"),
                ("/v1/3d/generate", "test-3d"),
            ):
                body = {"model": model, "input": {"image": url}}
                response = await env.client.post(path, json=body, headers=headers)
                assert response.status_code == 400, (path, url, response.text)
                assert "'input.image'" in response.json()["error"]
        assert await ledger.balance(env.services.db, account) == 100
        assert await jobs.list_jobs(env.services.db, account, limit=10) == []


async def test_idempotency_key_creates_one_job_and_charges_once(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=100)
        body = {"model": "test-video", "input": {"duration": 2}}
        keyed = {**headers, "Idempotency-Key": "abc-1"}
        first = await env.client.post("/v1/videos/generate", json=body, headers=keyed)
        again = await env.client.post("/api/v1/videos/generate", json=body, headers=keyed)
        assert first.status_code == again.status_code == 202
        assert again.json()["jobId"] == first.json()["jobId"]
        assert again.headers.get("idempotent-replayed") == "true"
        assert await ledger.balance(env.services.db, account) == 96
        assert len(await jobs.list_jobs(env.services.db, account, limit=10)) == 1


async def test_another_accounts_job_and_unknown_ids_are_404(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        _, owner = await env.new_key()
        _, stranger = await env.new_key()
        body = {"model": "test-video", "input": {"duration": 2}}
        job_id = (await env.client.post("/v1/videos/generate", json=body, headers=owner)).json()[
            "jobId"
        ]
        await env.wait_for(job_id, owner)
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}?model=test-video&type=video"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
            ("GET", f"/v1/jobs/{job_id}/deliveries"),
            ("GET", "/v1/jobs/job_doesnotexist"),
        ]:
            response = await env.client.request(method, path, headers=stranger)
            assert response.status_code == 404, path
            assert response.json() == {"error": "Job not found"}
        assert (await env.client.get(f"/api/v1/jobs/{job_id}", headers=owner)).status_code == 200
        listed = (await env.client.get("/v1/jobs", headers=stranger)).json()
        assert listed["data"] == []


async def test_job_list_is_newest_first_and_paginated(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        _, headers = await env.new_key(credits=100)
        ids = []
        for _ in range(5):
            response = await env.client.post(
                "/v1/videos/generate",
                json={"model": "test-video", "input": {"duration": 1}},
                headers=headers,
            )
            ids.append(response.json()["jobId"])
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 2, **({"before": cursor} if cursor else {})}
            page = (await env.client.get("/v1/jobs", params=params, headers=headers)).json()
            seen += [job["jobId"] for job in page["data"]]
            if not page["hasMore"]:
                break
            cursor = page["nextCursor"]
        assert seen == list(reversed(ids))
        only_audio = await env.client.get("/v1/jobs", params={"type": "audio"}, headers=headers)
        assert only_audio.json()["data"] == []
        unknown = await env.client.get("/v1/jobs", params={"before": "job_nope"}, headers=headers)
        assert unknown.status_code == 400
        assert "'before'" in unknown.json()["error"]


async def test_recorded_sync_results_are_found_as_jobs(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=10)
        entry = await ledger.debit(env.services.db, account, 4, reference="res_x1", description="")
        await jobs.record_completed(
            env.services.db,
            job_id="res_x1",
            account_id=account,
            type="image",
            model="flux-1-schnell",
            input={"prompt": "a cat"},
            credits=4,
            debit_entry_id=entry.id,
            output_url="http://testserver/files/image/x.png",
        )
        job = (await env.client.get("/v1/jobs/res_x1?type=image", headers=headers)).json()
        assert job["status"] == "completed" and job["type"] == "image"
        assert job["outputUrl"] == "http://testserver/files/image/x.png"
        assert job["creditsUsed"] == 4
