"""The web UI in a real (headless) browser: `splitfuse ui` with the bundled SmolLM2 in-process, and
`splitfuse ui --api URL` against a server that is down at first and then up.

The in-process test leaves its screenshot in artifacts/ui.png.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deploy_harness import ARTIFACTS, Process, start
from processes import free_port
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
LONG_REQUEST = "Write a long story about a brave little dragon. Make it at least 1000 words."
STEP_TIMEOUT = 90.0  # seconds for one reply on a 2-core CPU, with room to spare


class ChatPage:
    """The chat page, found through the elem_ids that app/ui/page.py gives its components."""

    def __init__(self, driver: Any, url: str):
        self.driver = driver
        driver.get(url)
        self.wait(lambda: "model" in self.text("#model-info"), "the page to load")

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
        waiter = WebDriverWait(
            self.driver, timeout, 0.1, ignored_exceptions=(StaleElementReferenceException,)
        )
        try:
            waiter.until(lambda _: condition())
        except TimeoutException:
            raise AssertionError(
                f"no {what} after {timeout} s; status: {self.status()!r}"
            ) from None

    def text(self, selector: str) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, selector).text

    def messages(self, role: str) -> list[str]:
        found = self.driver.find_elements(By.CSS_SELECTOR, f'#chat [data-testid="{role}"]')
        return [element.text for element in found]

    def status(self) -> str:
        found = self.driver.find_elements(By.CSS_SELECTOR, "#status")
        return found[0].text if found else ""

    def click(self, selector: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, selector).click()

    def set_number(self, elem_id: str, value: float) -> None:
        """Type into a slider's number box."""
        box = self.driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
        box.clear()
        box.send_keys(str(value), Keys.TAB)
        self.wait(lambda: float(box.get_attribute("value")) == value, f"{elem_id} = {value}")

    def type(self, text: str) -> None:
        """Type `text` into the message box and press Enter."""
        self.driver.find_element(By.CSS_SELECTOR, "#message textarea").send_keys(text, Keys.ENTER)

    def ask(self, text: str) -> None:
        """Send `text`; returns once the page shows it (and the reply has begun)."""
        before = len(self.messages("user"))
        self.type(text)
        self.wait(lambda: len(self.messages("user")) == before + 1, f"{text!r} to appear")

    def wait_status(self, prefix: str) -> str:
        self.wait(lambda: self.status().startswith(prefix), f"the status {prefix!r}")
        return self.status()

    def reply(self) -> str:
        replies = self.messages("bot")
        return replies[-1] if replies else ""


def _answer_then_stop_then_reset(page: ChatPage, screenshot: Path | None = None) -> None:
    """The checks both modes share: a streamed answer, a cancelled long reply, a reset."""
    page.set_number("temperature", 0)  # greedy: the bundled model's answer is known
    page.ask(QUESTION)
    page.wait_status("Done")
    assert "Paris" in page.reply()

    page.ask(LONG_REQUEST)
    page.wait(lambda: len(page.messages("bot")) == 2 and len(page.reply()) > 60, "a long reply")
    page.click("#stop")
    status = page.wait_status("Stopped")
    stopped = page.reply()
    time.sleep(2.0)
    assert page.reply() == stopped, "the reply kept growing after Stop"
    tokens = int(re.search(r"after (\d+) tokens", status).group(1))  # type: ignore[union-attr]
    assert 0 < tokens < 512, status
    if screenshot is not None:
        screenshot.parent.mkdir(exist_ok=True)
        assert page.driver.save_screenshot(str(screenshot))

    page.click("#reset")
    page.wait_status("Conversation cleared")
    assert page.messages("user") == [] and page.messages("bot") == []


def _ui(tmp_path: Path, cache_dir: Path, *args: str) -> Process:
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "ui", "--host", "127.0.0.1", "--port", str(port)]
    ui = start(
        [*command, *args], tmp_path / "ui.log", port, {"SPLITFUSE_CACHE_DIR": str(cache_dir)}
    )
    ui.wait_ready("/", timeout=180)
    return ui


def _assert_clean_log(process: Process) -> None:
    assert "Traceback" not in process.log_path.read_text(errors="replace"), process.log_tail()


def test_in_process_chat(browser: Any, smollm2_dir: Path, tmp_path: Path) -> None:
    # smollm2_dir is CACHE/gguf/NAME: the UI loads the bundled model from that same cache.
    ui = _ui(tmp_path, smollm2_dir.parents[1])
    try:
        page = ChatPage(browser, ui.url)
        header = page.text("#model-info")
        assert "SmolLM2-135M-Instruct" in header and "context 8,192 tokens" in header, header
        _answer_then_stop_then_reset(page, ARTIFACTS / "ui.png")

        # The whole conversation re-sent each turn (no server session) answers the same.
        page.click("#interactive input[type=checkbox]")
        page.wait_status("Each turn re-sends")
        page.ask(QUESTION)
        page.wait_status("Done")
        assert "Paris" in page.reply()
        assert len(page.messages("user")) == len(page.messages("bot")) == 1
        _assert_clean_log(ui)
    finally:
        ui.stop()
    assert ui.proc.returncode is not None


def test_api_mode_against_a_server_down_then_up(
    browser: Any, smollm2_dir: Path, tmp_path: Path
) -> None:
    cache_dir = smollm2_dir.parents[1]
    server_port = free_port()
    server_url = f"http://127.0.0.1:{server_port}"
    ui = _ui(tmp_path, cache_dir, "--api", server_url)
    server: Process | None = None
    try:
        page = ChatPage(browser, ui.url)
        assert "model unavailable" in page.text("#model-info")
        page.type("Hello?")
        status = page.wait_status("Error:")
        assert f"cannot reach {server_url}" in status, status
        assert page.messages("user") == [], "a failed turn stays out of the conversation"
        assert (
            page.driver.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value")
            == "Hello?"
        ), "the failed message is given back for another try"

        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(server_port), "--log-format", "json"]
        server = start(
            command, tmp_path / "server.log", server_port, {"SPLITFUSE_CACHE_DIR": str(cache_dir)}
        )
        server.wait_ready("/health", timeout=180)
        page = ChatPage(browser, ui.url)
        header = page.text("#model-info")
        assert "SmolLM2-135M-Instruct" in header and f"server {server_url}" in header, header
        _answer_then_stop_then_reset(page)
        _assert_clean_log(ui)
    finally:
        ui.stop()
        if server is not None:
            server.stop()
