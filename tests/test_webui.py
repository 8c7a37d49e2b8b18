"""The approval page in headless Chromium, clicked as a person would, against a real sidecar.

The sidecar is the real FastAPI app under uvicorn on a free 127.0.0.1 port, with a
daemon bootstrapped on the tiny random BERT. One run is a real retrain
(``RetrainJob``, no rank sweep, two epochs) that ends in ``pending_approval``, so
approving it promotes a real candidate. Training more runs would be slow, so the
others are written through ``Store.create_run``, ``Store.transition_run`` and
``Store.update_run``. Their canary records have the full shape: gates, slices with
per-class F1 and intervals, shadow flips and latency. One run is reviewed and
rejected, one meets a stale page, one has markup in its texts, and one finished
run has an empty canary record.

The browser tests skip when Chromium, chromedriver or selenium is missing, unless
DRIFTLOOP_REQUIRE_BROWSER=1, which makes them fail instead. Set
DRIFTLOOP_WEBUI_SCREENSHOT to a PNG path to save the page with a run selected.
"""

from __future__ import annotations

import copy
import os
import re
import shutil

import httpx
import pytest
from fastapi.testclient import TestClient

from monitor.api import create_app
from monitor.config import parse_config
from monitor.daemon import MonitorDaemon, new_run_id
from retrain.bootstrap import bootstrap
from retrain.jobs import RetrainJob
from tests.conftest import ServerThread, post_labelled_events, tiny_deployment_config

TOKEN = "webui-token-5d1f"
MARKUP = '<img src=x onerror="window.__xss = 1">'
# Debian's package names; chromedriver must match the browser's major version.
BROWSER_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER_PATHS = ("/usr/bin/chromedriver",)
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1100",
)
WAIT_S = 60


