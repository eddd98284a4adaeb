"""Headless Chromium for the tests of the report and the app (Selenium with the system's browser)."""
import contextlib
import shutil


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
