"""The built documentation site, as a reader's browser shows it (headless Chromium).

`make test-all` builds the site (`make docs`), installs Debian's chromium and chromium-driver when
missing (apt-get, as root) and selenium, and sets DPFP_DOCS_SITE to the built html; then these
tests fail rather than skip when something is missing. Elsewhere they skip, saying why.
"""

import functools
import http.server
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

SITE = os.environ.get("DPFP_DOCS_SITE")
CHROMIUM = os.environ.get("DPFP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DPFP_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")

if not SITE:
    pytest.skip("DPFP_DOCS_SITE is not set: `make test-all` builds the site and runs this test",
                allow_module_level=True)

# Under `make test-all` selenium is installed: a missing one fails the collection, not a skip.
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

# What the browser needs to start cleanly in a container and to stay off the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def site_url():
    root = Path(SITE).resolve()
    assert (root / "index.html").is_file(), f"no built site at {root}: run `make docs`"
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium chromium-driver (make test-all)"
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_index_page(browser, site_url, tmp_path):
    browser.get(site_url)
    assert "dpfp-jax" in browser.title
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("dpfp-jax")
    nav = {a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, ".sidebar-tree a")}
    for page in ["install.html", "op.html", "layers.html", "api/index.html", "benchmarks.html"]:
        assert site_url + page in nav, f"{page} is not in the sidebar"
    browser.save_screenshot(str(tmp_path / "index.png"))  # for a person to look at, with --basetemp
    assert (tmp_path / "index.png").stat().st_size > 0


def test_api_page_of_fast_weight(browser, site_url):
    browser.get(site_url + "api/op.html")
    entry = browser.find_element(By.ID, "dpfp_jax.fast_weight")  # autodoc's anchor for the function
    signature = entry.text.replace("\n", "")
    assert signature.startswith("dpfp_jax.fast_weight(q") and "rule" in signature and "segment_ids" in signature
    body = entry.find_element(By.XPATH, "following-sibling::dd").text
    # the Returns field (its name styled in capitals by the theme) and the runnable example
    assert "returns" in body.lower() and "dj.fast_weight(q, k, x[2], beta)" in body


def test_figure_renders(browser, site_url):
    browser.get(site_url + "examples.html")
    images = [img for img in browser.find_elements(By.TAG_NAME, "img") if "retrieval_quick" in img.get_attribute("src")]
    assert images, "the retrieval figure is not on the examples page"
    width = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0])
    assert width and width > 0, "the retrieval figure did not load"


def test_no_internal_link_is_broken(browser, site_url):
    # Every page reachable from the index, every link, image, stylesheet and script on it: the
    # target exists, and a #fragment names an element of its page.
    links_js = """return Array.from(document.querySelectorAll('a[href], img[src], link[href], script[src]'),
                                     e => e.href || e.src)"""
    ids_js = """return Array.from(document.querySelectorAll('[id], a[name]'), e => e.id || e.name)"""
    anchors, fragments, queue, seen, broken = {}, [], [site_url], {site_url}, []
    while queue:
        page = queue.pop()
        browser.get(page)
        anchors[page] = set(browser.execute_script(ids_js))
        for target in browser.execute_script(links_js):
            if not target.startswith(site_url):
                continue  # outside the site: not checked (no network)
            url, _, fragment = target.partition("#")
            if fragment:
                fragments.append((page, url, urllib.parse.unquote(fragment)))
            if url in seen:
                continue
            seen.add(url)
            if not exists(url):  # the browser shows the server's error page as a page: ask it first
                broken.append(f"{page}: {target}")
            elif url.endswith((".html", "/")):
                queue.append(url)
    broken += [f"{page}: {url}#{fragment} (no such anchor)" for page, url, fragment in fragments
               if url in anchors and fragment not in anchors[url]]
    assert len(anchors) >= 20, f"only {len(anchors)} pages reached from the index"
    assert not broken, "\n".join(broken)


def exists(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False
