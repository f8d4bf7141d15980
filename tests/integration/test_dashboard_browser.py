"""SPEC part 2 `GET /`: the dashboard in a real browser (Debian's chromium, driven by Selenium + chromium-driver).

The page shows every backend and its state, updates live, and its drain / disable / enable buttons ask for the
admin token once per tab. Skips, saying why, when chromium, chromedriver or selenium is absent; no driver is
ever downloaded (the system chromedriver is given explicitly, so Selenium Manager is not consulted).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import UNIT
from tests.harness.ops import launched
from tests.harness.processes import Balancer, Gateway, http_get, lb_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[dev]')")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 10 * UNIT


@pytest.fixture(scope="module")
def lb_and_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Balancer, list[Gateway]]]:
    with launched(tmp_path_factory, "dashboard") as launcher:
        gateways = launcher.gateways(3)
        balancer = launcher.balancer(lb_config(pools={"gateways": gateways}))
        balancer.wait_states({("gateways", g.id): "up" for g in gateways})
        yield balancer, gateways


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as exc:
        pytest.skip(f"chromium could not start under chromedriver: {exc.msg}")
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def open_dashboard(driver: WebDriver, lb: Balancer) -> None:
    """A fresh page load with no token kept (one browser serves the module: the tab's storage is cleared)."""
    driver.get(lb.admin_url("/"))
    driver.execute_script("sessionStorage.clear();")


def rewrite_status(driver: WebDriver, edit: str) -> None:
    """Have the page see each /status answer changed by `edit`, JavaScript that changes `doc` (the answer) and
    `pool` (its pool `gateways`): what a balancer would show that these gateways cannot be made to cause."""
    driver.execute_script(
        """
        const real = window.fetch;
        window.fetch = async (url, init) => {
          const reply = await real(url, init);
          if (String(url) !== "status") return reply;
          const doc = await reply.json();
          const pool = doc.pools.gateways;
          EDIT
          return new Response(JSON.stringify(doc), {status: 200, headers: {"Content-Type": "application/json"}});
        };
        """.replace("EDIT", edit)
    )


def wait_for(driver: WebDriver, check: Callable[[WebDriver], Any], what: str) -> Any:
    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(check, message=f"page never showed {what}")


def row(driver: WebDriver, backend_id: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'.row[data-pool="gateways"][data-backend="{backend_id}"]')


def shown_state(driver: WebDriver, backend_id: str) -> str:
    try:
        return row(driver, backend_id).find_element(By.CSS_SELECTOR, ".pill.state").text.strip().lower()
    except WebDriverException:
        return ""


def server_state(lb: Balancer, backend_id: str) -> str:
    _, body = http_get(lb.admin_url("/status"))
    return next(b["state"] for b in json.loads(body)["pools"]["gateways"]["backends"] if b["id"] == backend_id)


def test_dashboard_shows_every_backend_and_drains_live(
    lb_and_gateways: tuple[Balancer, list[Gateway]], browser: WebDriver
) -> None:
    """Load /, see every backend up; drain one (token asked once), watch it turn draining without a reload."""
    lb, gateways = lb_and_gateways
    open_dashboard(browser, lb)
    for gateway in gateways:
        wait_for(browser, lambda d, g=gateway: shown_state(d, g.id) == "up", f"{gateway.id} up")
        assert gateway.address in row(browser, gateway.id).text
    browser.execute_script("window.__same_page = true;")
    target, other = gateways[1].id, gateways[2].id
    try:
        row(browser, target).find_element(By.CSS_SELECTOR, "button.act-drain").click()
        wait_for(browser, lambda d: d.find_element(By.ID, "drain-dialog").is_displayed(), "the drain dialog")
        browser.find_element(By.ID, "drain-close-after").send_keys("1h")
        browser.find_element(By.ID, "drain-rate").send_keys("5")
        browser.find_element(By.ID, "drain-ok").click()
        wait_for(browser, lambda d: d.find_element(By.ID, "token-dialog").is_displayed(), "the token prompt")
        browser.find_element(By.ID, "token-input").send_keys(lb.token)
        browser.find_element(By.ID, "token-ok").click()
        wait_for(browser, lambda d: shown_state(d, target) == "draining", f"{target} draining")
        assert server_state(lb, target) == "draining"
        assert browser.execute_script("return window.__same_page === true;"), "the page was reloaded"
        assert browser.execute_script("return sessionStorage.getItem('lb-admin-token');") == lb.token

        # The token is kept for the tab: disable asks for nothing more.
        row(browser, other).find_element(By.CSS_SELECTOR, "button.act-disable").click()
        wait_for(browser, lambda d: shown_state(d, other) == "disabled", f"{other} disabled")
        assert not browser.find_element(By.ID, "token-dialog").is_displayed()
        assert server_state(lb, other) == "disabled"

        # A change made elsewhere (the API) shows up by itself: the page polls /status.
        for backend_id in (target, other):
            row(browser, backend_id).find_element(By.CSS_SELECTOR, "button.act-enable").click()
            wait_for(browser, lambda d, b=backend_id: shown_state(d, b) == "up", f"{backend_id} up again")
    finally:
        for backend_id in (target, other):
            http_post_enable(lb, backend_id)


def http_post_enable(lb: Balancer, backend_id: str) -> None:
    import urllib.request

    request = urllib.request.Request(
        lb.admin_url(f"/pools/gateways/backends/{backend_id}/enable"), method="POST",
        headers={"Authorization": f"Bearer {lb.token}"},
    )
    with urllib.request.urlopen(request, timeout=5 * UNIT) as reply:
        assert reply.status == 200


def test_wrong_token_is_asked_again(lb_and_gateways: tuple[Balancer, list[Gateway]], browser: WebDriver) -> None:
    """A wrong token is forgotten and asked for again; nothing changes on the server."""
    lb, gateways = lb_and_gateways
    target = gateways[0].id
    open_dashboard(browser, lb)
    wait_for(browser, lambda d: shown_state(d, target) == "up", f"{target} up")
    row(browser, target).find_element(By.CSS_SELECTOR, "button.act-disable").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "token-dialog").is_displayed(), "the token prompt")
    browser.find_element(By.ID, "token-input").send_keys("wrong-token")
    browser.find_element(By.ID, "token-ok").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "token-dialog").is_displayed(), "the prompt again")
    browser.find_element(By.CSS_SELECTOR, "#token-dialog button[value=cancel]").click()
    assert server_state(lb, target) == "up"
    assert browser.execute_script("return sessionStorage.getItem('lb-admin-token');") is None