def find_executable(candidates: tuple[str, ...], name: str) -> str | None:
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def missing_browser() -> str | None:
    """Return why the browser tests cannot run here, or None when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if find_executable(BROWSER_PATHS, "chromium") is None:
        return "Chromium not found (apt-get install chromium chromium-driver)"
    if find_executable(DRIVER_PATHS, "chromedriver") is None:
        return "chromedriver not found (apt-get install chromium-driver)"
    return None


def gate(name, passed, value, threshold, message, evaluated=True) -> dict:
    return {"name": name, "passed": passed, "evaluated": evaluated, "value": value, "threshold": threshold,
            "message": message}


def review_canary(labels: list[str]) -> dict:
    """An inconclusive canary of the full shape: too few production labels, one test class regressed (one allowed)."""
    per_class = [
        {"label": labels[0], "support": 30, "current_f1": 0.95, "candidate_f1": 0.97, "delta": 0.02},
        {"label": labels[1], "support": 30, "current_f1": 0.93, "candidate_f1": 0.81, "delta": -0.12,
         "lost": 9, "gained": 1, "p_value": 0.0059, "adjusted_p": 0.0236},
        {"label": labels[2], "support": 30, "current_f1": 0.90, "candidate_f1": 0.89, "delta": -0.01},
        {"label": labels[3], "support": 30, "current_f1": 0.88, "candidate_f1": 0.92, "delta": 0.04},
    ]
    test = {
        "name": "original_test", "n": 450, "current_accuracy": 0.904, "candidate_accuracy": 0.9082,
        "current_macro_f1": 0.9051, "candidate_macro_f1": 0.8987, "mcnemar_p": 0.4531, "mcnemar_midp": 0.3906,
        "accuracy_diff": 0.0042, "accuracy_diff_ci": [-0.0044, 0.0133],
        "macro_f1_diff": -0.0064, "macro_f1_diff_ci": [-0.0211, 0.0083],
        "per_class": per_class, "regressed_classes": [labels[1]],
    }
    skipped = "not evaluated: 12 labelled production samples, need at least 30"
    production = {
        "name": "production_holdout", "n": 12, "current_accuracy": 0.5, "candidate_accuracy": 0.5833,
        "current_macro_f1": 0.41, "candidate_macro_f1": 0.52, "mcnemar_p": 1.0, "mcnemar_midp": 0.5,
        "accuracy_diff": 0.0833, "accuracy_diff_ci": [-0.1667, 0.3333],
        "macro_f1_diff": 0.11, "macro_f1_diff_ci": [-0.08, 0.29],
        "per_class": [{"label": labels[0], "support": 12, "current_f1": 0.5, "candidate_f1": 0.6, "delta": 0.1}],
        "regressed_classes": [],
    }
    return {
        "passed": False,
        "status": "inconclusive",
        "deciding_gate": "production_gain",
        "gates": [
            gate("production_gain", False, 0.0833, 0.0, skipped, evaluated=False),
            gate("production_significance", False, 0.5, 0.05, skipped, evaluated=False),
            gate("test_noninferiority", True, -0.0044, -0.005,
                 "lower 95% bound of the test accuracy difference -0.0044 (>= -0.0050)"),
            gate("test_class_regressions", True, 1, 1,
                 f"1 test classes regressed, at most 1 allowed: {labels[1]} (-0.120)"),
        ],
        "production": production,
        "test": test,
        "shadow": {
            "n": 200, "agreement": 0.955, "current_mean_confidence": 0.81, "candidate_mean_confidence": 0.84,
            "flips": [{"current": labels[1], "candidate": labels[2], "count": 6},
                      {"current": labels[3], "candidate": labels[0], "count": 3}],
            "flips_by_class": {labels[1]: {"to_other": 6, "from_other": 0}, labels[2]: {"to_other": 0, "from_other": 6}},
            "samples": [{"text": "move 40 dollars to my savings", "current": labels[1], "candidate": labels[2],
                         "current_confidence": 0.62, "candidate_confidence": 0.58}],
        },
        "latency": {"n": 200, "current_p50_ms": 7.1, "current_p99_ms": 15.4, "candidate_p50_ms": 7.3,
                    "candidate_p99_ms": 16.0},
    }


def review_training() -> dict:
    epochs = [
        {"epoch": 1, "steps": 40, "train_loss": 2.31, "complete": True, "val_loss": 1.92, "val_accuracy": 0.61,
         "val_macro_f1": 0.55},
        {"epoch": 2, "steps": 80, "train_loss": 1.44, "complete": True, "val_loss": 1.21, "val_accuracy": 0.78,
         "val_macro_f1": 0.74},
        {"epoch": 3, "steps": 120, "train_loss": 0.92, "complete": True, "val_loss": 0.97, "val_accuracy": 0.84,
         "val_macro_f1": 0.81},
    ]
    sweep = [
        {"rank": 4, "start": "scratch", "val_macro_f1": 0.7712, "val_accuracy": 0.8, "val_loss": 1.05, "steps": 40,
         "wall_seconds": 3.1, "chosen": False, "error": None},
        {"rank": 8, "start": "scratch", "val_macro_f1": 0.8101, "val_accuracy": 0.84, "val_loss": 0.97, "steps": 40,
         "wall_seconds": 3.4, "chosen": True, "error": None},
    ]
    return {"rank": 8, "steps": 120, "epochs": epochs, "sweep": sweep, "stop_reason": "completed",
            "wall_seconds": 12.5, "device": "cpu"}


def write_run(store, run_id: str, state: str, trigger: dict, canary: dict, training: dict) -> None:
    """Record a finished run the way the retrain worker does: queued, then its final state with an audit row."""
    store.create_run(run_id, "queued", base_version="v1", trigger=trigger)
    store.update_run(run_id, training=training, canary=canary)
    assert store.transition_run(run_id, ("queued",), state, actor="retrain", action=f"run_{state}")


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, tiny_model_dir, clinc_dir):
    """Start a sidecar on a real daemon and yield (base URL, daemon, run ids by role)."""
    state = tmp_path_factory.mktemp("webui-state")
    raw = copy.deepcopy(tiny_deployment_config(state, tiny_model_dir))
    raw["retrain"]["sweep"] = {"enabled": False}
    # Promotion notifies the model server at this address. Nothing listens there, so the notice fails and is logged.
    raw["server"] = {"host": "127.0.0.1", "port": 18137, "monitor_url": None}
    config = parse_config(raw)
    bootstrap(config, log=lambda message: None)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRIFTLOOP_API_TOKEN", TOKEN)
        daemon = MonitorDaemon(config)
        daemon.start(background=False)
        assert daemon.ready, daemon.startup_error
        try:
            post_labelled_events(daemon, 60)
            runs = {"trained": new_run_id()}
            active = daemon.registry.active()
            daemon.store.create_run(runs["trained"], "queued", active.name, {"reason": "test: trained candidate"})
            final = RetrainJob(run_id=runs["trained"], config=config, store=daemon.store, registry=daemon.registry,
                               dataset=daemon.dataset, base=active, since=None).run()
            assert final == "pending_approval", daemon.store.get_run(runs["trained"])["error"]

            labels = [label for label in daemon.labels if label != "oos"]
            trigger = {"reason": "3 drifted windows in a row", "windows": ["w1", "w2", "w3"],
                       "signals": ["embedding_mmd"], "labelled": 240}
            runs["review"] = "r-webui-review"
            write_run(daemon.store, runs["review"], "pending_approval", trigger, review_canary(labels),
                      review_training())
            runs["conflict"] = "r-webui-conflict"
            write_run(daemon.store, runs["conflict"], "pending_approval", trigger, review_canary(labels),
                      review_training())
            runs["markup"] = "r-webui-markup"
            markup_canary = review_canary(labels)
            markup_canary["shadow"]["samples"][0]["text"] = f"send {MARKUP} to savings"
            write_run(daemon.store, runs["markup"], "pending_approval", {"reason": f"manual {MARKUP}"},
                      markup_canary, {})
            # Newest of all, so only the ordering puts it below the pending runs.
            runs["finished"] = "r-webui-finished"
            write_run(daemon.store, runs["finished"], "rejected_by_gate", {"reason": "scheduled"}, {}, {})

            with ServerThread(create_app(daemon), lifespan="off") as server:
                yield server.url, daemon, runs
        finally:
            daemon.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("DRIFTLOOP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DRIFTLOOP_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_executable(BROWSER_PATHS, "chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from looking for drivers online.
    driver = webdriver.Chrome(service=Service(executable_path=find_executable(DRIVER_PATHS, "chromedriver")),
                              options=options)
    yield driver
    driver.quit()


def page_errors(driver) -> list[str]:
    """Return the browser console's errors since the last call, leaving out failed HTTP responses.

    Script errors and Content-Security-Policy violations are reported here. The 401 and 409
    responses that some tests provoke are network entries, and the page reports those itself.
    """
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and entry.get("source") != "network"]


@pytest.fixture()
def page(browser, sidecar):
    """Load the approval page with empty token, name and selection, and check the console for errors afterwards."""
    from selenium.common.exceptions import TimeoutException

    url, _daemon, _runs = sidecar
    browser.get(f"{url}/ui")
    browser.execute_script("sessionStorage.clear()")
    page_errors(browser)
    browser.get(f"{url}/ui")
    try:
        wait_until(browser, lambda d: d.find_elements("css selector", "#runs tbody tr"))
    except TimeoutException:
        pytest.fail(f"the run list did not appear; browser console: {page_errors(browser)}")
    yield browser
    assert page_errors(browser) == []


def wait_until(driver, condition):
    """Wait for ``condition``, ignoring elements that vanish because the page re-rendered the detail."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, WAIT_S, ignored_exceptions=ignored).until(condition)


