"""REST APIs as sources, against our real HTTP server (sync_dev/api_server.py) and PostgreSQL.

Every pagination style and its loop guard; each retry path (429 and 503 honour Retry-After, 500
then success, a reset connection, a page failing after its retries fails the run with the URL
masked, the status, the attempts and the body, and commits nothing); auth kinds; incremental runs
(a late-published record caught thanks to ``lag``, missed without it; nothing new; the same run
twice); full mode with deletes; a backfill window that leaves the watermark alone; a record
changed between pages; a record that does not fit the declared type.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql

from airflow_sync_provider.core.api import (
    ApiAuth,
    ApiClient,
    ApiColumn,
    ApiRequestError,
    ApiSpec,
    ApiUnavailableError,
    CursorPaginator,
    LinkHeaderPaginator,
    NextLinkPaginator,
    OffsetPaginator,
    PageNumberPaginator,
    RetryPolicy,
    SinglePage,
    mask_url,
    retry_after_seconds,
    run_api_sync,
)
from airflow_sync_provider.core.api.records import to_table
from airflow_sync_provider.core.errors import DataError, SyncError
from airflow_sync_provider.core.load import LoadResult, load_manifest
from airflow_sync_provider.core.manifest import Manifest
from sync_dev.api_server import ApiAuthConfig, ApiServer, customer_records, http_date, iso

from ..conftest import SyncEnv

COLUMNS = (
    ApiColumn("id", "bigint"),
    ApiColumn("name", "text"),
    ApiColumn("segment", "text", required=False),
    ApiColumn("credit_limit", "bigint", required=False),
    ApiColumn("risk_score", "integer", required=False),
    ApiColumn("updated_at", "timestamptz"),
)
PAGE = 40
RECORDS = 250
FAST = RetryPolicy(attempts=4, backoff=0.05, timeout=5)

#: Style -> (records_path, paginator, extra params): how each style of our server is declared.
STYLES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "single": ("data", SinglePage(), {}),
    "next_link": ("data", NextLinkPaginator("next"), {"limit": PAGE}),
    "link_header": ("", LinkHeaderPaginator(), {"limit": PAGE}),
    "cursor": ("items", CursorPaginator("meta.next_cursor", "cursor"), {"limit": PAGE}),
    "offset": ("results", OffsetPaginator(limit=PAGE, total_path="total"), {}),
    "page_number": ("data", PageNumberPaginator(size=PAGE, total_pages_path="total_pages"), {}),
}


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer({"customers": customer_records(RECORDS)}) as server:
        yield server


def spec(style: str = "cursor", **options: Any) -> ApiSpec:
    path, paginator, params = STYLES[style]
    values: dict[str, Any] = {
        "sync_id": f"customers_{style}",
        "endpoint": f"/v1/{style}/customers",
        "target_table": "customers",
        "primary_key": ("id",),
        "records_path": path,
        "paginator": paginator,
        "params": params,
        "columns": COLUMNS,
        "cursor_field": "updated_at",
        "cursor_param": "updated_since",
        "cursor_end_param": "updated_before",
    }
    values.update(options)
    return ApiSpec(**values)


def sync(env: SyncEnv, api: ApiServer, the_spec: ApiSpec, client: ApiClient | None = None, **kw: Any) -> Any:
    client = client or ApiClient(api.url, retry=FAST)
    with env.target() as target:
        return run_api_sync(client, target, the_spec, staging=env.staging, **kw)


def target_rows(env: SyncEnv, table: str = "customers") -> dict[int, dict[str, Any]]:
    with env.target() as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
        if not exists or exists[0] is None:
            return {}
        names = [c.name for c in COLUMNS]
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, names)), sql.Identifier(table)
        )
        return {r[0]: dict(zip(names, r, strict=True)) for r in conn.execute(query)}


def served(api: ApiServer) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in api.records("customers")}


def assert_same(env: SyncEnv, api: ApiServer) -> None:
    rows, expected = target_rows(env), served(api)
    assert rows.keys() == expected.keys()
    for key, record in expected.items():
        row = rows[key]
        assert (row["name"], row["credit_limit"], row["risk_score"]) == (
            record["name"],
            record["credit_limit"],
            record["risk_score"],
        )
        assert iso(row["updated_at"]) == record["updated_at"]


def state(env: SyncEnv, sync_id: str) -> tuple[Any, ...] | None:
    return env.state(sync_id)


def staged_dirs(env: SyncEnv, sync_id: str) -> list[str]:
    folder = env.staging.base_uri.removeprefix("file://") + "/" + sync_id
    return os.listdir(folder) if os.path.isdir(folder) else []


# ---------------------------------------------------------------- pagination


@pytest.mark.parametrize("style", list(STYLES))
def test_every_pagination_style_reads_every_record_once(env: SyncEnv, api: ApiServer, style: str) -> None:
    manifest, result = sync(env, api, spec(style))
    assert result.status == "applied" and result.inserted == RECORDS
    assert_same(env, api)
    expected_pages = 1 if style == "single" else -(-RECORDS // PAGE)
    assert api.pages_served == expected_pages
    assert manifest.watermark_high == [
        {"$datetime": max(r["updated_at"] for r in api.records("customers"))[:-1] + "+00:00"}
    ]


def test_the_loop_guard_stops_a_cursor_that_repeats(env: SyncEnv, api: ApiServer) -> None:
    api.loop_cursor = True
    with pytest.raises(SyncError, match="pagination loop") as caught:
        sync(env, api, spec("cursor"))
    assert caught.value.rule == "pagination loop guard"
    assert api.pages_served == 2  # the first page, then the one whose next cursor repeats
    assert state(env, "customers_cursor") is None and target_rows(env) == {}
    assert staged_dirs(env, "customers_cursor") == []


def test_max_pages_fails_instead_of_stopping_early(env: SyncEnv, api: ApiServer) -> None:
    with pytest.raises(SyncError, match="max_pages=3") as caught:
        sync(env, api, spec("offset", max_pages=3))
    assert caught.value.rule == "max_pages"
    assert target_rows(env) == {}


# ---------------------------------------------------------------- retries


def test_429_waits_what_retry_after_says(env: SyncEnv, api: ApiServer) -> None:
    api.fail("status", status=429, retry_after="1", match="cursor=")
    client = ApiClient(api.url, retry=FAST)
    started = time.monotonic()
    _, result = sync(env, api, spec("cursor"), client)
    assert time.monotonic() - started >= 1.0
    assert client.waits == [(1.0, "HTTP 429, Retry-After")]
    assert result.inserted == RECORDS


def test_503_with_an_http_date_retry_after(env: SyncEnv, api: ApiServer) -> None:
    api.fail("status", status=503, retry_after=http_date(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)))
    client = ApiClient(api.url, retry=FAST)
    _, result = sync(env, api, spec("next_link"), client)
    ((seconds, why),) = client.waits
    assert why == "HTTP 503, Retry-After" and 0.0 < seconds <= 2.0
    assert result.inserted == RECORDS


def test_a_rate_limit_is_waited_out(env: SyncEnv, api: ApiServer) -> None:
    api.rate_limit = (4, 1.0)
    client = ApiClient(api.url, retry=FAST)
    _, result = sync(env, api, spec("page_number"), client)
    assert result.inserted == RECORDS
    assert client.waits and all(why == "HTTP 429, Retry-After" for _, why in client.waits)


def test_500s_then_success_back_off(env: SyncEnv, api: ApiServer) -> None:
    api.fail("status", status=500, times=2, match="offset=80")
    client = ApiClient(api.url, retry=FAST)
    _, result = sync(env, api, spec("offset"), client)
    assert [why for _, why in client.waits] == ["HTTP 500, backoff", "HTTP 500, backoff"]
    assert [s for s, _ in client.waits] == [0.05, 0.1]
    assert result.inserted == RECORDS
    assert_same(env, api)


def test_a_reset_connection_is_retried(env: SyncEnv, api: ApiServer) -> None:
    api.fail("reset", match="after=")
    client = ApiClient(api.url, retry=FAST)
    _, result = sync(env, api, spec("link_header"), client)
    assert len(client.waits) == 1 and "ConnectionError" in client.waits[0][1]
    assert result.inserted == RECORDS


def test_a_slow_page_is_only_slow(env: SyncEnv, api: ApiServer) -> None:
    api.fail("slow", seconds=0.5, match="cursor=")
    _, result = sync(env, api, spec("cursor"))
    assert result.inserted == RECORDS


def test_a_page_failing_after_its_retries_commits_nothing_and_says_where(env: SyncEnv, api: ApiServer) -> None:
    api.auth = ApiAuthConfig("query", "s3cret-key", name="api_key")
    api.fail("status", status=500, times=10, match="offset=80")
    client = ApiClient(
        api.url, auth=ApiAuth("api_key", token="s3cret-key", name="api_key", location="query"), retry=FAST
    )
    with pytest.raises(ApiUnavailableError) as caught:
        sync(env, api, spec("offset"), client)
    message = str(caught.value)
    assert "s3cret-key" not in message
    assert "/v1/offset/customers?" in message and "api_key=***" in message and "offset=80" in message
    assert "HTTP 500" in message and "after 4 attempt(s)" in message and "injected 500" in message
    assert "nothing was committed" in message
    assert caught.value.status == 500 and caught.value.attempts == 4
    assert state(env, "customers_offset") is None and target_rows(env) == {}
    assert staged_dirs(env, "customers_offset") == []
    assert not [t for t in threading.enumerate() if t.name.startswith("fetch ")]  # the fetch thread stopped


def test_a_4xx_is_not_retried(env: SyncEnv, api: ApiServer) -> None:
    api.auth = ApiAuthConfig("bearer", "right-token")
    client = ApiClient(api.url, auth=ApiAuth("bearer", token="wrong-token"), retry=FAST)
    with pytest.raises(ApiRequestError, match=r"HTTP 401 .* after 1 attempt") as caught:
        sync(env, api, spec("cursor"), client)
    assert client.waits == [] and "wrong-token" not in str(caught.value)


def test_too_long_a_retry_after_fails_at_once(env: SyncEnv, api: ApiServer) -> None:
    api.fail("status", status=429, retry_after="3600")
    with pytest.raises(ApiUnavailableError, match="retry after 3600 s, more than max_retry_after"):
        sync(env, api, spec("cursor"))


@pytest.mark.parametrize(
    ("server_auth", "client_auth"),
    [
        (ApiAuthConfig("bearer", "tok"), ApiAuth("bearer", token="tok")),
        (ApiAuthConfig("basic", "pw", user="bank"), ApiAuth("basic", username="bank", password="pw")),
        (ApiAuthConfig("header", "k1", name="X-API-Key"), ApiAuth("api_key", token="k1", name="X-API-Key")),
        (ApiAuthConfig("query", "k2", name="apikey"), ApiAuth("api_key", token="k2", name="apikey", location="query")),
    ],
    ids=["bearer", "basic", "api_key_header", "api_key_query"],
)
def test_auth_kinds(env: SyncEnv, api: ApiServer, server_auth: ApiAuthConfig, client_auth: ApiAuth) -> None:
    api.auth = server_auth
    _, result = sync(env, api, spec("next_link"), ApiClient(api.url, auth=client_auth, retry=FAST))
    assert result.inserted == RECORDS


def test_mask_url_and_retry_after_parsing() -> None:
    auth = ApiAuth("api_key", token="abc123", name="key", location="query")
    assert mask_url("https://u:pw@h/x?key=abc123&token=t&page=2", auth) == "https://h/x?key=***&token=***&page=2"
    assert retry_after_seconds("7") == 7.0
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert retry_after_seconds("Thu, 01 Jan 2026 00:00:05 GMT", now) == 5.0
    assert retry_after_seconds("garbage") is None


# ---------------------------------------------------------------- incremental


def fresh_records(now: dt.datetime, count: int = 30) -> list[dict[str, Any]]:
    """Records updated over the last ``count`` minutes, the newest one minute ago."""
    return [{**r, "updated_at": iso(now - dt.timedelta(minutes=count + 1 - r["id"]))} for r in customer_records(count)]


def test_a_late_record_is_caught_thanks_to_lag(env: SyncEnv, api: ApiServer) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    api.replace("customers", fresh_records(now))
    with_lag = spec("cursor", sync_id="with_lag", lag=dt.timedelta(minutes=5))
    without = spec("cursor", sync_id="without_lag", target_table="customers_no_lag")
    first, _ = sync(env, api, with_lag)
    sync(env, api, without)
    assert "held back by lag" in " ".join(first.notes)
    # published after the first runs, stamped 3 minutes ago (it was in flight)
    late = {**customer_records(31)[-1], "updated_at": iso(now - dt.timedelta(minutes=3))}
    api.upsert("customers", late)
    _, caught = sync(env, api, with_lag)
    _, missed = sync(env, api, without)
    assert 31 in target_rows(env) and caught.inserted == 1
    assert 31 not in target_rows(env, "customers_no_lag") and missed.inserted == 0


def test_nothing_new_and_the_same_run_twice(env: SyncEnv, api: ApiServer) -> None:
    the_spec = spec("cursor")
    manifest, first = sync(env, api, the_spec, keep_staged=True)
    again = sync(env, api, the_spec)[1]
    assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
    assert again.watermark == first.watermark and again.version == first.version + 1
    with env.target() as target:
        replay: LoadResult = load_manifest(target, manifest)
    assert replay.status == "stale"  # a newer run committed since: nothing applied twice
    api.touch("customers", 5, name="renamed")
    changed = sync(env, api, the_spec)[1]
    assert (changed.inserted, changed.updated) == (0, 1)
    assert target_rows(env)[5]["name"] == "renamed"


def test_a_retried_load_of_the_same_manifest_is_a_no_op(env: SyncEnv, api: ApiServer) -> None:
    manifest, _ = sync(env, api, spec("cursor"), keep_staged=True)
    with env.target() as target:
        again = load_manifest(target, Manifest.from_dict(manifest.to_json()))
    assert again.status == "already_applied" and len(target_rows(env)) == RECORDS


def test_lookback_re_reads_below_the_watermark(env: SyncEnv, api: ApiServer) -> None:
    the_spec = spec("cursor", lookback=dt.timedelta(seconds=10))
    sync(env, api, the_spec)
    manifest, result = sync(env, api, the_spec)
    assert manifest.rows == 11 and result.updated == 0  # re-read, unchanged
    assert any("lookback" in n for n in manifest.notes)


def test_a_record_changed_between_pages_is_kept_once_newest(env: SyncEnv, api: ApiServer) -> None:
    def change(collection: str, served: int) -> None:
        if served == 1:
            api.touch("customers", 3, name="changed mid-run")

    api.on_page = change
    manifest, result = sync(env, api, spec("cursor"))
    assert any("served twice" in n for n in manifest.notes)
    assert result.inserted == RECORDS and target_rows(env)[3]["name"] == "changed mid-run"


# ---------------------------------------------------------------- full mode, backfill, bad data


def test_full_mode_detects_deletes(env: SyncEnv, api: ApiServer) -> None:
    the_spec = spec("page_number", mode="full", cursor_param=None, cursor_end_param=None)
    sync(env, api, the_spec)
    api.delete("customers", 10, 20, 30)
    api.touch("customers", 40, risk_score=301)
    _, result = sync(env, api, the_spec)
    assert (result.deleted, result.updated) == (3, 1)
    assert_same(env, api)


def test_a_backfill_window_leaves_the_watermark(env: SyncEnv, api: ApiServer) -> None:
    the_spec = spec("next_link")
    sync(env, api, the_spec)
    before = state(env, the_spec.sync_id)
    records = served(api)
    # corrections published without moving updated_at (the bureau re-issued old records)
    api.upsert("customers", {**records[50], "risk_score": 999}, {**records[200], "risk_score": 999})
    start = dt.datetime(2026, 1, 1, 0, 0, 40, tzinfo=dt.UTC)
    manifest, result = sync(env, api, the_spec, window=(start, start + dt.timedelta(seconds=20)))
    assert result.status == "backfilled" and manifest.rows == 20 and result.updated == 1
    rows = target_rows(env)
    assert rows[50]["risk_score"] == 999 and rows[200]["risk_score"] != 999
    after = state(env, the_spec.sync_id)
    assert before is not None and after is not None and after[1] == before[1]


def test_a_record_that_does_not_fit_names_endpoint_field_key_and_rule(env: SyncEnv, api: ApiServer) -> None:
    api.upsert(
        "customers",
        {
            **customer_records(1)[0],
            "id": 999,
            "risk_score": "high",
            "updated_at": iso(dt.datetime(2026, 1, 1, 0, 3, tzinfo=dt.UTC)),
        },
    )
    with pytest.raises(DataError) as caught:
        sync(env, api, spec("cursor", params={"limit": 10}, batch_records=10))
    assert not [t for t in threading.enumerate() if t.name.startswith("fetch ")]  # stopped, pages left unread
    error = caught.value
    assert (error.table, error.column, error.key, error.rule) == (
        "api:/v1/cursor/customers",
        "risk_score",
        {"id": 999},
        "type integer",
    )
    assert target_rows(env) == {}


def test_an_inferred_schema_types_the_target(env: SyncEnv, api: ApiServer) -> None:
    sync(env, api, spec("cursor", columns=()))
    with env.target() as conn:
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'customers'"
            ).fetchall()
        )
    assert types["id"] == "bigint" and types["updated_at"] == "timestamp with time zone"
    assert types["name"] == "text" and types["credit_limit"] == "bigint"
    assert_same(env, api)


def test_the_manifest_is_small_json(env: SyncEnv, api: ApiServer) -> None:
    manifest, _ = sync(env, api, spec("cursor"))
    assert len(json.dumps(manifest.to_dict())) < 4000


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("risk_score", True, "type integer"),  # a JSON boolean is not an integer
        ("risk_score", 1.5, "type integer"),
        ("risk_score", 2**40, "type integer"),  # out of range
        ("name", "nul\x00inside", "type text"),  # PostgreSQL text cannot hold it
        ("name", None, "required"),
        ("updated_at", "yesterday", "type timestamptz"),
    ],
)
def test_typing_names_the_value_that_does_not_fit(field: str, value: Any, rule: str) -> None:
    good = customer_records(3)
    bad = {**good[1], field: value}
    with pytest.raises(DataError) as caught:
        to_table([good[0], bad, good[2]], COLUMNS, ("id",), where="api:/x")
    assert (caught.value.column, caught.value.key, caught.value.rule) == (field, {"id": 2}, rule)


def test_typing_takes_what_json_allows() -> None:
    records = [
        {"id": 1, "name": "a", "credit_limit": None, "risk_score": 7.0, "updated_at": "2026-01-01T00:00:00"},
        {"id": 2, "name": "b", "credit_limit": 5, "risk_score": 8, "updated_at": "2026-01-01T02:00:00+02:00"},
    ]
    table = to_table(records, COLUMNS, ("id",), where="api:/x")
    assert table.column("risk_score").to_pylist() == [7, 8]
    moments = table.column("updated_at").to_pylist()
    assert moments[0] == moments[1] == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_history_and_ledger_work_as_for_tables(env: SyncEnv, api: ApiServer) -> None:
    the_spec = spec("cursor", history_table="customers_history")
    sync(env, api, the_spec)
    api.touch("customers", 9, risk_score=333)
    sync(env, api, the_spec)
    with env.target() as conn:
        versions = conn.execute(
            "SELECT risk_score, _valid_to IS NULL FROM customers_history WHERE id = 9 ORDER BY _valid_from"
        ).fetchall()
        ledger = conn.execute(
            "SELECT source_table, status, rows_staged FROM _sync_audit WHERE sync_id = %s ORDER BY entry_id",
            (the_spec.sync_id,),
        ).fetchall()
    assert [v[1] for v in versions] == [False, True] and versions[-1][0] == 333
    assert [(s, st) for s, st, _ in ledger] == [("api:/v1/cursor/customers", "applied")] * 2


def test_bounded_batches_and_a_key_served_twice_across_files(env: SyncEnv, api: ApiServer) -> None:
    def change(collection: str, served: int) -> None:
        if served == 1:
            api.touch("customers", 3, name="changed mid-run")

    api.on_page = change
    manifest, result = sync(env, api, spec("cursor", batch_records=60), keep_staged=True)
    assert [f.rows for f in manifest.files] == [79, 80, 80, 11]  # 80 per file, the first lost key 3's old version
    assert manifest.rows == RECORDS and result.inserted == RECORDS
    assert target_rows(env)[3]["name"] == "changed mid-run"
