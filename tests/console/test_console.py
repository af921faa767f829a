"""The console driven as a person would: sign in, stream a chat answer, speak, remove a
background, watch a camera-motion job to 100% and play its video, turn an image into a 3D
model, browse the jobs, and create and revoke a key as an admin."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Page, expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.backends.test_segmentation import astronaut_path
from tests.console.conftest import Console, sign_in
from tests.support.servers import serve_app


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small picture to animate and lift into 3D."""
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    img = Image.new("RGB", (320, 240), "teal")
    for x in range(80, 240):
        for y in range(60, 180):
            img.putpixel((x, y), (240, 200 - (y - 60), 40 + (x - 80) // 2))
    img.save(path)
    return path


def test_root_redirects_to_the_console_and_the_files_are_served(console: Console) -> None:
    answer = httpx.get(f"{console.base_url}/", follow_redirects=True)
    assert answer.status_code == 200
    assert str(answer.url) == console.url
    assert "hypereal console" in answer.text
    module = httpx.get(f"{console.base_url}/console/static/js/app.js")
    assert module.status_code == 200
    assert module.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert httpx.get(f"{console.base_url}/console/static/js/nothing.js").status_code == 404


def test_sign_in_keeps_the_key_in_session_storage_only(page: Page, console: Console) -> None:
    page.goto(console.base_url)  # / redirects to /console
    expect(page.locator("#sign-in")).to_be_visible()
    page.shots("sign-in")
    page.fill("#api-key", "ck_not_a_real_key")
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#sign-in-error .error")).to_contain_text("nauthorized")
    sign_in(page, console, console.user_key)
    expect(page.locator("#who-balance")).to_have_text("1000 credits")
    expect(page.locator("#balance")).to_have_text("1000 credits")
    expect(page.locator("#nav-admin")).to_be_hidden()  # a user's key: no admin page
    expect(page.locator("#credits-chart")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('hypereal.apiKey')") == console.user_key
    assert page.context.cookies() == []
    assert page.evaluate("localStorage.length") == 0
    page.shots("overview")
    page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('hypereal.apiKey')") is None


def test_chat_answer_streams_in_as_it_arrives(page: Page, console: Console) -> None:
    sign_in(page, console, console.user_key)
    page.goto(f"{console.url}#/playground/chat")
    page.fill("#chat-input", "Name three colours.")
    # Count the answer's text changes as they happen: a buffered answer would change once.
    page.evaluate(
        """() => {
          window.answerUpdates = 0;
          new MutationObserver(() => {
            const answer = document.querySelector('#chat-log .assistant');
            if (answer && answer.textContent) window.answerUpdates++;
          }).observe(document.querySelector('#chat-log'),
                     {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.fill("#chat-max-tokens", "24")
    page.click("#chat-send")
    answer = page.locator("#chat-log .assistant.done")
    expect(answer).to_be_visible()
    assert answer.inner_text().strip()
    assert page.evaluate("window.answerUpdates") > 1
    expect(page.locator(".cost-value")).to_have_text("2 credits")
    page.shots("chat")


def test_speech_plays_in_an_audio_element(page: Page, console: Console) -> None:
    sign_in(page, console, console.user_key)
    page.goto(f"{console.url}#/playground/tts")
    page.fill("#tts-text", "The console speaks.")
    page.click("#tts-submit")
    audio = page.locator("#tts-audio")
    expect(audio).to_be_attached()
    page.wait_for_function("document.querySelector('#tts-audio').readyState >= 1")
    assert page.evaluate("document.querySelector('#tts-audio').duration") > 0.3
    expect(page.locator(".cost-value")).to_have_text("3 credits")
    before = httpx.get(
        f"{console.base_url}/v1/credits", headers={"Authorization": f"Bearer {console.user_key}"}
    ).json()["balance"]
    expect(page.locator("#who-balance")).to_have_text(f"{before} credits")  # the balance left
    page.shots("text-to-speech")


def test_speech_to_text_shows_the_transcript_with_word_timings(
    page: Page, console: Console, tmp_path: Path
) -> None:
    speech = httpx.post(
        f"{console.base_url}/v1/audio/speech",
        headers={"Authorization": f"Bearer {console.user_key}"},
        json={"model": "tts-1", "input": "hello world", "voice": "joe", "response_format": "wav"},
        timeout=120,
    )
    assert speech.status_code == 200, speech.text
    wav = tmp_path / "hello.wav"
    wav.write_bytes(speech.content)
    sign_in(page, console, console.user_key)
    page.goto(f"{console.url}#/playground/stt")
    page.set_input_files("#stt-file", str(wav))
    page.click("#stt-submit")
    expect(page.locator("#stt-text")).to_be_visible()
    assert page.locator("#stt-result tbody tr").count() >= 1  # a word with its timings
    expect(page.locator(".cost-value")).to_have_text("3 credits")
    page.shots("speech-to-text")


def test_background_removal_shows_the_result(page: Page, console: Console) -> None:
    sign_in(page, console, console.user_key)
    page.goto(f"{console.url}#/playground/image")
    expect(page.locator("#edit-model")).to_have_value("background-removal")
    page.set_input_files("#edit-image", str(astronaut_path()))
    page.fill("#edit-prompt", "remove background")
    page.click("#edit-submit")
    result = page.locator("#edit-result img")
    expect(result).to_be_visible()
    page.wait_for_function(
        "(() => { const i = document.querySelector('#edit-result img');"
        " return i.complete && i.naturalWidth > 0; })()"
    )
    url = result.get_attribute("src")
    assert url
    png = Image.open(io.BytesIO(httpx.get(url).content))
    assert png.mode == "RGBA" and png.getpixel((0, 0))[3] == 0  # the background is gone
    expect(page.locator(".cost-value")).to_have_text("2 credits")
    page.shots("image")


def test_camera_motion_job_reaches_100_percent_and_its_video_plays(
    page: Page, console: Console, photo: Path
) -> None:
    sign_in(page, console, console.user_key)
    page.goto(f"{console.url}#/playground/video")
    expect(page.locator("#video-model")).to_have_value("camera-motion-i2v")
    page.set_input_files("#video-image", str(photo))
    page.fill("#video-prompt", "slow zoom in")
    page.fill("#video-duration", "2")
    page.evaluate(
        """() => {
          window.progressSeen = [];
          new MutationObserver(() => {
            const bar = document.querySelector('#video-progress [role=progressbar]');
            if (bar) window.progressSeen.push(Number(bar.getAttribute('aria-valuenow')));
          }).observe(document.querySelector('#video-progress'), {subtree: true, childList: true});
        }"""
    )
    page.click("#video-submit")
    bar = page.locator("#video-progress [role=progressbar]")
    expect(bar).to_be_visible()
    page.shots("video-running")
    expect(bar).to_have_attribute("aria-valuenow", "100", timeout=180_000)
    seen = page.evaluate("window.progressSeen")
    assert seen == sorted(seen) and seen[-1] == 100
    page.wait_for_function("document.querySelector('#video-player')?.readyState >= 1")
    assert page.evaluate("document.querySelector('#video-player').duration") > 1
    assert page.evaluate("document.querySelector('#video-player').videoWidth") > 0
    expect(page.locator(".cost-value")).to_have_text("13 credits")
    page.shots("video")


def test_relief_job_opens_in_the_3d_viewer(page: Page, console: Console, photo: Path) -> None:
    sign_in(page, console, console.user_key)
    page.goto(f"{console.url}#/playground/3d")
    page.set_input_files("#mesh-image", str(photo))
    page.click("#mesh-submit")
    page.wait_for_function(
        "document.querySelector('#mesh-result model-viewer')?.loaded === true", timeout=180_000
    )
    expect(page.locator("#mesh-progress [role=progressbar]")).to_have_attribute(
        "aria-valuenow", "100"
    )
    expect(page.locator(".cost-value")).to_have_text("5 credits")
    page.shots("3d")


@pytest.fixture(scope="module")
def hook_url() -> Iterator[str]:
    """A webhook receiver on 127.0.0.1 that accepts every delivery."""

    async def hook(_: Request) -> Response:
        return Response(status_code=204)

    with serve_app(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as base:
        yield f"{base}/hook"


def test_jobs_gallery_follows_a_job_live_and_shows_its_webhook_deliveries(
    page: Page, console: Console, photo: Path, hook_url: str
) -> None:
    headers = {"Authorization": f"Bearer {console.user_key}"}
    sign_in(page, console, console.user_key)
    page.goto(f"{console.url}#/jobs")
    # The gallery is loaded (with the earlier tests' jobs, or none when run alone).
    expect(page.locator("#jobs-gallery article, #jobs-empty").first).to_be_visible()
    image = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
    submitted = httpx.post(
        f"{console.base_url}/v1/videos/generate",
        headers=headers,
        json={
            "model": "camera-motion-i2v",
            "input": {"image": image, "prompt": "pan left", "duration": 3},
            "webhook_url": hook_url,
        },
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["jobId"]
    # The open page finds the new job and follows it to the end, without a reload.
    card = page.locator(f"article[data-job-id='{job_id}']")
    expect(card).to_be_visible()
    expect(card.locator("header .badge")).to_have_text("completed", timeout=180_000)
    page.wait_for_function(
        f"document.querySelector(\"article[data-job-id='{job_id}'] video\")?.readyState >= 1"
    )
    deadline = time.monotonic() + 60
    while True:  # the webhook is sent as the job ends: wait until it has been delivered
        deliveries = httpx.get(f"{console.base_url}/v1/jobs/{job_id}/deliveries", headers=headers)
        if [d["status"] for d in deliveries.json()["data"]] == ["delivered"]:
            break
        assert time.monotonic() < deadline, deliveries.text
        time.sleep(0.2)
    card.get_by_role("button", name="Webhooks").click()
    expect(card.locator(".deliveries")).to_contain_text("delivered")
    expect(card.locator(".deliveries")).to_contain_text("HTTP 204")
    page.shots("jobs")
    # The overview's chart now has this account's spending by model.
    page.click("#nav a[data-page=overview]")
    expect(page.locator("#credits-chart .legend")).to_contain_text("camera-motion-i2v")
    assert page.locator("#credits-chart rect").count() >= 1
    page.shots("overview")


def test_admin_creates_and_revokes_a_key(page: Page, console: Console) -> None:
    sign_in(page, console, console.admin_key)
    expect(page.locator("#nav-admin")).to_be_visible()
    page.click("#nav-admin")
    expect(page.locator("#keys table")).to_be_visible()
    page.fill("#key-name", "console-made")
    page.fill("#key-credits", "7")
    page.fill("#key-rate", "120")
    page.click("#create-key-submit")
    secret_box = page.locator("#new-key-secret")
    expect(secret_box).to_be_visible()
    secret = secret_box.inner_text().strip()
    assert secret.startswith("ck_")
    credits = httpx.get(
        f"{console.base_url}/v1/credits", headers={"Authorization": f"Bearer {secret}"}
    )
    assert credits.status_code == 200 and credits.json()["balance"] == 7
    row = page.locator("#keys tbody tr", has=page.locator(".key-name", has_text="console-made"))
    expect(row.locator(".key-status")).to_have_text("active")
    expect(row).to_contain_text("120")
    page.shots("admin")
    row.locator("button.revoke").click()
    expect(row.locator("button.revoke")).to_have_text("Confirm revoke")
    row.locator("button.revoke").click()
    expect(row.locator(".key-status")).to_have_text("revoked")
    refused = httpx.get(
        f"{console.base_url}/v1/credits", headers={"Authorization": f"Bearer {secret}"}
    )
    assert refused.status_code == 401
    page.reload()  # the secret was shown once: it is nowhere on the page any more
    expect(page.locator("#keys table")).to_be_visible()
    assert secret not in page.content()
    page.shots("admin-after-revoke")


def test_a_refused_request_shows_the_reason_and_charges_nothing(
    page: Page, console: Console, photo: Path
) -> None:
    key = console.create_key(credits=10)
    sign_in(page, console, key)
    page.goto(f"{console.url}#/playground/video")
    page.set_input_files("#video-image", str(photo))
    page.fill("#video-duration", "10")  # 26 credits
    page.click("#video-submit")
    expect(page.locator("#page-playground .error")).to_have_text(
        "Insufficient credits: 26 credits required, 10 available"
    )
    expect(page.locator("#video-progress [role=progressbar]")).to_have_count(0)
    page.shots("refused-video")
    page.goto(f"{console.url}#/overview")
    expect(page.locator("#balance")).to_have_text("10 credits")
    page.shots("refused-overview")