def open_run(driver, run_id: str) -> None:
    driver.find_element("css selector", f'#runs tbody tr[data-run-id="{run_id}"]').click()
    wait_until(driver, lambda d: d.find_elements("id", "run-id") and d.find_element("id", "run-id").text == run_id)


def fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def decision_message(driver) -> str:
    """Wait until the decision request has finished and return its message."""
    def finished(d):
        message = d.find_element("id", "decision-message")
        classes = message.get_attribute("class").split()
        return message.text if "ok" in classes or "error" in classes else False

    return wait_until(driver, finished)


def audit_entries(url: str, run_id: str, action: str) -> list[dict]:
    entries = httpx.get(f"{url}/v1/audit", params={"run_id": run_id, "limit": 1000}).json()["entries"]
    return [entry for entry in entries if entry["action"] == action]


def test_page_served_with_policy(sidecar):
    url, _daemon, _runs = sidecar
    response = httpx.get(f"{url}/ui")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "'unsafe-inline'" not in policy
    assert "<script src" not in response.text
    # The SVG namespace is an identifier that is never fetched. No other absolute URL may appear.
    assert re.findall(r"https?://[^\s\"']+", response.text) == ["http://www.w3.org/2000/svg"]


def test_trailing_slash_redirects(sidecar):
    url, _daemon, _runs = sidecar
    response = httpx.get(f"{url}/ui/")
    assert response.status_code == 308
    assert httpx.URL(f"{url}/ui/").join(response.headers["location"]) == httpx.URL(f"{url}/ui")


