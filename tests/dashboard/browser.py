#!/usr/bin/env python3
"""The operator dashboard in a real browser: Debian's chromium, driven through its own
chromedriver (selenium with an explicit Service path: nothing is downloaded).

    tests/dashboard/browser.py [--binary target/release/modelyard] [--shots DIR]

Serves a copy of the sample models and standard plugins with the sample endpoints, 50
more weighted endpoints, an admin token (`ops`) and a read token (`viewer`), a plugin file
that is no component and a model version that is no model (so that something is wrong), a
one-second history step and a price per core-hour; sends traffic in the background; then:

- without a token the page asks for one and shows nothing else;
- with the read token every page loads without a console error, and the numbers shown
  (overview, A/B arms, cost) are the admin API's, read while traffic is paused; the refused
  plugin and model version are listed as what is wrong; the charts are drawn; the page
  offers no action, and the read token's action from the page is refused;
- with the admin token: new weights set in the page (after saying no once, which changes
  nothing) take effect on the next requests; a blue-green switch and a canary rollback
  likewise; each shows in the audit trail (filtered in the page) with the token's name;
- on a 390 px wide screen the overview does not scroll sideways.

Saves a screenshot of every page (wide, and the overview narrow) under --shots
(target/dashboard-screenshots by default). Exits 1 on the first failure.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ["weighted", "iris-features", "bandit", "canary", "blue-green", "flagd"]
TOKENS = {"ops": "ops-secret-1", "viewer": "viewer-secret-2"}
# Opened without a token, the page asks the server once whether it needs one: this 401 is
# the answer, and the only console error a page may show.
PROBE = "/admin/whoami - Failed to load resource: the server responded with a status of 401"
FLOWER = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [6.7, 3.0, 5.2, 2.3]}]}
BY_NAME = {"inputs": [{"name": "features", "datatype": "BYTES", "shape": [1], "data": [json.dumps(
    {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3})]}]}
EXTRA = 50


class Failed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Failed(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base):
        self.base = base

    def call(self, path, body=None, token=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        h = {"content-type": "application/json", **(headers or {})}
        if token:
            h["authorization"] = f"Bearer {TOKENS[token]}"
        req = urllib.request.Request(self.base + path, data=data, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except urllib.error.URLError as e:
            # Not listening (yet, or any more): no status at all.
            return None, {}, str(e.reason).encode()

    def json(self, path, token="viewer"):
        status, _, body = self.call(path, token=token)
        check(status == 200, f"GET {path}: {status} {body[:300]!r}")
        return json.loads(body)

    def infer(self, endpoint, body=FLOWER, headers=None):
        status, h, out = self.call(f"/v2/models/{endpoint}/infer", body, headers=headers)
        check(status == 200, f"inference on {endpoint}: {status} {out[:300]!r}")
        return {k.lower(): v for k, v in h.items()}.get("x-modelyard-variant"), json.loads(out)


def configuration(work: Path):
    """The sample repository and configuration, with what this test adds."""
    shutil.copytree(ROOT / "models", work / "models")
    (work / "plugins").mkdir()
    for plugin in PLUGINS:
        shutil.copy(ROOT / "plugins" / f"{plugin}.wasm", work / "plugins")
    shutil.copy(ROOT / "plugins/flags.json", work / "plugins")
    # Something wrong to show: a plugin file that is no component, a version no model.
    (work / "plugins/broken.wasm").write_bytes(b"this is not a component")
    (work / "models/iris/9").mkdir()
    (work / "models/iris/9/model.onnx").write_bytes(b"not an onnx file")
    toml = (ROOT / "modelyard.toml").read_text()
    toml += "\n[server.tokens.ops]\ntoken = \"%s\"\nrole = \"admin\"\n" % TOKENS["ops"]
    toml += "\n[server.tokens.viewer]\ntoken = \"%s\"\nrole = \"read\"\n" % TOKENS["viewer"]
    toml += "\n[monitoring]\ndatabase = \"modelyard.db\"\nhistory_step_seconds = 1\ncore_hour_price = 0.05\n"
    for i in range(EXTRA):
        toml += (f"\n[endpoints.load-{i:02}]\nvariants = {{ a = \"iris@1\", b = \"iris@2\" }}\n"
                 f"router = {{ plugin = \"weighted\", config = {{ weights = {{ a = 50, b = 50 }} }} }}\n")
    (work / "modelyard.toml").write_text(toml)


class Traffic:
    """Requests to every sample endpoint and a few of the extra ones, until stopped;
    `paused` holds them (and waits for the one in flight) so that numbers stand still."""

    def __init__(self, api: Api):
        self.api = api
        self.running = threading.Event()
        self.running.set()
        self.idle = threading.Event()
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        plan = [("iris-ab", BY_NAME), ("iris-bandit", FLOWER), ("iris-canary", FLOWER),
                ("iris-shadow", FLOWER), ("iris-bg", FLOWER), ("iris-safe", FLOWER),
                ("iris", FLOWER), ("load-00", FLOWER), ("load-07", FLOWER)]
        i = 0
        while not self.stop.is_set():
            if not self.running.is_set():
                self.idle.set()
                self.running.wait(0.2)
                continue
            self.idle.clear()
            endpoint, body = plan[i % len(plan)]
            status, _, out = self.api.call(f"/v2/models/{endpoint}/infer", body,
                                           headers={"x-user-id": f"user-{i % 37}"})
            if status == 200 and endpoint == "iris-bandit":
                answer = json.loads(out)
                self.api.call("/v2/models/iris-bandit/feedback", {"id": answer["id"], "reward": 1.0})
            self.sent += 1
            i += 1
            time.sleep(0.01)

    def paused(self):
        traffic = self

        class Paused:
            def __enter__(self):
                # Cleared first: an `idle` left from the last pause must not pass the wait.
                traffic.idle.clear()
                traffic.running.clear()
                check(traffic.idle.wait(10), "the traffic did not pause")

            def __exit__(self, *exc):
                traffic.running.set()

        return Paused()


class Browser:
    def __init__(self, base: str, shots: Path, profile: Path):
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                     "--window-size=1400,900", "--hide-scrollbars"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
        self.driver = webdriver.Chrome(service=service, options=options)
        self.base = base
        self.shots = shots

    def open(self, hash_route=""):
        self.driver.get(f"{self.base}/dashboard{hash_route and '#' + hash_route}")

    def go(self, hash_route):
        self.driver.execute_script("location.hash = arguments[0]", hash_route)

    def sign_in(self, token):
        self.driver.get(f"{self.base}/dashboard")
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.get(f"{self.base}/dashboard")
        field = self.wait_for("#token")
        field.send_keys(TOKENS[token])
        self.find("#sign-in").click()
        self.wait(lambda d: not self.visible("#token"), "the sign-in form to go")
        errors = self.console_errors(allowed=(PROBE,))
        check(not errors, f"signing in: console errors {errors}")

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def visible(self, css):
        found = self.all(css)
        return bool(found) and found[0].is_displayed()

    def wait(self, condition, what, timeout=15):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition)
        except TimeoutException:
            raise Failed(f"waited {timeout} s for {what}; page says: {self.text()[:1500]}") from None

    def wait_for(self, css, timeout=15):
        return self.wait(lambda d: self.visible(css) and self.find(css), f"'{css}'", timeout)

    def text(self):
        try:
            return self.find("body").text
        except Exception:  # noqa: BLE001 - a page mid-navigation has no body yet
            return ""

    def field(self, row_css, name):
        return self.find(f"{row_css} [data-field='{name}']").text.strip()

    def console_errors(self, allowed=()):
        """The console's SEVERE entries, but those a test expects (network 401/403s)."""
        entries = self.driver.get_log("browser")
        return [e for e in entries if e["level"] == "SEVERE"
                and not any(a in e["message"] for a in allowed)]

    def shot(self, name):
        self.shots.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def full_shot(self, name):
        """The whole page, as tall as it is."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        width = self.driver.execute_script("return window.innerWidth")
        self.driver.set_window_size(max(width, 390), min(height + 100, 6000))
        self.shot(name)

    def quit(self):
        self.driver.quit()


def number(text):
    """The number a cell shows, or None for anything else (a dash)."""
    try:
        return float(text)
    except ValueError:
        return None


def no_console_errors(browser, page, allowed=()):
    errors = browser.console_errors(allowed)
    check(not errors, f"{page}: console errors: {errors}")


def wait_history(api, endpoint):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        history = api.json(f"/admin/history/{endpoint}")
        if len(history["times"]) >= 3 and sum(sum(v["requests"]) for v in history["variants"]) > 0:
            return history
        time.sleep(0.5)
    raise Failed(f"no history with traffic for {endpoint}: {history}")


def test_no_token(browser, api):
    browser.open()
    browser.wait_for("#token")
    text = browser.text()
    check("iris-ab" not in text and "load-00" not in text, f"without a token the page shows data: {text[:500]}")
    status, _, _ = api.call("/admin/endpoints")
    check(status == 401, f"/admin/endpoints without a token: {status}")
    browser.shot("sign-in")
    check(not browser.visible("#message"), "the sign-in page blames the operator before they tried")
    no_console_errors(browser, "sign-in", allowed=(PROBE,))


def test_overview(browser, api, traffic):
    browser.sign_in("viewer")
    browser.wait_for("tr[data-endpoint='iris-ab']")
    # Every endpoint is listed, the 50 extra ones too.
    rows = browser.all("tr[data-endpoint]")
    names = {r.get_attribute("data-endpoint") for r in rows}
    expected = {e["name"] for e in api.json("/admin/endpoints")["endpoints"]}
    check(expected <= names, f"endpoints missing from the overview: {sorted(expected - names)}")
    # What is wrong now: the refused plugin and the refused model version.
    def problem(kind, says):
        return any(says in item.text for item in browser.all(f"#problems li[data-problem='{kind}']"))

    browser.wait(lambda d: problem("plugin", "broken") and problem("version", "iris v9"),
                 "the problems panel to list broken.wasm and iris v9")
    with traffic.paused():
        time.sleep(2.5)  # a poll after the last request
        listed = api.json("/admin/endpoints")["endpoints"]
        time.sleep(2.5)  # and the page's next poll

        def shown_matches(_):
            for e in listed:
                if "variants" not in e:
                    continue
                for v in e["variants"]:
                    cell = f"tr[data-endpoint='{e['name']}'] [data-variant='{v['name']}']"
                    if browser.field(cell, "requests") != str(v["requests"]):
                        return False
            return True

        browser.wait(shown_matches, "the overview's request counts to be the admin API's")
        for e in listed:
            for v in e.get("variants", []):
                cell = f"tr[data-endpoint='{e['name']}'] [data-variant='{v['name']}']"
                check(browser.field(cell, "errors") == str(v["errors"]), f"{cell} errors")
                for key in ("p50", "p99"):
                    shown = browser.field(cell, f"{key}_ms")
                    want = v[f"latency_{key}_us"] / 1000
                    # Two decimals, rounded (half up in JavaScript, half even in Python).
                    if v["requests"] > 0:
                        check(number(shown) is not None and abs(number(shown) - want) <= 0.005 + 1e-9,
                              f"{cell} {key}: shown {shown!r}, the API's {want}")
    check(any(browser.field(f"tr[data-endpoint='iris-ab'] [data-variant='{v}']", "requests") != "0"
              for v in ("stable", "candidate")), "no traffic shown on iris-ab")
    no_console_errors(browser, "overview")
    browser.shot("overview")
    # The time the page's last poll took to draw the overview, for the benchmarks (not
    # asserted): the page keeps it in #app's data-render-ms.
    return float(browser.find("#app").get_attribute("data-render-ms") or "nan")


def test_endpoint_page(browser, api, traffic):
    wait_history(api, "iris-ab")
    browser.go("/endpoint/iris-ab")
    browser.wait_for("table#arms tr[data-variant='stable']")
    # Each chart drawn from the history: points, and a series per variant.
    for chart in ("#chart-traffic", "#chart-latency", "#chart-share"):
        drawn = ("const u = (document.querySelector(arguments[0])._chart || {}).u;"
                 "return u ? [u.data[0].length, u.series.slice(1).map(s => s.label)] : null;")
        points, labels = browser.wait(
            lambda d, c=chart: (lambda r: r and r[0] >= 3 and r)(d.execute_script(drawn, c)),
            f"{chart} drawn with 3 points or more")
        check(all(any(l.startswith(v) for l in labels) for v in ("stable", "candidate")),
              f"{chart} series {labels} are not the variants'")
    with traffic.paused():
        time.sleep(2.5)
        arms = api.json("/admin/experiments/iris-ab")["arms"]
        time.sleep(2.5)
        for arm in arms:
            row = f"table#arms tr[data-variant='{arm['variant']}']"
            browser.wait(lambda d, r=row, a=arm: browser.field(r, "requests") == str(a["requests"]),
                         f"{row} requests to be {arm['requests']}")
            check(browser.field(row, "errors") == str(arm["errors"]), f"{row} errors")
    # A read token is offered no action, and an action it sends is refused.
    check(not [b for b in browser.all("button[data-action]") if b.is_displayed()],
          "the read token is offered actions")
    status = browser.driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/admin/endpoints/iris-ab/weights', {method: 'POST',
              headers: {'authorization': 'Bearer ' + arguments[0]},
              body: JSON.stringify({weights: {stable: 0, candidate: 100}})})
          .then(r => done(r.status), e => done(String(e)));""", TOKENS["viewer"])
    check(status == 403, f"a read token's action from the page: {status}")
    strategy = api.json("/admin/endpoints/iris-ab")["strategy"]
    check("100" not in json.dumps(strategy.get("weights", strategy)), f"the refused action changed {strategy}")
    no_console_errors(browser, "endpoint page (read token)", allowed=("403",))
    browser.shot("endpoint-read-token")


