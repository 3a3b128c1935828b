"""The web page in a real browser: Debian's Chromium driven by Playwright (installed by `make test`).

It loads the page, types a prompt, sees the text stream in, switches to side-by-side, and opens a
token's alternatives; a screenshot of each state is saved."""

from __future__ import annotations

import os
import shutil

import pytest

from test_server import start

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `make test` installs Debian's chromium")


@pytest.fixture(scope="module")
def page_server(tiny_model_dirs):
    live = start([str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])])
    yield live
    live.stop()


@pytest.fixture
def browser_page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        yield page
        browser.close()


def test_write_compare_and_probe_in_a_browser(page_server, browser_page, tmp_path, tiny_model_dirs):
    page = browser_page
    shots = os.environ.get("STYLETUNE_SCREENSHOTS", str(tmp_path))
    page.goto(page_server.url + "/")
    page.wait_for_function("document.getElementById('models').textContent.includes('(comparison)')")
    page.fill("#prompt", "The raven")
    page.select_option("#strategy", "sampling")
    page.fill("#max_tokens", "40")
    page.fill("#seed", "3")
    page.click("#go")
    page.wait_for_selector(".column .tok")  # text streams in, token by token
    page.wait_for_function("document.querySelector('.column .status').textContent.startsWith('done')")
    tokens = page.locator(".column .tok")
    assert tokens.count() >= 1
    assert page.locator(".column .prompt-echo").inner_text() == "The raven"
    first_text = page.locator(".column .output").inner_text()
    page.screenshot(path=f"{shots}/page-write.png", full_page=True)

    # Side by side: the same prompt and seed through both models, two columns streaming at once.
    page.check("#side")
    page.click("#go")
    page.wait_for_function("document.querySelectorAll('.column').length === 2 && "
                           "[...document.querySelectorAll('.column .status')].every(s => s.textContent.startsWith('done'))")
    headings = page.locator(".column h2").all_inner_texts()
    assert headings == [f"tuned: {tiny_model_dirs['llama']}", f"comparison: {tiny_model_dirs['gpt2']}"]
    assert page.locator(".column").nth(0).locator(".output").inner_text() == first_text  # same seed, same text
    assert page.locator(".column").nth(1).locator(".tok").count() >= 1

    # The token view: click a token (or focus it and press Enter) for the model's alternatives.
    token = page.locator(".column").nth(0).locator(".tok").first
    token.click()
    alternatives = page.locator(".column").nth(0).locator(".alternatives")
    assert alternatives.is_visible()
    rows = alternatives.locator("tr")
    assert 2 <= rows.count() <= 10  # the top 10 by token text (ids that decode alike share a row)
    assert "chosen" in alternatives.inner_text() and "p = " in alternatives.inner_text()
    second = page.locator(".column").nth(1).locator(".tok").first
    second.focus()
    page.keyboard.press("Enter")
    assert page.locator(".column").nth(1).locator(".alternatives tr").count() >= 2
    page.screenshot(path=f"{shots}/page-side-by-side.png", full_page=True)


def test_stop_button_stops_the_stream(page_server, browser_page, tiny_model_dirs, monkeypatch):
    import time

    scheduler = page_server.state.models[str(tiny_model_dirs["llama"])].scheduler
    real = scheduler.decoder.decode
    monkeypatch.setattr(scheduler.decoder, "decode", lambda *a: time.sleep(0.02) or real(*a))
    page = browser_page
    page.goto(page_server.url + "/")
    page.wait_for_function("document.getElementById('models').textContent.length > 0 && "
                           "!document.getElementById('models').textContent.startsWith('loading')")
    page.fill("#max_tokens", "200")
    page.click("#go")
    page.wait_for_selector(".column .tok")
    page.click("#stop")
    page.wait_for_function("document.querySelector('.column .status').textContent.startsWith('stopped')")
    assert page.locator("#go").is_enabled()
    deadline = time.time() + 5
    while scheduler.active and time.time() < deadline:  # the aborted request freed its slot
        time.sleep(0.05)
    assert scheduler.active == []
