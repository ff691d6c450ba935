"""The web dashboard in a real browser (headless Chromium from Debian's packages, driven by
selenium) against a live service: uvicorn in a thread, the study controller on, auth on,
SQLite, Ray workers, the tiny Llama family and the ``noop`` evaluator.

One server and its studies are shared by the whole module. Screenshots are written to
``test-artifacts/dashboard/``. Without chromium and chromedriver the browser tests skip,
saying why (``make test`` installs them when it runs as root).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from service.app import create_app  # noqa: E402
from service.db import (  # noqa: E402
    Artifact,
    ArtifactState,
    Baseline,
    Study,
    TrialState,
    create_token,
    make_engine,
    session_factory,
    utcnow,
)
from service.settings import get_settings  # noqa: E402
from tests import api_fixtures as fx  # noqa: E402
from tests.api_fixtures import write_export  # noqa: E402

ARTIFACTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM = os.environ.get("EVOMERGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EVOMERGE_CHROMEDRIVER", "/usr/bin/chromedriver")
FINAL = ("completed", "failed", "cancelled")
pytestmark = pytest.mark.slow


# ---- the service ------------------------------------------------------------------------------
@dataclass
class Service:
    url: str
    token: str
    reader_token: str
    db_url: str
    data_dir: Path
    llama: tuple[Path, list[Path]]
    ids: dict[str, str] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {token or self.token}"})

    def study(self, sid: str) -> dict[str, Any]:
        with self.client() as c:
            r = c.get(f"/studies/{sid}")
            r.raise_for_status()
            return r.json()

    def wait_final(self, sid: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            study = self.study(sid)
            if study["status"] in FINAL:
                return study
            assert time.monotonic() < deadline, f"study {sid} did not end: {study}"
            time.sleep(0.3)


def spec(llama: tuple[Path, list[Path]], name: str, *, trials: int, delay: float = 0.0,
         **changes: Any) -> dict[str, Any]:
    base, (e0, e1) = llama
    data: dict[str, Any] = {
        "name": name,
        "sources": [str(e0), str(e1)],
        "base_model": str(base),
        "space": {"kind": "parameter", "method": "ties", "granularity": 1},
        "evaluation": {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}],
                       "options": {"delay_s": delay}},
        "optimizer": {"name": "optuna-cmaes", "population_size": 4},
        "budget": {"max_trials": trials},
        "parallelism": 2,
        "seed": 0,
    }
    data.update(changes)
    return data


def stacking_spec(llama: tuple[Path, list[Path]], *, trials: int) -> dict[str, Any]:
    return spec(llama, "dashboard: layer stacking", trials=trials,
                space={"kind": "stacking", "repeats": 2, "scales": {"search": True, "low": 0.5, "high": 1.5}},
                optimizer={"name": "optuna-cmaes", "population_size": 4})


def pareto_spec(llama: tuple[Path, list[Path]], *, trials: int) -> dict[str, Any]:
    # noop scores every objective alike; minimizing one of them makes every trial a trade-off
    objectives = [{"task": "fingerprint", "metric": "mean", "name": "accuracy"},
                  {"task": "fingerprint", "metric": "mean", "name": "size", "higher_is_better": False}]
    return spec(llama, "dashboard: two objectives", trials=trials, multi_objective=True,
                space={"kind": "parameter", "method": "task_arithmetic", "granularity": 1},
                evaluation={"evaluator": "noop", "objectives": objectives},
                optimizer={"name": "nsga2", "population_size": 4})


def start_service(tmp: Path, model_root: Path,
                  llama: tuple[Path, list[Path]]) -> tuple[Service, Callable[[], None]]:
    """The service with its controller, on a free loopback port; returns it and its stop()."""
    db_url = f"sqlite:///{tmp / 'dashboard.db'}"
    settings = get_settings(data_dir=tmp / "data", database_url=db_url, model_roots=[str(model_root)],
                            auth=True, max_workers=4, lease_seconds=60)
    live = fx.LiveServer(create_app(settings, poll_seconds=0.2))
    url = live.start()
    engine = make_engine(db_url)
    with session_factory(engine).begin() as s:
        token = create_token(s, "dashboard")
        reader = create_token(s, "reader", scopes="read")
    engine.dispose()

    return Service(url, token, reader, db_url, tmp / "data", llama), live.stop


def submit(service: Service, data: dict[str, Any]) -> str:
    with service.client() as c:
        r = c.post("/studies", json=data)
        assert r.status_code == 201, r.text
        return r.json()["id"]


def wait_for_baselines(service: Service, sid: str, timeout: float = 120.0) -> list[dict[str, Any]]:
    """The study's baselines once the controller has scored them all (service.baselines)."""
    deadline = time.monotonic() + timeout
    while True:
        with service.client() as c:
            rows = c.get(f"/studies/{sid}/baselines").json()
        if rows and all(b["state"] in ("complete", "failed") for b in rows):
            return rows
        assert time.monotonic() < deadline, f"the baselines of {sid} were not scored: {rows}"
        time.sleep(0.2)