def confirm(browser, action, answer):
    browser.find(f"button[data-action='{action}']").click()
    browser.wait(lambda d: browser.find("dialog#confirm").get_attribute("open") is not None,
                 "the confirmation dialog")
    browser.find("#confirm-yes" if answer else "#confirm-no").click()
    browser.wait(lambda d: browser.find("dialog#confirm").get_attribute("open") is None,
                 "the dialog to close")


def answered_by(api, endpoint, n=20):
    return {api.infer(endpoint, BY_NAME if endpoint == "iris-ab" else FLOWER,
                      headers={"x-user-id": f"after-{i}"})[0] for i in range(n)}


def audited(api, kind, endpoint):
    changes = api.json(f"/admin/audit?kind={kind}&endpoint={endpoint}")["changes"]
    return [c for c in changes if c["actor"] == "ops"]


def test_actions(browser, api):
    browser.sign_in("ops")
    browser.go("/endpoint/iris-ab")
    browser.wait_for("button[data-action='weights']")
    # Said no to: nothing changes.
    before = api.json("/admin/endpoints/iris-ab")["strategy"]
    confirm(browser, "weights", answer=False)
    time.sleep(0.5)
    check(api.json("/admin/endpoints/iris-ab")["strategy"] == before, "a declined action changed the strategy")
    check(not audited(api, "endpoint.weights", "iris-ab"), "a declined action reached the server")
    # All traffic to the candidate.
    for variant, weight in (("stable", "0"), ("candidate", "100")):
        field = browser.find(f"input[data-weight='{variant}']")
        field.clear()
        field.send_keys(weight)
    confirm(browser, "weights", answer=True)
    browser.wait(lambda d: audited(api, "endpoint.weights", "iris-ab"), "the weights change in the audit trail")
    check(answered_by(api, "iris-ab") == {"candidate"}, "the new weights do not route every request to the candidate")
    # Blue-green: switch to the other colour.
    browser.go("/endpoint/iris-bg")
    browser.wait_for("button[data-action='switch']")
    confirm(browser, "switch", answer=True)
    browser.wait(lambda d: audited(api, "endpoint.promote", "iris-bg"), "the switch in the audit trail")
    check(answered_by(api, "iris-bg") == {"green"}, "the switch did not send traffic to green")
    # A canary rolled back: every request to stable, and the overview says so.
    browser.go("/endpoint/iris-canary")
    browser.wait_for("button[data-action='rollback']")
    confirm(browser, "rollback", answer=True)
    browser.wait(lambda d: audited(api, "endpoint.rollback", "iris-canary"), "the rollback in the audit trail")
    check(answered_by(api, "iris-canary") == {"stable"}, "the rolled-back canary still sends traffic to it")
    no_console_errors(browser, "endpoint actions")
    browser.shot("endpoint-admin")
    # The audit page, filtered to the weights change, names the token.
    browser.go("/audit")
    browser.wait_for("#audit-kind").send_keys("endpoint.weights")
    browser.find("#audit-apply").click()
    browser.wait(lambda d: browser.all("table#audit tbody tr") and all(
        "endpoint.weights" in r.text for r in browser.all("table#audit tbody tr")), "only weights changes listed")
    check("ops" in browser.find("table#audit").text, "the audit page does not name the token")
    no_console_errors(browser, "audit")
    browser.shot("audit")
    browser.go("/")
    browser.wait(lambda d: "iris-canary" in browser.find("#problems").text, "the rolled-back canary among the problems")


