"""Browser tests: the real ComfyUI frontend (comfyui-frontend-package) served by a test server,
driven by headless Debian Chromium through Playwright.  Dependencies: scripts/install_browser.sh
(run by `make test` / `make test-browser`)."""
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIEWPORT = {"width": 1920, "height": 1080}
DISMISS_BANNERS = "localStorage.setItem('vueNodesBannerDismissed', 'true');"
FRONTEND_READY = "() => window.app?.graph && window.LiteGraph?.registered_node_types?.GuidanceKitRunStats"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright missing: run scripts/install_browser.sh (make test-browser does)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: run scripts/install_browser.sh (make test-browser does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def page(chromium, comfy_server):
    """The frontend, loaded once (a fresh context: Playwright gives each its own empty profile)."""
    context = chromium.new_context(viewport=VIEWPORT)
    context.add_init_script(DISMISS_BANNERS)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(comfy_server.url)
    page.wait_for_function(FRONTEND_READY, timeout=180_000)
    yield page
    context.close()
