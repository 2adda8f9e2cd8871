"""The playground page (GET /) in a real headless Chromium against a real server on 127.0.0.1.

Debian's chromium (`apt-get install chromium`; .ci/run installs it) driven by Playwright, launched with
`executable_path` since Playwright's own browser download is not reachable here. Playwright rather than
Selenium: it intercepts every request the page makes (so a fetch from another origin fails the test), waits
on the page's text itself, and needs no chromedriver of a matching version.

A screenshot of the answered page goes to test-artifacts/playground.png (git-ignored).
"""

import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from retro_peft.serving.app import create_app
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from test_serve import build_bank

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
KEY, LIMITED_KEY = "sk-playground", "sk-playground-limited"
REQUESTS_PER_MINUTE = 6  # a key's budget: the page's own requests stay under it, LIMITED_KEY spends it first
QUESTION = "Who invented the piano?"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    settings = ServeSettings(auth={"keys": [{"name": "person", "key": KEY}, {"name": "limited", "key": LIMITED_KEY}]},
                             limits={"requests_per_minute": REQUESTS_PER_MINUTE}, generation={"default_max_tokens": 8},
                             batching={"max_wait_ms": 5})
    with serve_in_thread(create_app(settings, build_bank(tmp_path_factory.mktemp("playground")))) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, url):
    """A fresh tab (its own sessionStorage) whose every request outside `url`'s origin is refused and recorded
    (or blocked by the page's CSP, which the console reports); the test fails if there was one, or if the
    page's script raised."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    foreign, crashes = [], []
    origin = urlsplit(url)[:2]

    def only_this_server(route):
        if urlsplit(route.request.url)[:2] == origin:
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    tab = context.new_page()
    tab.on("pageerror", lambda error: crashes.append(str(error)))
    # what the page's Content-Security-Policy stopped before it became a request is a foreign fetch too
    tab.on("console", lambda m: foreign.append(m.text) if "Content Security Policy" in m.text else None)
    yield tab
    context.close()
    assert not foreign, f"the page fetched from another origin: {foreign}"
    assert not crashes, f"the page's script failed: {crashes}"


def streamed_text(url: str, body: dict) -> str:
    """The answer the API streams for `body`, its pieces joined (what the page should show)."""
    pieces = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice["delta"].get("content") or "")
    return "".join(pieces)


def use_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")


def test_page_streams_an_answer_with_its_citations_and_settings(page, url):
    page.goto(url)
    assert page.title() == "retro-peft playground"
    # Auth is on: without a key the domain list is refused, and the page says so.
    page.wait_for_selector("#status.error")
    assert "401" in page.inner_text("#status") and "API key" in page.inner_text("#status")

    use_key(page, KEY)
    expect(page.locator("#domain option")).to_have_count(4)
    assert [o.split(":")[0] for o in page.locator("#domain option").all_inner_texts()] == ["auto", "a", "b", "plain"]
    assert page.evaluate("sessionStorage.getItem('retro-peft.api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""

    page.select_option("#domain", "auto")
    page.fill("#k", "1")
    page.select_option("#mode", "sparse")
    page.fill("#question", QUESTION)
    page.click("#ask")
    page.wait_for_selector("#status.done", timeout=60_000)

    body = {"model": "auto", "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "retrieval": {"k": 1, "mode": "sparse"}}
    expected = streamed_text(url, body)
    assert expected and page.text_content("#answer") == expected
    assert page.eval_on_selector("#answer", "e => e.childNodes.length") > 1  # appended piece by piece

    settings = dict(zip(page.locator("#settings dt").all_inner_texts(), page.locator("#settings dd").all_inner_texts()))
    assert settings["domain"] in {"auto, routed to b", "auto, routed to plain"}  # both search index b
    assert settings["passages (k)"] == "1" and settings["search mode"] == "sparse"
    assert settings["finish"].startswith(("stop", "length"))

    citations = page.locator("#citations .citation")
    assert citations.count() == 1
    assert citations.locator("h3").inner_text() == "Piano"
    assert "Bartolomeo Cristofori" in citations.locator(".passage").inner_text()  # the text, from /v1/retrieve

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "playground.png", full_page=True)
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


def test_a_wrong_key_and_a_spent_limit_are_readable_messages(page, url):
    page.goto(url)
    expect(page.locator("#status")).to_contain_text("missing credentials")  # no key yet
    use_key(page, "sk-wrong")
    refused = "Not authorized (401): invalid API key. Enter a valid API key above."
    expect(page.locator("#status")).to_have_text(refused)

    page.fill("#question", QUESTION)
    page.click("#ask")  # the same refusal for the answer (the status said "Asking..." in between), no answer box
    expect(page.locator("#status")).to_have_text(refused)
    assert page.is_hidden("#result")

    for _ in range(REQUESTS_PER_MINUTE):
        httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {LIMITED_KEY}"})
    use_key(page, LIMITED_KEY)
    expect(page.locator("#status")).to_contain_text("429")
    status = page.inner_text("#status")
    assert status.startswith("Rate limited (429): ") and "Try again in" in status


def test_the_page_is_outside_the_api_schema_and_serves_only_its_files(url):
    assert "/" not in httpx.get(f"{url}/openapi.json").json()["paths"]
    page = httpx.get(url)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{url}/playground/playground.js").headers["content-type"].startswith("text/javascript")
    missing = httpx.get(f"{url}/playground/index.py")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "no playground file 'index.py'"
    assert httpx.get(f"{url}/playground/..%2F..%2Fapp.py").status_code == 404