def test_other_pages(browser, api, traffic):
    # Models: versions, the card, drift drawn per feature.
    browser.go("/model/iris")
    browser.wait(lambda d: browser.all("table#versions tr[data-version='9']")
                 and "refused" in browser.find("table#versions tr[data-version='9']").text,
                 "iris version 9 shown as refused")
    browser.wait(lambda d: len(browser.all("canvas")) >= 4, "the drift charts")
    no_console_errors(browser, "model")
    browser.full_shot("model")
    browser.driver.set_window_size(1400, 900)
    # Cost: the admin API's figures.
    browser.go("/cost")
    with traffic.paused():
        time.sleep(2.5)
        cost = api.json("/admin/cost")
        time.sleep(2.5)
        for row in cost["models"]:
            css = f"table#cost-models tr[data-model='{row['model']}'][data-version='{row['version']}']"
            browser.wait(lambda d, c=css, r=row: browser.field(c, "predictions") == str(r["predictions"]),
                         f"{css} predictions to be {row['predictions']}")
            check(browser.field(css, "cpu_seconds") == f"{row['cpu_seconds']:.3f}", f"{css} CPU seconds")
            if row["cost_per_million"]:
                shown = number(browser.field(css, "cost_per_million"))
                check(shown is not None and abs(shown / row["cost_per_million"] - 1) < 5e-4,
                      f"{css} cost: {shown} vs {row['cost_per_million']}")
    check(cost["core_hour_price"] == 0.05, cost)
    busy = [r for r in cost["models"] if r["predictions"] > 0]
    check(busy and all(r["cpu_seconds"] > 0 and r["cost_per_million"] > 0 for r in busy), f"no cost measured: {cost}")
    no_console_errors(browser, "cost")
    browser.shot("cost")
    # Plugins: each file, the broken one refused.
    browser.go("/plugins")
    browser.wait_for("table#plugins tr[data-plugin='weighted']")
    check("refused" in browser.find("table#plugins tr[data-plugin='broken']").text.lower(), "broken.wasm not refused")
    no_console_errors(browser, "plugins")
    browser.shot("plugins")