def test_audit_filters_by_run(sidecar):
    url, _daemon, runs = sidecar
    entries = httpx.get(f"{url}/v1/audit", params={"run_id": runs["review"]}).json()["entries"]
    assert entries
    assert {entry["run_id"] for entry in entries} == {runs["review"]}


def test_list_shows_pending_first(page, sidecar):
    _url, _daemon, runs = sidecar
    rows = page.find_elements("css selector", "#runs tbody tr")
    ids = [row.get_attribute("data-run-id") for row in rows]
    pending = {runs["trained"], runs["review"], runs["conflict"], runs["markup"]}
    assert set(ids[:len(pending)]) == pending
    assert ids[len(pending)] == runs["finished"]
    for row in rows[:len(pending)]:
        assert "pending" in row.get_attribute("class").split()
    assert "pending" not in (rows[len(pending)].get_attribute("class") or "").split()

    review = page.find_element("css selector", f'#runs tbody tr[data-run-id="{runs["review"]}"]')
    cells = [cell.text for cell in review.find_elements("tag name", "td")]
    assert cells[1] == "pending_approval"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", cells[2])
    assert cells[3] == "3 drifted windows in a row"
    assert cells[4] == "inconclusive"
    assert cells[5] == "production_gain"
    finished = page.find_element("css selector", f'#runs tbody tr[data-run-id="{runs["finished"]}"]')
    assert [cell.text for cell in finished.find_elements("tag name", "td")][4:] == ["-", "-"]