def add_failed_baseline(service: Service, sid: str) -> list[str]:
    """Beside the controller's real baselines, one that failed (as one that ran out of memory
    would); returns the names of the scored ones."""
    rows = wait_for_baselines(service, sid)
    engine = make_engine(service.db_url)
    with session_factory(engine).begin() as s:
        s.add(Baseline(study_id=sid, name="ties at density 0.1", kind="uniform", state=TrialState.FAILED,
                       error="out of memory (simulated)"))
    engine.dispose()
    return [b["name"] for b in rows if b["state"] == "complete"]


def drop_baselines(service: Service, sid: str) -> None:
    """A study without baselines (as one submitted before they existed)."""
    wait_for_baselines(service, sid)
    engine = make_engine(service.db_url)
    with session_factory(engine).begin() as s:
        s.query(Baseline).filter_by(study_id=sid).delete()
    engine.dispose()


@pytest.fixture(scope="module")
def service(tmp_path_factory, model_root, family, ray_local) -> Iterator[Service]:
    llama = family("llama")
    svc, stop = start_service(tmp_path_factory.mktemp("dashboard"), model_root, llama)
    # one worker each (the local Ray has 4 CPUs), so that the three run at once
    svc.ids["parameter"] = submit(svc, spec(llama, "dashboard: per-layer TIES", trials=12, parallelism=1))
    svc.ids["stacking"] = submit(svc, stacking_spec(llama, trials=8) | {"parallelism": 1})
    svc.ids["pareto"] = submit(svc, pareto_spec(llama, trials=10) | {"parallelism": 1})
    svc.baselines = add_failed_baseline(svc, svc.ids["parameter"])
    yield svc
    stop()


# ---- the browser ------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the python package selenium is missing (pip install -e '.[dev]')"
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return (f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
                "(`apt-get install chromium chromium-driver`; `make test` does it when run as root)")
    return None


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def chromium() -> None:
    """Skip (loudly: a warning, and the reason in the summary) when there is no browser to drive."""
    reason = _browser_missing()
    if reason:
        message = f"BROWSER TESTS SKIPPED: {reason}"
        warnings.warn(message, stacklevel=1)
        print(f"\n*** {message} ***", file=sys.stderr)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser(chromium, service, downloads) -> Iterator[Any]:
    """Headless Chromium with the full token in its localStorage; downloads go to ``downloads``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1100", "--force-device-scale-factor=1", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    except Exception as exc:  # installed but broken: a failure, with the reason
        pytest.fail(f"{CHROMIUM} (driven by {CHROMEDRIVER}) did not start: {type(exc).__name__}: {exc}")
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        driver.get(service.url + "/")
        driver.execute_script("localStorage.setItem('evomerge.token', arguments[0])", service.token)
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 30, what: str = "") -> Any:
    """Poll ``condition`` until it is truthy; live views redraw, so a stale element is retried."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=[StaleElementReferenceException])
    return wait.until(condition, what)


