"""The "Sync status" view in a real browser against a real ``airflow api-server``.

Real syncs by the provider's operators fill the target: three runs of a gated DAG's tasks (the
first quarantines two rows, the second updates 30, the third fails its gate), a table sync of a
second DAG and a CDC sync of a third (the operators run in this process with a stand-in for
Airflow's task instance, and record their DAG as in a real run).  The api-server runs with the
provider's plugin and a test auth manager that gives ``analyst`` the orders DAG only and
``outsider`` no DAG.  Headless Chromium (Debian's ``chromium`` + ``chromium-driver``, installed here
when missing) signs in through Airflow's login page, reads the overview and a detail page, and the
screenshots go to the test's temporary folder, or to docs/images/ with ``SYNC_UPDATE_SCREENSHOTS=1``
(for the docs): the view inside the Airflow UI (sync-status.png) and a detail page (sync-status-detail.png).
A normal test run leaves the committed screenshots alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from sync_dev.airflow_sandbox import copy_migrated_database

from ..conftest import CdcEnv, SyncEnv

REPO = Path(__file__).resolve().parents[2]
DOCS_IMAGES = REPO / "docs" / "images"
PASSWORDS = {"admin": "admin-pass", "analyst": "analyst-pass", "outsider": "outsider-pass"}
ACCESS = {"analyst": ["orders_status"], "outsider": []}
SUITE = {
    "name": "orders",
    "expectations": [
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "quantity", "min_value": 0}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "customer"}},
    ],
}

pytestmark = pytest.mark.airflow


@pytest.fixture
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed with apt-get when missing (skips when that fails)."""

    def found() -> tuple[str | None, str | None]:
        return shutil.which("chromium"), shutil.which("chromedriver")

    browser, driver = found()
    if not (browser and driver):
        try:
            subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                check=True,
                capture_output=True,
                timeout=600,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
        except (OSError, subprocess.SubprocessError) as error:
            pytest.skip(f"chromium and chromium-driver are not installed and apt-get could not install them: {error}")
        browser, driver = found()
    if not (browser and driver):
        pytest.skip("chromium and chromium-driver are not installed")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fill_source(env: SyncEnv) -> None:
    with env.source() as conn:
        conn.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, quantity int, "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO orders (id, customer, quantity) SELECT g, 'customer ' || g, g % 7 "
            "FROM generate_series(1, 500) g"
        )
        conn.execute("UPDATE orders SET quantity = -5 WHERE id IN (17, 250)")
        conn.execute(
            "CREATE TABLE payroll (id bigint PRIMARY KEY, amount numeric, updated_at timestamptz DEFAULT now())"
        )
        conn.execute("INSERT INTO payroll (id, amount) SELECT g, g * 10 FROM generate_series(1, 40) g")
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, qty int)")
        conn.execute("INSERT INTO items SELECT g, g FROM generate_series(1, 300) g")


class _TaskInstance:
    """What the operators read of Airflow's task instance: the DAG and task ids, and XCom pushes."""

    def __init__(self, dag_id: str, task_id: str) -> None:
        self.dag_id, self.task_id = dag_id, task_id

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def _run(operator: Any, dag_id: str, run_id: str) -> Any:
    return operator.execute({"run_id": run_id, "ti": _TaskInstance(dag_id, operator.task_id)})


def _airflow_environment(home: Path) -> dict[str, str]:
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }


@dataclass
class ApiServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, timeout: float = 300) -> str:
        """The URL once the server answers its health check (it starts while the syncs run)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{self.url}/api/v2/monitor/health", timeout=2).ok:
                    return self.url
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("api-server did not start:\n" + self.log.read_text()[-5000:])
            time.sleep(0.5)


@pytest.fixture
def api_server(cdc: CdcEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiServer]:
    """``airflow api-server`` on a free port (on a copy of the session's migrated metadata database),
    started in the background, with the plugin (from a plugins folder), the test auth manager and the
    target of ``cdc.env``."""
    env = cdc.env
    home = tmp_path / "airflow"
    home.mkdir()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "sync_status.py").write_text(
        "from airflow_sync_provider.plugins.status_plugin import SyncStatusPlugin  # noqa: F401\n"
    )
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    connections = {
        "AIRFLOW_CONN_STATUS_SOURCE": f"postgres://postgres@127.0.0.1:{env.server.port}/{env.source_db}",
        "AIRFLOW_CONN_STATUS_TARGET": f"postgres://postgres@127.0.0.1:{env.server.port}/{env.target_db}",
    }
    for name, value in connections.items():  # the syncs of this process use them too
        monkeypatch.setenv(name, value)
    environment = {
        **os.environ,
        **connections,
        **_airflow_environment(home),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
        "AIRFLOW__CORE__AUTH_MANAGER": "tests.browser.restricted_auth.RestrictedAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,analyst:viewer,outsider:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": "browser-test-secret",
        "AIRFLOW__SYNC__STATUS_CONN_IDS": "status_target",
        "SYNC_TEST_DAG_ACCESS": json.dumps(ACCESS),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "dags"), os.environ.get("PYTHONPATH", "")]),
    }
    # the session's migrated metadata database (a copy), not an ``airflow db migrate`` of our own
    copy_migrated_database(home / "airflow.db")
    port = _free_port()
    airflow = [sys.executable, "-m", "airflow"]
    command = [*airflow, "api-server", "--port", str(port), "--host", "127.0.0.1", "--apps", "core"]
    log_path = tmp_path / "api-server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield ApiServer(f"http://127.0.0.1:{port}", process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def synced(cdc: CdcEnv, api_server: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Real syncs by the provider's operators (as three DAGs' tasks), in the target the api-server reads
    (they run while it starts)."""
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_sync_provider.operators.cdc import CdcSyncOperator
    from airflow_sync_provider.operators.quality import DataQualityGateOperator
    from airflow_sync_provider.operators.sync import (
        ExtractToStagingOperator,
        LoadStagedToPostgresOperator,
        SyncTableOperator,
    )

    env = cdc.env
    _fill_source(env)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps(SUITE))
    monkeypatch.setenv("SYNC_STAGING_DIR", str(tmp_path / "staging"))
    connections = {"source_conn_id": "status_source", "target_conn_id": "status_target"}
    extract = ExtractToStagingOperator(
        task_id="extract", sync_id="orders", source_table="orders", cursor_column="updated_at", **connections
    )

    def gate(manifest: Any) -> DataQualityGateOperator:
        return DataQualityGateOperator(
            task_id="quality_gate",
            manifest=manifest,
            target_conn_id="status_target",
            suite_path=str(suite),
            quarantine=True,
            max_quarantine_fraction=0.05,
        )

    # orders_status, run 1: two rows fail the range rule and are quarantined, 498 load.
    first = "manual__2026-05-01T00:00:00+00:00"
    gated = _run(gate(_run(extract, "orders_status", first)), "orders_status", first)
    load = LoadStagedToPostgresOperator(task_id="load", manifest=gated, target_conn_id="status_target")
    assert _run(load, "orders_status", first)["inserted"] == 498
    # payroll_sync: one task.
    payroll = SyncTableOperator(
        task_id="sync_payroll", sync_id="payroll", source_table="payroll", cursor_column="updated_at", **connections
    )
    _run(payroll, "payroll_sync", "manual__2026-05-01T00:00:00+00:00")
    # orders_status, run 2: 30 rows updated at the source.
    with env.source() as conn:
        conn.execute("UPDATE orders SET quantity = quantity + 1, updated_at = clock_timestamp() WHERE id > 470")
    update = "manual__2026-05-01T12:00:00+00:00"
    gated = _run(gate(_run(extract, "orders_status", update)), "orders_status", update)
    updated = LoadStagedToPostgresOperator(task_id="load", manifest=gated, target_conn_id="status_target")
    assert _run(updated, "orders_status", update)["updated"] == 30
    # orders_status, run 3: 60 NULL customers, more than the 5% the gate may quarantine: the gate fails.
    with env.source() as conn:
        conn.execute("UPDATE orders SET customer = NULL, updated_at = clock_timestamp() WHERE id <= 60")
    second = "manual__2026-05-02T00:00:00+00:00"
    with pytest.raises(AirflowFailException, match="max_quarantine_fraction"):
        _run(gate(_run(extract, "orders_status", second)), "orders_status", second)
    # items_cdc: a CDC sync (snapshot, then changes).
    items = CdcSyncOperator(task_id="stream", sync_id="items_cdc", tables=["items"], **connections)
    _run(items, "items_cdc", "cdc-1")
    with env.source() as conn:
        conn.execute("UPDATE items SET qty = 0 WHERE id <= 25")
    _run(items, "items_cdc", "cdc-2")
    return {"load": load, "payroll": payroll}


def _token(url: str, user: str) -> str:
    response = requests.post(f"{url}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=10)
    response.raise_for_status()
    return str(response.json()["access_token"])


def _syncs_json(url: str, user: str) -> list[str]:
    response = requests.get(
        f"{url}/sync-status/api/syncs", headers={"Authorization": f"Bearer {_token(url, user)}"}, timeout=30
    )
    response.raise_for_status()
    return sorted(s["sync_id"] for target in response.json() for s in target["syncs"])


def _browser(chromium: tuple[str, str]) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(chromium[1]), options=options)


