"""The chat page in a real browser: Debian's headless chromium driven by Selenium through
chromedriver. Types a message and watches the answer stream in, checks Enter / Shift+Enter,
rates an answer (the record lands in the feedback file), sees retrieved sources under an answer
and the refusal for a flagged message, and saves a screenshot (SERVE_SCREENSHOT=path keeps it; default: the test's tmp folder).

Needs `apt-get install -y chromium chromium-driver` and `pip install selenium` (what .ci/run
installs); without chromedriver the test is skipped with that reason."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from openchatkit.moderation import REFUSAL

pytestmark = pytest.mark.skipif(
    shutil.which("chromedriver") is None or shutil.which("chromium") is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate, timeout=60.0, step=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out waiting in the browser")


def test_chat_page_in_chromium(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(served.url + "/")
    wait_for(lambda: "tiny-chat" in browser.find_element(By.ID, "model").text)
    assert "fonts.googleapis" not in browser.page_source and "http://" not in browser.page_source

    box = browser.find_element(By.ID, "input")
    # Shift+Enter is a newline, not a send.
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert box.get_property("value") == "first line\nsecond line"
    assert browser.find_elements(By.CSS_SELECTOR, ".turn") == []
    box.clear()

    # Enter sends; the answer streams in (a slow backend: one token per 0.15 s).
    browser.find_element(By.ID, "maxtokens").send_keys("12")
    served.backend.delay = 0.15
    try:
        box.send_keys("Hello there", Keys.ENTER)
        bubble = wait_for(
            lambda: browser.find_elements(By.CSS_SELECTOR, ".turn.assistant .bubble")
        )[0]
        seen = set()
        while "pending" in bubble.get_attribute("class"):
            seen.add(bubble.text)
            time.sleep(0.05)
    finally:
        served.backend.delay = 0.0
    final = bubble.text
    partial = {s for s in seen if s and s != final}
    assert final and partial, (seen, final)  # text appeared piece by piece before the end
    assert all(final.startswith(s.rstrip("▍").strip()) for s in partial)
    user = browser.find_element(By.CSS_SELECTOR, ".turn.user .bubble").text
    assert user == "Hello there"
    stats = browser.find_element(By.CSS_SELECTOR, ".turn.assistant .stats").text
    assert "generated" in stats and "tokens/s" in stats

    # Thumbs up: one record in the feedback file, with the answer as the page showed it.
    before = served.feedback.read_text().count("\n") if served.feedback.exists() else 0
    browser.find_element(By.CSS_SELECTOR, ".turn.assistant .fb button").click()
    wait_for(
        lambda: "Thanks" in browser.find_element(By.CSS_SELECTOR, ".turn.assistant .meta").text
    )
    lines = served.feedback.read_text().splitlines()
    assert len(lines) == before + 1
    record = json.loads(lines[-1])
    assert record["rating"] == "up" and record["text"].endswith(f"<bot>: {final}")

    # With retrieval on, the sources are listed under the answer.
    served.service.retriever = served.retriever
    try:
        box.send_keys("Tell me about Paris", Keys.ENTER)
        sources = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".sources"))[0]
        assert "Paris" in sources.text and "wiki/Paris" in sources.text
    finally:
        served.service.retriever = None

    # A flagged message: the page shows the refusal as such.
    served.service.moderator = served.moderator
    try:
        box.send_keys("something FLAGGED", Keys.ENTER)
        refusal = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".bubble.refusal"))[0]
        assert "blocked by moderation" in refusal.text.lower() and REFUSAL in refusal.text
    finally:
        served.service.moderator = None

    shot = os.environ.get("SERVE_SCREENSHOT") or str(tmp_path / "chat_page.png")
    assert browser.save_screenshot(shot) and os.path.getsize(shot) > 10_000

    # New chat clears the conversation.
    browser.find_element(By.ID, "newchat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".turn") == []
