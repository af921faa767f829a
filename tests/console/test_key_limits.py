"""The admin page's per-key controls in the browser: a key limited to some models, a daily
budget and an expiry, then changed from its Limits form; credits granted; the audit log."""

from __future__ import annotations

import httpx
from playwright.sync_api import Page, expect

from tests.console.conftest import Console, sign_in


def test_admin_limits_a_key_to_models_a_budget_and_an_expiry(page: Page, console: Console) -> None:
    sign_in(page, console, console.admin_key)
    page.goto(f"{console.url}#/admin")
    page.fill("#key-name", "limited")
    page.fill("#key-credits", "100")
    page.fill("#key-models", "audio-tts")
    page.fill("#key-dailyBudget", "6")
    page.fill("#key-expires", "2099-01-01T12:00")
    page.click("#create-key-submit")
    secret = page.locator("#new-key-secret").inner_text().strip()
    row = page.locator("#keys tbody tr", has=page.locator(".key-name", has_text="limited"))
    expect(row).to_contain_text("audio-tts")
    expect(row).to_contain_text("day: 0/6")
    expect(row).to_contain_text("2099")
    headers = {"Authorization": f"Bearer {secret}"}
    chat = httpx.post(
        f"{console.base_url}/v1/chat",
        headers=headers,
        json={"messages": [{"role": "user", "content": "hi"}], "stream": False},
    )
    assert chat.status_code == 403 and "audio-tts" in chat.json()["error"]
    for _ in range(2):  # 3 credits each: the daily budget of 6 is then spent
        speech = httpx.post(
            f"{console.base_url}/v1/audio/generate",
            headers=headers,
            json={"model": "audio-tts", "input": {"text": "budget"}},
            timeout=120,
        )
        assert speech.status_code == 200, speech.text
    over = httpx.post(
        f"{console.base_url}/v1/audio/generate",
        headers=headers,
        json={"model": "audio-tts", "input": {"text": "budget"}},
    )
    assert over.status_code == 402 and over.json()["budget"] == "daily"
    page.reload()
    expect(row).to_contain_text("day: 6/6")
    # Lift the model list and raise the budget from the key's Limits form.
    row.get_by_role("button", name="Limits").click()
    edit = page.locator(".edit-key")
    edit.locator("input[id$='-models']").fill("")
    edit.locator("input[id$='-dailyBudget']").fill("9")
    edit.get_by_role("button", name="Save").click()
    expect(row).to_contain_text("day: 6/9")
    expect(row.locator("td").nth(4)).to_have_text("all")
    assert httpx.post(
        f"{console.base_url}/v1/audio/generate",
        headers=headers,
        json={"model": "audio-tts", "input": {"text": "budget"}},
        timeout=120,
    ).is_success
    # Grant credits to the key's account; the audit log records each action.
    account_id = row.locator("td").nth(2).inner_text().strip()
    grant = page.locator("#accounts tbody tr", has=page.get_by_text(account_id))
    grant.locator("input[name=amount]").fill("25")
    grant.get_by_role("button", name="Grant").click()
    expect(grant.locator(".account-balance")).to_have_text("116 credits")
    audit = page.locator("#audit")
    expect(audit).to_contain_text("credits.granted")
    updated = audit.locator("tr", has=page.get_by_text("key.updated"))
    expect(updated).to_contain_text('"dailyBudget":9')
    expect(updated).not_to_contain_text("expiresAt")  # only the fields changed were sent
    expect(audit).to_contain_text("key.created")
    page.shots("admin-key-limits")