def click(driver: Any, selector: str, timeout: float = 30) -> None:
    """Click the element matching ``selector``, again if a redraw replaced it meanwhile."""
    wait_for(driver, lambda d: one(d, selector).click() or True, timeout, f"could not click {selector!r}")


def text(driver: Any, selector: str) -> str:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", selector)


def attrs(driver: Any, selector: str, name: str) -> list[str | None]:
    """An attribute of every element now matching ``selector``."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.getAttribute(arguments[1]))",
        selector, name)


def attr(driver: Any, selector: str, name: str) -> str | None:
    """An attribute of the element now matching ``selector`` (read in the page: no stale handle)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null",
        selector, name)


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver: Any, selector: str, timeout: float = 30) -> Any:
    return wait_for(driver, lambda d: (css(d, selector) or [None])[0], timeout, f"no element {selector!r}")


def open_page(driver: Any, service: Service, hash_: str) -> None:
    driver.get(f"{service.url}/#{hash_}")
    driver.refresh()  # a hash change alone would not load the page again


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1440, min(max(int(height) + 40, 900), 4000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1440, 1100)
    return path


def js_errors(driver: Any) -> list[str]:
    """Errors the page raised (a refused request's status line is expected, not an error)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


# ---- tests ------------------------------------------------------------------------------------
def test_assets_are_served_without_a_token(service):
    """The page and its files are public (they hold no data); the data needs the token."""
    with httpx.Client(base_url=service.url) as c:
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for ref in ("/ui/static/app.js", "/ui/static/dashboard.css"):
            assert ref in page.text
            asset = c.get(ref)
            assert asset.status_code == 200 and asset.content
        assert "javascript" in c.get("/ui/static/study.js").headers["content-type"]
        assert c.get("/ui/static/../app.py").status_code == 404
        assert c.get("/ui/static/nope.js").status_code == 404
        assert c.get("/studies").status_code == 401
        assert c.get("/ui/studies/abc", follow_redirects=False).headers["location"] == "/#/studies/abc"
        assert "/" not in c.get("/openapi.json").json()["paths"]  # the API's schema stays the API's
        for static in (REPO / "service" / "dashboard" / "static").iterdir():  # no CDN, no remote asset
            source = static.read_text()
            assert "http://" not in source.replace("http://www.w3.org/2000/svg", "")
            assert "https://" not in source


def test_studies_page_lists_the_studies(service, browser):
    open_page(browser, service, "/")
    ids = wait_for(browser, lambda d: set(d.execute_script(
        "return [...document.querySelectorAll('tr.study-row')].map((r) => r.dataset.id)")) or None,
        what="the studies table")
    assert {service.ids["parameter"], service.ids["stacking"], service.ids["pareto"]} <= ids
    row = f'tr.study-row[data-id="{service.ids["parameter"]}"]'
    content = text(browser, row)
    assert "dashboard: per-layer TIES" in content and "llama-expert0" in content and "ties" in content
    assert "/ 12" in content  # trials done / budget
    assert attr(browser, f"{row} .badge", "data-status") in ("queued", "running", "completed")
    pareto = text(browser, f'tr.study-row[data-id="{service.ids["pareto"]}"]')
    assert "Pareto" in pareto and "2 objectives" in pareto
    assert "auth on" in one(browser, "#server-info").text
    assert "controller up" in one(browser, "#server-info").text  # GET /health's controller
    service.wait_final(service.ids["parameter"])
    wait_for(browser, lambda d: attr(d, f"{row} .badge", "data-status") == "completed",
             timeout=15, what="the list refreshes by itself")
    screenshot(browser, "studies.png")
    assert not js_errors(browser)


def test_a_bad_spec_shows_each_problem_next_to_its_field(service, browser):
    open_page(browser, service, "/new")
    bad = spec(service.llama, "bad study", trials=4)
    bad["space"]["method"] = "no_such_method"
    text = yaml.safe_dump(bad, sort_keys=False)
    area = one(browser, "#spec-text")
    browser.execute_script("arguments[0].value = arguments[1]", area, text)
    one(browser, "#spec-submit").click()
    problem = one(browser, '.annotated .problem[data-loc="space.method"]')
    assert "no_such_method" in problem.text or "method" in problem.text
    assert "fix:" in problem.text
    # the problem sits right under the line that holds the field
    line = problem.find_element("xpath", "preceding-sibling::div[contains(@class,'src-line')][1]")
    assert "method: no_such_method" in line.text and "flagged" in line.get_attribute("class")
    assert "refused" in one(browser, "#spec-problems").text
    with service.client() as c:
        assert c.get("/studies", params={"name": "bad study"}).json()["total"] == 0
    assert not js_errors(browser)


def test_a_good_spec_opens_its_study_which_updates_live(service, browser):
    open_page(browser, service, "/new")
    good = spec(service.llama, "dashboard: live", trials=24, delay=0.25)
    area = one(browser, "#spec-text")
    browser.execute_script("arguments[0].value = arguments[1]", area, json.dumps(good, indent=2))
    one(browser, "#spec-submit").click()
    wait_for(browser, lambda d: "#/studies/" in d.current_url, what="the new study's page")
    sid = browser.current_url.rsplit("/", 1)[1]
    service.ids["live"] = sid
    assert service.study(sid)["name"] == "dashboard: live"
    browser.execute_script("window.__notReloaded = true")
    one(browser, '#live-state[data-state="live"]')

    def done(d: Any) -> int:
        return int(attr(d, "#trial-count", "data-done") or 0)

    def points(d: Any) -> int:
        return len(css(d, "svg.fitness-chart circle.pt"))

    first = wait_for(browser, lambda d: done(d) >= 1 and done(d), timeout=60, what="a first trial")
    assert service.study(sid)["status"] == "running", "the study ended before the page could watch it"
    wait_for(browser, lambda d: done(d) > first, timeout=60, what="the trial count to grow")
    wait_for(browser, lambda d: points(d) > 1, timeout=30, what="more points on the fitness chart")
    assert browser.execute_script("return window.__notReloaded === true"), "the page was reloaded"
    assert one(browser, "#event-log li.kind-trial_complete")

    # a trial's recipe, scores and timings
    number = wait_for(browser, lambda d: attr(d, "#trial-table tr.trial-row.state-complete", "data-number"),
                      what="a complete trial in the table")
    click(browser, f'#trial-table tr.trial-row[data-number="{number}"]')
    detail = one(browser, f'#trial-drawer .trial-detail[data-number="{number}"]')
    recipe = detail.find_element("css selector", ".recipe-text").text
    assert "merge_method: ties" in recipe and "models:" in recipe
    with service.client() as c:
        trial = c.get(f"/studies/{sid}/trials/{number}").json()
    assert trial["scores"] and trial["timings"]
    for key in [*trial["scores"], *trial["timings"]]:  # every score and timing, by name
        assert css(detail, f'tr[data-key="{key}"]'), key
    assert browser.current_url.endswith(f"/trials/{number}")
    one(browser, "#close-trial").click()
    wait_for(browser, lambda d: not one(d, "#trial-drawer").is_displayed(), what="the panel to close")

    service.wait_final(sid)
    wait_for(browser, lambda d: attr(d, "#study-status .badge", "data-status") == "completed",
             what="the final status, live")
    wait_for(browser, lambda d: done(d) == 24 and points(d) == 24, timeout=20, what="every trial plotted")
    assert one(browser, '#live-state[data-state="ended"]')
    screenshot(browser, "study-live.png")
    assert not js_errors(browser)


def test_parameter_study_heatmap_slider_and_baselines(service, browser):
    sid = service.ids["parameter"]
    study = service.wait_final(sid)
    assert study["status"] == "completed", study
    open_page(browser, service, f"/studies/{sid}")
    params = wait_for(browser, lambda d: attrs(d, "#recipe-host svg.heatmap", "data-parameter"),
                      what="the heatmaps")
    assert {"weight", "density"} <= set(params)
    # the workers' memory plan, as validation made it (a CPU worker: the tiny models are resident)
    assert attr(browser, "#study-memory", "data-tier") == "resident"
    memory = text(browser, "#study-memory")
    assert " on cpu · " in memory and "per candidate" in memory
    with service.client() as c:
        view = c.get(f"/studies/{sid}/trials/{study['best_trial_number']}/view").json()
    assert len(params) == len(view["panels"])  # one heatmap per panel of the best recipe
    cells = sum(len(p["layers"]) * len(p["models"]) for p in view["panels"])
    assert len(css(browser, "#recipe-host svg.heatmap rect.cell")) == cells  # layers × source models
    best = str(study["best_trial_number"])
    assert text(browser, "#recipe-trial a") == best
    steps = int(attr(browser, "#recipe-slider", "max") or 0)
    move = ("const s = document.querySelector('#recipe-slider'); "
            "s.value = arguments[0]; s.dispatchEvent(new Event('input'))")
    if steps > 0:  # step back to the first improvement: another trial's recipe
        browser.execute_script(move, 0)
        wait_for(browser, lambda d: text(d, "#recipe-trial a") not in ("", best), what="the slider to move")
        assert "improvement 1 of" in text(browser, ".slider-label")
        browser.execute_script(move, steps)
        wait_for(browser, lambda d: text(d, "#recipe-trial a") == best, what="back to the best")
    # baselines: a table beside the best trial, and reference lines on the fitness chart
    table = wait_for(browser, lambda d: text(d, "#baselines-host table.baselines"), what="the baselines")
    assert f"evolved: trial {best}" in table and "uniform merge" in table
    assert "base: llama-base" in table and "source: llama-expert0" in table  # paths shortened
    assert "out of memory (simulated)" in table
    wait_for(browser, lambda d: len(css(d, "svg.fitness-chart circle.pt")) == 12, what="12 trials plotted")
    assert attrs(browser, "svg.fitness-chart g.hline", "data-name") == service.baselines
    assert css(browser, "svg.fitness-chart .series-step path")  # the best-so-far line
    click(browser, '#x-mode button[data-mode="time"]')
    wait_for(browser, lambda d: "finished at" in text(d, "#fitness-host"), what="a time axis")
    screenshot(browser, "study.png")
    # a study without baselines says "no baselines yet"
    drop_baselines(service, service.ids["stacking"])
    open_page(browser, service, f"/studies/{service.ids['stacking']}")
    assert "No baselines yet" in wait_for(browser, lambda d: text(d, "#baselines-host .empty"))
    assert not js_errors(browser)


def test_stacking_study_draws_its_layer_path(service, browser):
    sid = service.ids["stacking"]
    study = service.wait_final(sid)
    assert study["status"] == "completed", study
    with service.client() as c:
        view = c.get(f"/studies/{sid}/trials/{study['best_trial_number']}/view").json()
    assert view["kind"] == "stacking" and view["path"]
    open_page(browser, service, f"/studies/{sid}")
    step = "#recipe-host svg.stacking circle.path-step"
    wait_for(browser, lambda d: len(css(d, step)) == len(view["path"]), what="the layer path")
    drawn = list(zip(attrs(browser, step, "data-model"), map(int, attrs(browser, step, "data-layer")),
                     map(float, attrs(browser, step, "data-scale"))))
    assert drawn == [(p["model"], p["layer"], pytest.approx(p["scale"])) for p in view["path"]]
    assert len(css(browser, "#recipe-host svg.stacking rect.strip-box")) == len(view["path"])
    assert "The best layer path" in text(browser, "#recipe-card h2")
    assert text(browser, "#recipe-trial a") == str(study["best_trial_number"])
    screenshot(browser, "study-stacking.png")
    assert not js_errors(browser)


def test_pareto_front_points_open_their_trial(service, browser):
    sid = service.ids["pareto"]
    study = service.wait_final(sid)
    assert study["status"] == "completed" and study["multi_objective"], study
    with service.client() as c:
        front = c.get(f"/studies/{sid}/front").json()
    assert len(front) >= 2
    open_page(browser, service, f"/studies/{sid}")
    point = "svg.pareto-chart circle.front"
    wait_for(browser, lambda d: len(css(d, point)) == len(front), what="the front")
    assert {int(k) for k in attrs(browser, point, "data-key")} == {t["number"] for t in front}
    chart = text(browser, "#pareto-host")
    assert "accuracy" in chart and "size" in chart
    assert not css(browser, "#fitness-card") and not css(browser, "#export-best")
    screenshot(browser, "pareto.png")
    number = front[-1]["number"]
    browser.execute_script("document.querySelector(arguments[0]).dispatchEvent(new MouseEvent('click', "
                           "{bubbles: true}))", f'{point}[data-key="{number}"]')
    detail = one(browser, f'#trial-drawer .trial-detail[data-number="{number}"]')
    assert "values" in detail.text and "merge_method: task_arithmetic" in detail.text
    assert browser.current_url.endswith(f"/trials/{number}")
    assert one(browser, "#export-trial")  # a front trial is exported from its panel
    click(browser, "#close-trial")
    assert not js_errors(browser)


def ready_export(service: Service, sid: str, trial: int) -> tuple[int, dict[str, Any]]:
    """A ready export of ``trial``, as the controller's export runner leaves it: files, manifest, row."""
    files = {"model.safetensors": os.urandom(300_000), "config.json": b'{"model_type": "llama"}',
             "README.md": b"# a merged model\n"}
    folder, manifest = write_export(service.data_dir / "exports", f"{trial:064d}", files)
    engine = make_engine(service.db_url)
    with session_factory(engine).begin() as s:
        row = Artifact(study_id=sid, trial_number=trial, kind="export", path=str(folder),
                       state=ArtifactState.READY, progress=1.0, sha256=manifest["archive_sha256"],
                       size_bytes=manifest["archive_size"], export_key=manifest["key"], finished_at=utcnow())
        s.add(row)
        s.flush()
        export_id = row.id
    engine.dispose()
    return export_id, manifest


