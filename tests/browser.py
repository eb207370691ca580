"""Headless Chromium for the browser tests: Debian's `chromium` driven by Playwright (its own browser download is
impossible offline, so it is pointed at the system binary). The tests skip, saying why, only when either is
missing; `.ci/run` installs both."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

# Chromium's background services reach for the network at start; this machine has none
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str | None:
    for name in (os.environ.get("PATCHFLOW_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 900):
    """A fresh page in headless Chromium (a new empty profile each time)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set PATCHFLOW_CHROMIUM)")
    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=path, headless=True, args=FLAGS,
                                                       viewport={"width": width, "height": height})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()