def _sign_in(driver: Any, url: str, user: str) -> None:
    """Through Airflow's own login page (SimpleAuthManager's form)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.delete_all_cookies()
    driver.get(f"{url}/sync-status/")  # signed out: sent to the login page, then back
    wait = WebDriverWait(driver, 30)
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(PASSWORDS[user])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: d.get_cookie("_token") is not None)


def test_sync_status_view_in_a_browser(
    chromium: tuple[str, str], api_server: ApiServer, synced: dict[str, Any], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    images = DOCS_IMAGES if os.environ.get("SYNC_UPDATE_SCREENSHOTS") == "1" else tmp_path
    screenshot, detail_screenshot = images / "sync-status.png", images / "sync-status-detail.png"
    url = api_server.wait_ready()
    # The JSON endpoint applies the same rules: per-DAG access decides which syncs a user sees.
    assert _syncs_json(url, "admin") == ["items_cdc", "orders", "payroll"]
    assert _syncs_json(url, "analyst") == ["orders"]
    assert _syncs_json(url, "outsider") == []
    # Signed out: the JSON API refuses, the pages send the browser to the login page.
    assert requests.get(f"{url}/sync-status/api/syncs", timeout=10).status_code == 401
    # The operators' extra links lead to their sync's page (and its quality section) for those who may see it.
    load, payroll = synced["load"], synced["payroll"]
    status_link, quality_link = (link.get_link(load, ti_key=None) for link in load.operator_extra_links)
    assert (status_link, quality_link) == (
        "/sync-status/syncs/status_target/public/orders",
        "/sync-status/syncs/status_target/public/orders#quality",
    )
    admin = {"Authorization": f"Bearer {_token(url, 'admin')}"}
    analyst = {"Authorization": f"Bearer {_token(url, 'analyst')}"}
    page = requests.get(f"{url}{status_link}", headers=admin, timeout=30)
    assert page.status_code == 200 and 'id="quality"' in page.text and "gate_failed" in page.text
    payroll_link = payroll.operator_extra_links[0].get_link(payroll, ti_key=None)
    assert requests.get(f"{url}{payroll_link}", headers=admin, timeout=30).status_code == 200
    assert requests.get(f"{url}{payroll_link}", headers=analyst, timeout=30).status_code == 404

    driver = _browser(chromium)
    try:
        wait = WebDriverWait(driver, 30)
        _sign_in(driver, url, "admin")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table.syncs")))
        rows = {r.get_attribute("data-sync-id"): r for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-sync-id]")}
        assert set(rows) == {"items_cdc", "orders", "payroll"}
        orders = rows["orders"].text
        assert "gate_failed" in orders and "expect_column_values_to_not_be_null(customer)" in orders
        assert rows["orders"].get_attribute("class") == "failed"
        assert "+498 ~30" in orders  # the newest day's rows
        payroll = rows["payroll"].text
        assert "applied" in payroll and "+40" in payroll and "(key 40)" in payroll
        items = rows["items_cdc"].text
        assert "LSN " in items and "lag " in items and "retains " in items and "cdc" in items

        # The detail page: watermark, counts, the failing rule, the chart, the history.
        rows["orders"].find_element(By.TAG_NAME, "a").click()
        wait.until(ec.presence_of_element_located((By.ID, "quality")))
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "orders" in page and "gate_failed" in page
        assert "expect_column_values_to_not_be_null(customer)" in page
        assert "expect_column_values_to_be_between(quantity)" in page  # run 1's quarantined rule is in the history
        assert driver.find_element(By.CSS_SELECTOR, ".quarantine").text == "2"
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart")) == 2
        assert (
            driver.find_elements(By.CSS_SELECTOR, "svg.chart rect title")[0]
            .get_attribute("textContent")
            .endswith("498 inserted")
        )
        history = driver.find_element(By.CSS_SELECTOR, "table.history").text
        assert history.count("manual__") >= 5 and "498 / 0 / 0" in history and "0 / 30 / 0" in history
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1300, 2000)
        driver.save_screenshot(str(detail_screenshot))
        driver.set_window_size(1500, 1100)

        # The view inside the Airflow UI (Browse -> Sync status), for the README.
        driver.get(f"{url}/plugin/sync-status")
        frame = wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        driver.switch_to.frame(frame)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr[data-sync-id=orders]")))
        driver.switch_to.default_content()
        time.sleep(1)  # let the UI's fonts and nav settle
        driver.save_screenshot(str(screenshot))
        assert detail_screenshot.stat().st_size > 20_000 and screenshot.stat().st_size > 20_000

        # A user without access to any of the DAGs sees none of their syncs, and not their pages either.
        _sign_in(driver, url, "outsider")
        wait.until(ec.presence_of_element_located((By.TAG_NAME, "h1")))
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "No syncs you may see in this target." in page
        assert not driver.find_elements(By.CSS_SELECTOR, "tr[data-sync-id]")
        for sync_id in ("orders", "payroll", "items_cdc"):
            assert sync_id not in page
        driver.get(f"{url}/sync-status/syncs/status_target/public/orders")
        assert "gate_failed" not in driver.page_source and "not_be_null" not in driver.page_source
    finally:
        driver.quit()