def test_with_no_admin_token_configured_an_action_says_so_and_asks_for_none(
    tmp_path_factory: pytest.TempPathFactory, browser: WebDriver
) -> None:
    """The dashboard asked for the token, then said it was wrong, again and again, where none exists."""
    with launched(tmp_path_factory, "dashboard-no-token") as launcher:
        gateways = launcher.gateways(1)
        config = lb_config(pools={"gateways": gateways})
        config["admin"]["token"] = None
        lb = launcher.balancer(config)
        target = gateways[0].id
        open_dashboard(browser, lb)
        wait_for(browser, lambda d: shown_state(d, target) == "up", f"{target} up")
        row(browser, target).find_element(By.CSS_SELECTOR, "button.act-disable").click()
        wait_for(browser, lambda d: "admin actions are off" in d.find_element(By.ID, "toast").text, "the reason")
        assert not browser.find_element(By.ID, "token-dialog").is_displayed()
        assert server_state(lb, target) == "up"


def test_dashboard_fits_a_phone(lb_and_gateways: tuple[Balancer, list[Gateway]], browser: WebDriver) -> None:
    """At 390 px wide nothing scrolls sideways, and every backend with its buttons is there."""
    lb, gateways = lb_and_gateways
    browser.set_window_size(390, 844)
    try:
        open_dashboard(browser, lb)
        for gateway in gateways:
            wait_for(browser, lambda d, g=gateway: shown_state(d, g.id) == "up", f"{gateway.id} up")
            assert row(browser, gateway.id).find_element(By.CSS_SELECTOR, "button.act-drain").is_displayed()
        width = browser.execute_script("return document.documentElement.clientWidth;")
        assert browser.execute_script("return document.documentElement.scrollWidth;") <= width
    finally:
        browser.set_window_size(1400, 900)


def test_snapshot_without_script_fits_a_phone(
    lb_and_gateways: tuple[Balancer, list[Gateway]], browser: WebDriver
) -> None:
    """Without its script (blocked, or not run yet) the page is the server's snapshot: at 390 px its wide tables
    scroll inside their own box, and the page itself does not scroll sideways."""
    lb, gateways = lb_and_gateways
    browser.set_window_size(390, 844)
    browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        browser.get(lb.admin_url("/"))
        snapshot = browser.find_element(By.ID, "snapshot")
        for gateway in gateways:
            assert gateway.id in snapshot.text
        width = browser.execute_script("return document.documentElement.clientWidth;")
        assert browser.execute_script("return document.documentElement.scrollWidth;") <= width
    finally:
        browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})
        browser.set_window_size(1400, 900)


def test_page_is_self_contained(lb_and_gateways: tuple[Balancer, list[Gateway]]) -> None:
    """No external asset: no src/href to another origin, and a CSP that forbids loading any."""
    lb, _ = lb_and_gateways
    import urllib.request

    with urllib.request.urlopen(lb.admin_url("/"), timeout=5 * UNIT) as reply:
        html = reply.read().decode()
        policy = reply.headers["Content-Security-Policy"]
        assert reply.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http://" not in html and "https://" not in html  # not even a namespace: an asset check may grep
    assert " src=" not in html and "<link" not in html


