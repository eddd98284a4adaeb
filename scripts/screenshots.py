"""Screenshots of the report and the recognition page, from headless Chromium (the README's pictures).

    python predict.py ... --report report.html                  # a report of your photos
    python app.py ... --port 7860 &                             # the page, serving the same gallery
    python scripts/screenshots.py --report report.html --app http://127.0.0.1:7860 \
        --photos new_photos/a.jpg new_photos/b.jpg --out docs/

writes OUT/report.png (the report's top and its first rows) and OUT/app.png (the page's answers to the
photos, picked in its file input as a person would). Needs Selenium and Chromium with chromedriver
(make test installs Selenium; apt-get install chromium chromium-driver).
"""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util import ArgumentParser  # noqa: E402


def browser_paths():
    """(Chromium's binary, chromedriver) on this machine; None for what is missing."""
    return (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome"),
            shutil.which("chromedriver"))


def chrome(width, height):
    """Headless Chromium (Selenium) with a width x height viewport; quit() it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary, driver = browser_paths()
    if not binary or not driver:
        sys.exit("screenshots.py: needs Chromium and chromedriver (apt-get install chromium chromium-driver)")
    o = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}"):
        o.add_argument(arg)
    o.binary_location = binary
    b = webdriver.Chrome(service=Service(driver), options=o)
    # the page's viewport itself at width x height (the window's size includes what a window draws around it)
    b.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return b


def shoot_report(path, out, width, height):
    b = chrome(width, height)
    try:
        b.get("file://" + os.path.abspath(path))
        b.save_screenshot(out)
    finally:
        b.quit()


def shoot_app(url, photos, out, width, height, timeout=300):
    from selenium.webdriver.support.ui import WebDriverWait
    b = chrome(width, height)
    try:
        b.get(url.rstrip("/") + "/")
        b.find_element("id", "photos").send_keys("\n".join(os.path.abspath(p) for p in photos))  # picked: sent
        WebDriverWait(b, timeout).until(lambda d: len(d.find_elements("css selector", "tr.row")) == len(photos))
        time.sleep(0.5)  # the thumbnails decoded
        b.save_screenshot(out)
    finally:
        b.quit()


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--report", help="a report.html (predict.py --report)")
    p.add_argument("--app", metavar="URL", help="the page of a running app.py")
    p.add_argument("--photos", nargs="+", default=[], help="with --app: the photos to pick")
    p.add_argument("--out", default="docs", help="folder of report.png and app.png (default docs)")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=1000)
    a = p.parse_args(argv)
    if a.app and not a.photos:
        p.error("--app needs --photos")
    os.makedirs(a.out, exist_ok=True)
    if a.report:
        shoot_report(a.report, os.path.join(a.out, "report.png"), a.width, a.height)
        print(f"wrote {os.path.join(a.out, 'report.png')}")
    if a.app:
        shoot_app(a.app, a.photos, os.path.join(a.out, "app.png"), a.width, a.height)
        print(f"wrote {os.path.join(a.out, 'app.png')}")


if __name__ == "__main__":
    main()