def test_detail_shows_gates_and_deltas(page, sidecar):
    _url, daemon, runs = sidecar
    open_run(page, runs["review"])

    gates = {row.get_attribute("data-gate"): [cell.text for cell in row.find_elements("tag name", "td")]
             for row in page.find_elements("css selector", "tr[data-gate]")}
    assert list(gates) == ["production_gain", "production_significance", "test_noninferiority",
                           "test_class_regressions"]
    assert gates["production_gain"] == ["production_gain", "not evaluated", "0.0833", "0",
                                        "not evaluated: 12 labelled production samples, need at least 30"]
    assert gates["test_noninferiority"][1:4] == ["passed", "-0.0044", "-0.005"]
    deciding = page.find_element("css selector", 'tr[data-gate="production_gain"]')
    assert "deciding" in deciding.get_attribute("class").split()

    test_slice = page.find_element("css selector", '#per-class [data-slice="original_test"]')
    class_rows = test_slice.find_elements("css selector", "tr[data-label]")
    labels = [label for label in daemon.labels if label != "oos"]
    assert [row.get_attribute("data-label") for row in class_rows] == [labels[1], labels[2], labels[0], labels[3]]
    assert "regressed" in class_rows[0].get_attribute("class").split()
    assert [cell.text for cell in class_rows[0].find_elements("tag name", "td")][1:] == ["30", "0.930", "0.810",
                                                                                         "-0.120", "9 / 1", "0.024"]
    # A canary stored before the per-class test existed shows dashes.
    assert [cell.text for cell in class_rows[1].find_elements("tag name", "td")][5:] == ["-", "-"]
    assert not (class_rows[1].get_attribute("class") or "")

    slice_text = page.find_element("css selector", "#detail").text
    assert "90.4% \u2192 90.8%" in slice_text
    assert "0.9051 \u2192 0.8987" in slice_text
    assert "[-0.0211, +0.0083]" in slice_text
    assert "[-0.0044, +0.0133]" in slice_text
    assert "0.391" in slice_text
    assert "move 40 dollars to my savings" in slice_text
    assert "95.5%" in slice_text
    assert "16.0" in slice_text

    train_line = page.find_element("css selector", "#loss-chart polyline.series-train")
    assert len(train_line.get_attribute("points").split()) == 3
    assert page.find_elements("css selector", "#loss-chart polyline.series-val")

    shot = os.environ.get("DRIFTLOOP_WEBUI_SCREENSHOT")
    if shot:
        width, height = page.get_window_size()["width"], page.get_window_size()["height"]
        page.set_window_size(width, page.execute_script("return document.documentElement.scrollHeight") + 140)
        page.save_screenshot(shot)
        page.set_window_size(width, height)


def test_trained_run_renders(page, sidecar):
    """A run from the real retrain path shows its trigger, gates and loss curve."""
    _url, _daemon, runs = sidecar
    open_run(page, runs["trained"])
    detail = page.find_element("id", "detail").text
    assert "test: trained candidate" in detail
    assert page.find_elements("css selector", "tr[data-gate]")
    assert page.find_elements("css selector", "#loss-chart polyline.series-train")


def test_empty_canary_shows_dashes(page, sidecar):
    """A run whose canary record is empty, as before the canary ran, shows '-' and no decision buttons."""
    _url, _daemon, runs = sidecar
    open_run(page, runs["finished"])
    sections = dict(page.execute_script(
        "return [...document.querySelectorAll('#detail h3')]"
        ".map(h => [h.textContent, h.nextElementSibling.textContent])"))
    assert sections["Shadow comparison"] == "-"
    assert sections["Latency"] == "-"
    assert sections["Slices"].count("-") >= 20
    assert not page.find_elements("css selector", "tr[data-gate]")
    assert not page.find_elements("id", "approve")
    assert not page.find_elements("id", "reject")
    assert "No decision possible: the run is rejected_by_gate." in page.find_element("id", "detail").text


def test_wrong_token_shows_401(page, sidecar):
    url, _daemon, runs = sidecar
    open_run(page, runs["review"])
    fill(page, "token", "not-the-token")
    fill(page, "comment", "trying a bad token")
    page.find_element("id", "approve").click()

    assert decision_message(page) == "HTTP 401: missing or invalid bearer token"
    assert httpx.get(f"{url}/v1/retrains/{runs['review']}").json()["state"] == "pending_approval"
    assert not audit_entries(url, runs["review"], "run_approved")


def test_reject_records_actor_and_comment(page, sidecar):
    url, _daemon, runs = sidecar
    run_id = runs["review"]
    open_run(page, run_id)
    fill(page, "token", TOKEN)
    fill(page, "actor", "bob")
    fill(page, "comment", "one class regressed by 0.12")
    page.find_element("id", "reject").click()

    assert decision_message(page) == f"Rejected run {run_id}"
    assert httpx.get(f"{url}/v1/retrains/{run_id}").json()["state"] == "rejected"
    rejected = audit_entries(url, run_id, "run_rejected")
    assert len(rejected) == 1
    assert rejected[0]["actor"] == "bob"
    assert rejected[0]["detail"] == {"comment": "one class regressed by 0.12"}
    row = page.find_element("css selector", f'#runs tbody tr[data-run-id="{run_id}"]')
    assert "pending" not in (row.get_attribute("class") or "").split()


