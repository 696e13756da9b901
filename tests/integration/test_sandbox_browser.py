"""The sandbox's web page in a real browser (Debian's chromium and chromium-driver, driven by
selenium): new mail appears without a reload, opening it shows the HTML part in the sandboxed
frame (remote images blocked until asked for), search narrows the list, the keyboard works,
and the page fits a phone.  Screenshots are saved in the test's folder and their paths printed
for a person to look at."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Server
from tests.sandbox_helpers import call, message, no_traceback, sandbox_server, send

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - selenium is in the test extra
    webdriver = None

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None or webdriver is None,
    reason="needs Debian's chromium and chromium-driver (.ci/apt-sandbox.txt) and selenium",
)

HTML = (
    '<h1 id="hello">Only in the HTML part</h1><p>Your code is <b>904512</b>.</p>'
    '<p><img id="remote" src="http://127.0.0.1:9/pixel.png" alt="remote"></p>'
)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    server = sandbox_server(tmp_path / "srv")
    with server:
        yield server
    no_traceback(server)


@pytest.fixture
def browser() -> Iterator[Any]:
    options = Options()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.binary_location = CHROMIUM or ""
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, condition: Any, timeout: float = 10) -> Any:
    """Until ``condition`` holds; the live list is redrawn as events come in, so an element
    read in between may be gone (stale): that is a "not yet", not a failure."""
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition)


def click(driver: Any, selector: str) -> None:
    """Click what ``selector`` finds, again if the live list was redrawn under the click."""

    def clicked(d: Any) -> bool:
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True

    wait(driver, clicked)


def listed(driver: Any) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#list .subject")]


def shot(driver: Any, path: Path) -> None:
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def test_live_list_html_view_search_and_keyboard(srv: Server, browser: Any, tmp_path: Path) -> None:
    browser.get(f"http://127.0.0.1:{srv.port('web')}/")
    wait(browser, lambda d: d.find_element(By.ID, "empty").is_displayed())
    # a new message shows up without a reload
    send(srv, message("Invoice 7731", text="Pay by Friday."))
    send(srv, message("Welcome aboard", text="Your code is 904512.", html=HTML), user="ann")
    wait(browser, lambda d: listed(d) == ["Welcome aboard", "Invoice 7731"])
    assert browser.execute_script("return performance.navigation.type") == 0  # no reload
    # opening it shows the HTML part in the sandboxed frame
    click(browser, "#list li:first-child button")
    wait(browser, lambda d: d.find_element(By.ID, "subject").text == "Welcome aboard")
    assert "904512" in browser.find_element(By.ID, "codes").text
    frame = browser.find_element(By.ID, "frame")
    assert frame.get_attribute("sandbox") == "allow-popups allow-popups-to-escape-sandbox"
    browser.switch_to.frame(frame)
    heading = wait(browser, lambda d: d.find_element(By.ID, "hello"))
    assert heading.text == "Only in the HTML part"
    # the remote image is blocked by the frame's policy: it never loads
    assert browser.execute_script("return document.getElementById('remote').naturalWidth") == 0
    browser.switch_to.default_content()
    shot(browser, tmp_path / "sandbox-desktop.png")
    # the Source tab shows the raw message
    click(browser, "#tab-source")
    wait(browser, lambda d: "Subject: Welcome aboard" in d.find_element(By.ID, "panel-source").text)
    # search narrows the list
    search = browser.find_element(By.ID, "search")
    search.send_keys("invoice")
    wait(browser, lambda d: listed(d) == ["Invoice 7731"])
    search.send_keys(Keys.ESCAPE)
    wait(browser, lambda d: len(listed(d)) == 2)
    # keyboard: Esc closes the message, "/" goes to the search box, Enter there to the list,
    # j to the next message, Enter opens it
    keys = ActionChains(browser)
    keys.send_keys(Keys.ESCAPE).perform()
    wait(browser, lambda d: not d.find_element(By.ID, "view-pane").is_displayed())
    ActionChains(browser).send_keys("/").perform()
    assert browser.switch_to.active_element == browser.find_element(By.ID, "search")
    ActionChains(browser).send_keys(Keys.ENTER).send_keys("j").send_keys(Keys.ENTER).perform()
    wait(browser, lambda d: d.find_element(By.ID, "subject").text == "Invoice 7731")
    # deleting over the API takes it off the page, again without a reload
    call(srv, "DELETE", "/api/v1/messages", {})
    wait(browser, lambda d: listed(d) == [])


def test_phone_width(srv: Server, browser: Any, tmp_path: Path) -> None:
    send(
        srv,
        message(
            "Reset your password",
            text="Reset: https://example.com/r?t=1",
            html='<p>Click <a href="https://example.com/r?t=1">here</a>.</p>',
        ),
    )
    browser.set_window_size(390, 844)
    browser.get(f"http://127.0.0.1:{srv.port('web')}/")
    wait(browser, lambda d: listed(d) == ["Reset your password"])
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390  # nothing sideways to scroll
    click(browser, "#list li button")
    wait(browser, lambda d: d.find_element(By.ID, "back").is_displayed())
    assert not browser.find_element(By.ID, "list-pane").is_displayed()
    assert "https://example.com/r?t=1" in browser.find_element(By.ID, "links").text
    shot(browser, tmp_path / "sandbox-phone.png")
    click(browser, "#back")
    wait(browser, lambda d: d.find_element(By.ID, "list-pane").is_displayed())
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
