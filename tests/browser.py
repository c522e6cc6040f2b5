"""A real browser for tests: Debian's `chromium` driven by its `chromedriver` through selenium.

`.ci/run` installs both (apt packages `chromium chromium-driver`); without them a test that needs
the browser skips locally and fails under CI=true (`tests.processes.missing`). The flags keep a
headless chromium quick on a machine with no network: without them it stalls on background
fetches (component updates, sync, QUIC probes). Each browser gets a fresh profile folder, so no
cookie, local storage or UI preference carries over between tests.

    with browser(tmp_path) as driver:
        open_page(driver, "http://127.0.0.1:PORT/runs/flow-run/ID")
        wait_text(driver, "my-run-name")
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.processes import missing

FLAGS = (
    "--headless",
    "--no-sandbox",  # root, as CI runs
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
PAGE_LOAD_S = 30.0  # a page's own load; waiting for content is `wait_for`'s budget
WAIT_S = 40.0  # a loaded 2-core CI machine took over 20 s to save a long V2 form


def binaries() -> tuple[str, str]:
    """(chromium, chromedriver); a missing one skips (fails under CI=true)."""
    real = Path("/usr/lib/chromium/chromium")  # Debian's binary behind the /usr/bin wrapper
    chromium = str(real) if real.exists() else shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        missing("chromium and chromedriver are not installed (apt: chromium chromium-driver)")
    assert chromium and driver
    return chromium, driver


@contextlib.contextmanager
def browser(profile: Path) -> Iterator[Any]:
    """A headless chromium with a fresh profile under `profile`; quit (browser and driver
    processes) at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(executable_path=chromedriver, log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(PAGE_LOAD_S)
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, url: str) -> None:
    driver.get(url)


def wait_for(driver: Any, check: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll `check(driver)` until it returns something truthy; fail naming `what`, the page's
    URL and its visible text."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # stale elements while the page re-renders
            if result := check(driver):
                return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not seen within {timeout:.0f} s at {driver.current_url}\n"
                f"page text: {body_text(driver)[:3000]}"
            )
        time.sleep(0.1)


def body_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.TAG_NAME, "body").text)
    except Exception as exc:
        return f"<no body: {exc}>"


def wait_text(driver: Any, text: str, timeout: float = WAIT_S) -> None:
    """Wait until the page's visible text contains `text`."""
    wait_for(driver, lambda d: text in body_text(d), f"text {text!r}", timeout)


def requested_urls(driver: Any) -> list[str]:
    """Every URL the current page fetched (the Resource Timing entries: scripts, XHR, fetch)."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [str(u) for u in urls]


def screenshot(driver: Any, path: Path) -> Path:
    """Save the page as PNG (for a failing test's folder; never into the repository)."""
    driver.save_screenshot(str(path))
    return path
