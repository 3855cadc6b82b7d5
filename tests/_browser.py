"""A real headless Chromium for the login page tests: Debian's ``chromium`` driven by
Debian's ``chromium-driver`` through Selenium. Nothing is ever downloaded: the driver
path is given to the Service (so Selenium Manager is skipped) and ``SE_OFFLINE`` tells
Selenium Manager, were it ever reached, not to use the network. The fixture records
Selenium's own log so a test can show Selenium Manager did not run.

Screenshots go to ``$HSM_AUTH_SCREENSHOTS`` or ``tests/artifacts/screenshots`` (ignored
by git), one directory per test; the path is printed so ``pytest -s`` shows it."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts" / "screenshots"


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian package {package}; scripts/setup installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@dataclass
class Browser:
    """One Chromium session; ``shot(name)`` saves a numbered screenshot of the page."""

    driver: object
    shots: Path
    log: list[str]
    taken: list[Path] = field(default_factory=list)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{len(self.taken) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))  # type: ignore[attr-defined]
        self.taken.append(path)
        return path


def assert_no_selenium_manager(lines: list[str]) -> None:
    """Selenium's log shows the given driver was used and Selenium Manager (which would
    look for, and download, a browser and a driver) never ran."""
    assert any("Skipping Selenium Manager" in line for line in lines), lines[:5]
    ran = [line for line in lines if "selenium_manager" in line]
    assert not ran, ran


def _start():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=900,1000",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console: CSP reports
    service = Service(CHROMEDRIVER, log_output=os.devnull)
    return webdriver.Chrome(service=service, options=options)


@pytest.fixture
def browser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    missing = chromium_missing()
    if missing:
        pytest.skip(missing)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never the network
    root = Path(os.environ.get("HSM_AUTH_SCREENSHOTS") or ARTIFACTS)
    shots = root / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    records = _Records()
    selenium_log = logging.getLogger("selenium")
    old_level, old_propagate = selenium_log.level, selenium_log.propagate
    selenium_log.setLevel(logging.DEBUG)
    selenium_log.propagate = False  # its wire log (screenshots in base64) stays out of pytest's
    selenium_log.addHandler(records)
    try:
        driver = _start()
    except BaseException:
        selenium_log.removeHandler(records)
        selenium_log.setLevel(old_level)
        selenium_log.propagate = old_propagate
        raise
    driver.set_page_load_timeout(30)
    b = Browser(driver, shots, records.lines)
    assert_no_selenium_manager(records.lines)
    try:
        yield b
    finally:
        try:
            driver.quit()
        finally:
            selenium_log.removeHandler(records)
            selenium_log.setLevel(old_level)
            selenium_log.propagate = old_propagate
            print(f"\nscreenshots of {request.node.name}: {shots}")