def test_export_progress_and_download_with_the_token(service, browser, downloads):
    sid = service.ids["parameter"]
    study = service.wait_final(sid)
    other = next(n for n in range(12) if n != study["best_trial_number"])
    export_id, manifest = ready_export(service, sid, other)
    open_page(browser, service, f"/studies/{sid}")
    row = f'#export-list .export-row[data-id="{export_id}"]'
    wait_for(browser, lambda d: attr(d, row, "data-state") == "ready", what="the ready export")
    click(browser, f"{row} details.curl summary")
    curl = text(browser, f"{row} details.curl pre")
    assert 'Authorization: Bearer $EVOMERGE_TOKEN' in curl
    assert f"{service.url}/studies/{sid}/exports/{export_id}/archive" in curl
    click(browser, f"{row} button.download")
    wait_for(browser, lambda d: "downloaded" in text(d, f"{row} .download-status"), what="the download")
    name = f"{manifest['archive_prefix']}.tar"
    saved = downloads / name
    wait_for(browser, lambda d: saved.exists() and saved.stat().st_size == manifest["archive_size"],
             what=f"{saved} in the download folder")
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == manifest["archive_sha256"]
    # asking for the best model: the export appears at once, and is followed until it ends
    click(browser, "#export-best")
    best = study["best_trial_number"]
    wait_for(browser, lambda d: f"of trial {best}" in text(d, ".export-message"), what="the export request")
    with service.client() as c:
        exports = c.get(f"/studies/{sid}/exports").json()
    new = next(e for e in exports if e["trial_number"] == best)
    assert attr(browser, f'#export-list .export-row[data-id="{new["id"]}"]', "data-state") in (
        "pending", "running", "ready")
    assert not js_errors(browser)