def test_narrow(browser):
    browser.driver.set_window_size(390, 844)
    for route, ready, name in (("/", "tr[data-endpoint='iris-ab']", "overview-narrow"),
                               ("/endpoint/iris-ab", "table#arms tr[data-variant='stable']", "endpoint-narrow")):
        browser.go(route)
        browser.wait_for(ready)
        # Tables scroll inside their own box; the page itself never sideways.
        browser.wait(lambda d: d.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth") <= 1,
            f"{route} on a 390 px screen not to scroll sideways")
        browser.shot(name)
    no_console_errors(browser, "narrow screen")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=str(ROOT / "target/release/modelyard"))
    parser.add_argument("--shots", default=str(ROOT / "target/dashboard-screenshots"))
    args = parser.parse_args()
    os.environ["SE_OFFLINE"] = "true"  # never let selenium look for a browser or driver to download
    work = Path(tempfile.mkdtemp(prefix="modelyard-dashboard-"))
    shots = Path(args.shots)
    shutil.rmtree(shots, ignore_errors=True)
    server = browser = traffic = None
    log = work / "server.log"
    try:
        configuration(work)
        port = free_port()
        env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"), RUST_LOG="info")
        with open(log, "wb") as out:
            server = subprocess.Popen([args.binary, "serve", "--config", str(work / "modelyard.toml"),
                                       "--listen", f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT, env=env)
        api = Api(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 180
        while api.call("/v2/health/ready")[0] != 200:
            check(server.poll() is None, f"the server exited: {log.read_text()[-3000:]}")
            check(time.monotonic() < deadline, "the server was not ready within 180 s")
            time.sleep(0.2)
        traffic = Traffic(api)
        browser = Browser(api.base, shots, work / "profile")
        test_no_token(browser, api)
        drawn = test_overview(browser, api, traffic)
        test_endpoint_page(browser, api, traffic)
        test_other_pages(browser, api, traffic)
        test_actions(browser, api)
        test_narrow(browser)
        print(f"dashboard: every page in chromium, {traffic.sent} requests of traffic, "
              f"screenshots in {shots} (the overview's {EXTRA + 7} endpoints drawn in {drawn:.1f} ms)")
    except Failed as failure:
        print(f"dashboard test FAILED: {failure}", file=sys.stderr)
        if browser:
            browser.shot("failure")
        if log.exists():
            print("server log (end):\n" + log.read_text(errors="replace")[-3000:], file=sys.stderr)
        sys.exit(1)
    finally:
        if traffic:
            traffic.stop.set()
            traffic.running.set()
        if browser:
            browser.quit()
        if server:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