def test_stale_page_shows_409(page, sidecar):
    url, _daemon, runs = sidecar
    run_id = runs["conflict"]
    open_run(page, run_id)
    # Another reviewer rejects the run after this page loaded it.
    response = httpx.post(f"{url}/v1/retrains/{run_id}/reject", json={"by": "carol"},
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    fill(page, "token", TOKEN)
    page.find_element("id", "approve").click()

    message = decision_message(page)
    assert message.startswith(f"HTTP 409: retrain run {run_id} is rejected, only ")
    assert message.endswith(" runs can be approved")
    assert httpx.get(f"{url}/v1/retrains/{run_id}").json()["state"] == "rejected"


def test_markup_renders_as_text(page, sidecar):
    _url, _daemon, runs = sidecar
    row = page.find_element("css selector", f'#runs tbody tr[data-run-id="{runs["markup"]}"]')
    assert row.find_elements("tag name", "td")[3].text == f"manual {MARKUP}"
    open_run(page, runs["markup"])

    assert f"send {MARKUP} to savings" in page.find_element("id", "samples").text
    assert f"manual {MARKUP}" in page.find_element("id", "detail").text
    assert not page.find_elements("tag name", "img")
    assert page.execute_script("return window.__xss === undefined")


def test_approve_records_actor_and_comment(page, sidecar):
    """Approve the trained run. This test runs last, because a promotion supersedes every other waiting run."""
    url, _daemon, runs = sidecar
    run_id = runs["trained"]
    open_run(page, run_id)
    fill(page, "token", TOKEN)
    fill(page, "actor", "alice")
    fill(page, "comment", "gates look fine, shipping")
    page.find_element("id", "approve").click()

    message = decision_message(page)
    assert message.startswith(f"Approved run {run_id}")
    run = httpx.get(f"{url}/v1/retrains/{run_id}").json()
    assert run["state"] == "active"
    assert message.endswith(f"active version is now {run['promoted_version']}")
    approved = audit_entries(url, run_id, "run_approved")
    assert len(approved) == 1
    assert approved[0]["actor"] == "alice"
    assert approved[0]["detail"] == {"comment": "gates look fine, shipping"}

    wait_until(page, lambda d: d.find_elements("css selector", '#audit tr[data-action="run_approved"]'))
    audit_row = page.find_element("css selector", '#audit tr[data-action="run_approved"]').text
    assert "alice" in audit_row
    assert "comment: gates look fine, shipping" in audit_row
    assert not page.find_elements("id", "approve")
    assert TOKEN not in page.current_url
    assert page.execute_script("return localStorage.length") == 0
    assert page.execute_script("return sessionStorage.getItem('driftloop.apiToken')") == TOKEN
    markup_row = page.find_element("css selector", f'#runs tbody tr[data-run-id="{runs["markup"]}"]')
    assert markup_row.find_elements("tag name", "td")[1].text == "superseded"


def test_ui_without_browser(tmp_path):
    """The page and the redirect through the app itself, for machines without Chromium."""
    daemon = MonitorDaemon(parse_config({"state_dir": str(tmp_path / "state")}))
    client = TestClient(create_app(daemon))
    page = client.get("/ui")
    assert page.status_code == 200
    assert "<title>driftloop approvals</title>" in page.text
    assert "innerHTML" not in page.text
    assert "localStorage.setItem" not in page.text
    assert page.headers["referrer-policy"] == "no-referrer"
    redirect = client.get("/ui/", follow_redirects=False)
    assert redirect.status_code == 308
    assert redirect.headers["location"] == "../ui"
    daemon.store.close()