def test_the_token_is_asked_for_and_a_missing_scope_is_named(service, browser):
    browser.execute_script("localStorage.removeItem('evomerge.token')")
    open_page(browser, service, "/")
    banner = one(browser, "#banner.auth")
    assert "needs an API token" in banner.text
    # the header field saves it and the page loads its data
    field_ = one(browser, "#token-input")
    field_.send_keys(service.reader_token)
    one(browser, "#token-save").click()
    one(browser, "tr.study-row")
    assert browser.execute_script("return localStorage.getItem('evomerge.token')") == service.reader_token
    # a read-only token may look, not change: the 403 says which scope is missing
    sid = service.ids["parameter"]
    with service.client() as c:
        assert c.post(f"/studies/{sid}/pause").status_code == 409  # completed: no pause for anyone
        paused = submit(service, spec(service.llama, "dashboard: paused", trials=50, delay=1.0))
        assert c.post(f"/studies/{paused}/pause").status_code == 200
    open_page(browser, service, f"/studies/{paused}")
    resume = one(browser, "#action-resume")
    wait_for(browser, lambda d: resume.is_enabled(), what="resume enabled for a paused study")
    resume.click()
    message = one(browser, "#action-msg .error-box")
    assert "Not allowed" in message.text and "'write'" in message.text
    assert "'write'" in one(browser, "#banner.forbidden").text
    # a bad token: 401 asks for a token again
    browser.execute_script("localStorage.setItem('evomerge.token', 'em_not-a-token')")
    open_page(browser, service, "/")
    assert "not valid" in one(browser, "#banner.auth").text
    # the full token can cancel it (with a confirmation click)
    browser.execute_script("localStorage.setItem('evomerge.token', arguments[0])", service.token)
    open_page(browser, service, f"/studies/{paused}")
    cancel = one(browser, "#action-cancel")
    wait_for(browser, lambda d: cancel.is_enabled(), what="cancel enabled")
    cancel.click()
    assert "Really" in cancel.text
    cancel.click()
    wait_for(browser, lambda d: attr(d, "#study-status .badge", "data-status") == "cancelled",
             what="cancelled")
    assert service.study(paused)["status"] == "cancelled"
    assert not js_errors(browser)