def test_each_backend_has_a_tunnels_sparkline(
    lb_and_gateways: tuple[Balancer, list[Gateway]], browser: WebDriver
) -> None:
    """The tunnels column draws its history as an SVG polyline (made from the page's <template>, with no
    namespace URL in the page), redrawn as /status answers come in."""
    lb, gateways = lb_and_gateways
    open_dashboard(browser, lb)
    gateway = gateways[0]
    wait_for(browser, lambda d: shown_state(d, gateway.id) == "up", f"{gateway.id} up")
    line = row(browser, gateway.id).find_element(By.CSS_SELECTOR, "svg.spark polyline")
    assert browser.execute_script("return arguments[0].namespaceURI;", line).endswith("/2000/svg")
    wait_for(browser, lambda d: len((line.get_attribute("points") or "").split()) >= 2, "a sparkline drawn")


def test_discovery_status_and_new_backends_render(
    lb_and_gateways: tuple[Balancer, list[Gateway]], browser: WebDriver
) -> None:
    """A pool's `discovery` object (SPEC part 2: last_ok, last_error) is shown; backends that appear or go are
    added and removed in place. The page's /status answer is rewritten in the browser to carry them."""
    lb, gateways = lb_and_gateways
    open_dashboard(browser, lb)
    wait_for(browser, lambda d: shown_state(d, gateways[0].id) == "up", "the first poll")
    rewrite_status(
        browser,
        """
        pool.discovery = {dns: "gateway.game.svc", type: "srv", last_ok: doc.time - 3,
                          last_error: "SERVFAIL from 127.0.0.1:53"};
        pool.backends = pool.backends.slice(1).concat([{...pool.backends[0], id: "gw-9", address: "127.0.0.9:1",
                                                        state: "disabled", removed: true, reason: "removed from DNS"}]);
        """,
    )
    discovery = wait_for(
        browser,
        lambda d: (e := d.find_element(By.CSS_SELECTOR, '.pool[data-pool="gateways"] .discovery')).is_displayed()
        and "SERVFAIL" in e.text and e,
        "the discovery line",
    )
    assert "last_ok: 3s ago" in discovery.text or "last_ok: 4s ago" in discovery.text, discovery.text
    assert "error" in discovery.get_attribute("class")
    wait_for(browser, lambda d: shown_state(d, "gw-9") == "removed", "the new backend")
    assert not browser.find_elements(By.CSS_SELECTOR, f'.row[data-backend="{gateways[0].id}"]'), "gone from /status"
    assert not row(browser, "gw-9").find_element(By.CSS_SELECTOR, "button.act-drain").is_enabled()


# What DNS puts in a pool's /status (`type: a` with AAAA records; an SRV answer of unusable targets), taken
# from a balancer resolving against a hostile zone: runs of 50-90 characters with no space to break at.
_DNS_ADDRESS = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"
_DNS_ERROR = (
    "_ws._tcp.gw.test: no usable backend in the answer: target '</script><script>alert\\\\(1\\\\)</script>.svc.test': "
    "first label is not a valid backend id; target '\\\\226\\\\128\\\\174" + "y" * 60 + ".svc....': first label is not "
    "a valid backend id"
)


def test_text_from_dns_wraps_on_a_phone(lb_and_gateways: tuple[Balancer, list[Gateway]], browser: WebDriver) -> None:
    """A backend's address and the discovery line come from DNS: at 390 px each is shown whole, wrapped in its
    card, neither cut off by the card's edge nor running into the state column beside it."""
    lb, gateways = lb_and_gateways
    browser.set_window_size(390, 844)
    try:
        open_dashboard(browser, lb)
        wait_for(browser, lambda d: shown_state(d, gateways[0].id) == "up", "the first poll")
        rewrite_status(
            browser,
            f"""
            pool.discovery = {{dns: "_ws._tcp.gw.test", type: "srv", last_ok: null,
                              last_error: {json.dumps(_DNS_ERROR)}}};
            pool.backends[0].address = {json.dumps(_DNS_ADDRESS)};
            """,
        )
        discovery = wait_for(
            browser,
            lambda d: (e := d.find_element(By.CSS_SELECTOR, '.pool[data-pool="gateways"] .discovery')).is_displayed()
            and "yyyy" in e.text and e,
            "the discovery line",
        )
        address = wait_for(
            browser,
            lambda d: (e := row(d, gateways[0].id).find_element(By.CSS_SELECTOR, ".addr")).text.startswith("[ffff")
            and e,
            "the address from DNS",
        )
        for what, element in (("discovery line", discovery), ("address", address)):
            wide, room = browser.execute_script("return [arguments[0].scrollWidth, arguments[0].clientWidth];", element)
            assert wide <= room, f"the {what} needs {wide} px and has {room}: the rest is cut off or overlaps"
    finally:
        browser.set_window_size(1400, 900)
