"""Headless Chromium for the tests of the report and the app (Selenium with the system's browser)."""
import contextlib
import importlib.util
import shutil

import pytest


def _missing():
    """What the browser tests lack on this machine, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "Selenium is not installed (make test installs it: requirements-test.txt)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return "no Chromium and chromedriver on this machine (apt-get install chromium chromium-driver; .ci/run does)"
    return None


# the browser tests skip, with the reason, where the browser or its driver is missing
needs_browser = pytest.mark.skipif(_missing() is not None, reason=f"needs a browser: {_missing()}")


@contextlib.contextmanager
def chrome(width=1200, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    o = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        o.add_argument(arg)
    o.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    b = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=o)
    try:
        yield b
    finally:
        b.quit()
