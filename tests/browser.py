"""Headless Chromium for the tests of the report and the app: scripts/screenshots.py's, with Selenium."""
import contextlib
import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import screenshots  # noqa: E402


def _missing():
    """What the browser tests lack on this machine, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "Selenium is not installed (make test installs it: requirements-test.txt)"
    if not all(screenshots.browser_paths()):
        return "no Chromium and chromedriver on this machine (apt-get install chromium chromium-driver; .ci/run does)"
    return None


# the browser tests skip, with the reason, where the browser or its driver is missing
needs_browser = pytest.mark.skipif(_missing() is not None, reason=f"needs a browser: {_missing()}")


@contextlib.contextmanager
def chrome(width=1200, height=900):
    b = screenshots.chrome(width, height)
    try:
        yield b
    finally:
        b.quit()