def test_optuna_sees_the_study_and_its_trials(service):
    """optuna-dashboard reads the same storage: optuna.load_study finds each study's trials."""
    import optuna

    from service.db import optuna_storage

    engine = make_engine(service.db_url)
    try:
        for kind in ("parameter", "pareto"):
            sid = service.ids[kind]
            service.wait_final(sid)
            with session_factory(engine)() as s:
                name = s.get(Study, sid).optuna_study_name
            assert name == f"evomerge-{sid}"
            loaded = optuna.load_study(study_name=name, storage=optuna_storage(service.db_url))
            complete = [t for t in loaded.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
            with service.client() as c:
                ours = c.get(f"/studies/{sid}/trials", params={"state": "complete", "limit": 500}).json()
            assert len(complete) == ours["total"] == service.study(sid)["trials_done"]
            assert len(loaded.directions) == (2 if kind == "pareto" else 1)
            assert sorted(t.values[0] for t in complete) == pytest.approx(
                sorted(t["values"][0] for t in ours["items"]))
    finally:
        engine.dispose()


def test_the_cost_panel_shows_what_was_spent_and_saved(service, browser):
    """The real study's cost as the API gives it; then a study of rows made by hand (a cache hit and
    a pruned trial) for the savings and the trial table's marks."""
    from service.cost import recount
    from service.db import StudyStatus, Trial

    def cell(part: str, field_: str) -> str:
        return text(browser, f'#cost-card tr[data-part="{part}"] td[data-field="{field_}"]')

    sid = service.ids["parameter"]
    study = service.wait_final(sid)
    open_page(browser, service, f"/studies/{sid}")
    wait_for(browser, lambda d: cell("spent", "trials") == f"{study['cost']['spent']['trials']} trials",
             what="the cost panel")
    assert study["cost"]["spent"]["trials"] == 12 and study["cost"]["spent"]["worker_seconds"] > 0
    spent_time = '#cost-card tr[data-part="spent"] td[data-field="worker_seconds"] span'
    seconds = attr(browser, spent_time, "data-seconds")
    assert float(seconds or 0) == pytest.approx(study["cost"]["spent"]["worker_seconds"])

    data = spec(service.llama, "dashboard: cost", trials=4, budget={"max_examples": 100})
    rows = [(TrialState.COMPLETE, 20, 5000, 4.0, False, None),
            (TrialState.COMPLETE, 20, 5000, 4.0, True, None),
            (TrialState.PRUNED, 5, 1200, 1.0, False, 0), (TrialState.COMPLETE, 20, 5100, 4.2, False, None)]
    engine = make_engine(service.db_url)
    with session_factory(engine).begin() as s:
        row = Study(name=data["name"], spec=data, status=StudyStatus.COMPLETED, trials_done=3)
        s.add(row)
        s.flush()
        for n, (state, examples, tokens, secs, cached, rung) in enumerate(rows):
            s.add(Trial(study_id=row.id, number=n, state=state, params={"x": n}, values=[0.1 * n],
                        fitness=0.1 * n, scores={"fingerprint/mean": 0.1 * n}, examples=examples,
                        tokens=tokens, worker_seconds=secs, cached=cached, rung=rung, started_at=utcnow(),
                        finished_at=utcnow()))
        s.add(Baseline(study_id=row.id, name="uniform merge", kind="uniform", state=TrialState.COMPLETE,
                       fitness=0.2, values=[0.2], scores={"fingerprint/mean": 0.2}, examples=20, tokens=4900,
                       worker_seconds=3.5))
        s.flush()
        cost = recount(s, row.id, full=20)
        row.cost = cost.model_dump(mode="json")
        hand = row.id
    engine.dispose()
    open_page(browser, service, f"/studies/{hand}")
    wait_for(browser, lambda d: cell("spent", "examples") == "45", what="the hand-made study's cost")
    assert cell("spent", "tokens") == "11,300" and cell("spent", "trials") == "3 trials"
    assert cell("saved_by_cache", "examples") == "20" and cell("saved_by_cache", "tokens") == "5,000"
    assert cell("saved_by_cache", "trials") == "1 hit"
    assert cell("saved_by_pruning", "examples") == "15" and cell("saved_by_pruning", "tokens") == "—"
    assert cell("saved_by_pruning", "worker_seconds") == "≈ 3.0 s"  # 1 s for 5 of 20 examples
    assert cell("baselines", "examples") == "20" and cell("baselines", "trials") == "1 baseline"
    notes = text(browser, "#cost-notes")
    assert "45 of 100 examples" in notes and "takes 20 examples" in notes
    marks = wait_for(browser, lambda d: attrs(d, "#trial-table .cost-mark", "data-mark"), what="the marks")
    assert sorted(marks) == ["cached", "pruned"]
    assert text(browser, '#trial-table tr[data-number="2"] .cost-mark') == "rung 0"
    screenshot(browser, "study-cost.png")
    assert not js_errors(browser)
