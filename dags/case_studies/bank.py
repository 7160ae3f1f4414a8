"""Case study 2: a bank's customer master synced to loan management, credit scoring and fraud detection.

Source ``core_banking``: ``customers`` (the master), ``accounts`` and ``loans``.  Each target gets
what it needs, in its own schema, and nothing more:

* ``loan_management`` (schema ``lending``): customers in full (contracts need the national id),
  plus an **SCD type 2 history** of every customer record for audit; and the loans, which must
  point to existing customers (a referential-integrity gate before their load).
* ``credit_scoring`` (schema ``scoring``): no names, e-mail, phone or city; the national id as a
  keyed **token**; the birth date reduced to the **year**; and the accounts.
* ``fraud_detection`` (schema ``fraud``): contact data and the full birth date (used for matching),
  the national id as the same token (so two records of one person match without the id itself).

Every customer batch passes a Great Expectations gate on formats (e-mail, ISO country codes,
dates, tokens), uniqueness of customer ids and the exact column set (a column with personal data
that a target must not get fails the gate before anything is loaded); every run reconciles each
target with the master and leaves one audit-ledger entry per sync.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from psycopg import sql

from airflow_sync_provider.core.masking import TOKEN_PATTERN, drop, masking_transform, tokenize, year_only
from case_studies.databases import connect, copy_rows

SOURCE = "core_banking"
#: target conn id -> schema
TARGET_SCHEMAS: Mapping[str, str] = {
    "loan_management": "lending",
    "credit_scoring": "scoring",
    "fraud_detection": "fraud",
}
HISTORY_TABLE = "customers_history"

CUSTOMER_COLUMNS = (
    "customer_id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "national_id",
    "birth_date",
    "country",
    "city",
    "segment",
    "kyc_status",
    "updated_at",
)
#: The columns each target receives as the master holds them (what reconciliation compares).
PASSTHROUGH: Mapping[str, tuple[str, ...]] = {
    "loan_management": CUSTOMER_COLUMNS,
    "credit_scoring": ("customer_id", "country", "segment", "kyc_status", "updated_at"),
    "fraud_detection": ("customer_id", "email", "phone", "birth_date", "country", "city", "updated_at"),
}
#: The exact column set each target's customer batch must have after masking.
TARGET_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "loan_management": CUSTOMER_COLUMNS,
    "credit_scoring": (*PASSTHROUGH["credit_scoring"], "national_id_token", "birth_year"),
    "fraud_detection": (*PASSTHROUGH["fraud_detection"], "national_id_token"),
}

COUNTRIES = ("DE", "FR", "NL", "BE", "AT", "CH", "IT", "ES", "PT", "PL", "SE", "DK", "IE", "GB", "US", "CA")
#: ISO 3166-1 alpha-2 codes the gate accepts (the bank's markets and their neighbours).
ISO_COUNTRIES = sorted(
    {*COUNTRIES, "LU", "NO", "FI", "CZ", "SK", "HU", "SI", "HR", "RO", "BG", "GR", "LT", "LV", "EE", "MT", "CY"}
)
SEGMENTS = ("retail", "premium", "private", "sme")
CITIES = ("Berlin", "Paris", "Amsterdam", "Brussels", "Vienna", "Zurich", "Milan", "Madrid", "Lisbon", "Warsaw")
FIRST = ("Anna", "Ben", "Chloé", "David", "Eva", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Zoë", "Łukasz")
LAST = ("Müller", "Martin", "de Vries", "Peeters", "Gruber", "Rossi", "García", "Silva", "Nowak", "O'Brien")
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$"


def _create_source(uri: str) -> None:
    with connect(uri) as conn:
        conn.execute(
            "CREATE TABLE customers (customer_id bigint PRIMARY KEY, first_name text NOT NULL, "
            "last_name text NOT NULL, email text, phone text, national_id text NOT NULL UNIQUE, "
            "birth_date date NOT NULL, "
            "country char(2) NOT NULL, city text, segment text NOT NULL, kyc_status text NOT NULL, "
            "updated_at timestamptz NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE accounts (account_id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers, "
            "kind text NOT NULL, currency char(3) NOT NULL, balance numeric(14,2) NOT NULL, status text NOT NULL, "
            "opened_on date NOT NULL, updated_at timestamptz NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE loans (loan_id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers, "
            "principal numeric(14,2) NOT NULL, rate numeric(5,3) NOT NULL, term_months int NOT NULL, "
            "status text NOT NULL, updated_at timestamptz NOT NULL)"
        )
        for table, key in (("customers", "customer_id"), ("accounts", "account_id"), ("loans", "loan_id")):
            conn.execute(
                sql.SQL("CREATE INDEX ON {} (updated_at, {})").format(sql.Identifier(table), sql.Identifier(key))
            )


# --------------------------------------------------------------------------- masking per target


def masking_for(target: str, key: str) -> Callable[[pd.DataFrame], pd.DataFrame] | None:
    """The batch transform that prepares customer rows for ``target`` (None: the target gets all).

    ``key`` is the tokenisation secret (an Airflow Variable in the DAG); the same key everywhere
    gives the same token for the same national id.
    """
    if target == "credit_scoring":
        return masking_transform(
            {
                "national_id": ("national_id_token", tokenize(key)),
                "birth_date": ("birth_year", year_only),
                **dict.fromkeys(("first_name", "last_name", "email", "phone", "city"), drop),
            }
        )
    if target == "fraud_detection":
        return masking_transform(
            {
                "national_id": ("national_id_token", tokenize(key)),
                **dict.fromkeys(("first_name", "last_name", "segment", "kyc_status"), drop),
            }
        )
    return None


def customer_expectations(target: str) -> list[dict[str, Any]]:
    """The gate on one target's customer batch (plain dicts: nothing of GX is imported to parse a DAG)."""
    columns = TARGET_COLUMNS[target]
    checks: list[dict[str, Any]] = [
        {"type": "expect_table_columns_to_match_set", "kwargs": {"column_set": list(columns), "exact_match": True}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "customer_id"}},
        {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "customer_id"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "country", "value_set": ISO_COUNTRIES}},
    ]
    if "email" in columns:
        checks.append(
            {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "email", "regex": EMAIL_PATTERN}}
        )
    if "birth_date" in columns:
        checks.append(
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "birth_date", "min_value": "1900-01-01", "max_value": "2010-12-31"},
            }
        )
    if "birth_year" in columns:
        checks.append(
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "birth_year", "min_value": 1900, "max_value": 2010},
            }
        )
    if "national_id_token" in columns:
        checks.append(
            {
                "type": "expect_column_values_to_match_regex",
                "kwargs": {"column": "national_id_token", "regex": TOKEN_PATTERN},
            }
        )
    return checks


LOAN_EXPECTATIONS: list[dict[str, Any]] = [
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "loan_id"}},
    {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "customer_id"}},
    {
        "type": "expect_column_values_to_be_between",
        "kwargs": {"column": "principal", "min_value": 0, "strict_min": True},
    },
    {
        "type": "expect_column_values_to_be_in_set",
        "kwargs": {"column": "status", "value_set": ["active", "repaid", "default"]},
    },
]


# --------------------------------------------------------------------------- data


def _customer(rng: random.Random, customer_id: int, now: dt.datetime) -> tuple[Any, ...]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    email = f"{first.lower()}.{last.lower().replace(' ', '').replace(chr(39), '')}{customer_id}@mail.example"
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 65))
    return (
        customer_id,
        first,
        last,
        email,
        f"+49 30 {rng.randint(1000000, 9999999)}",
        f"ID{customer_id:09d}{rng.randint(10, 99)}",
        birth,
        rng.choice(COUNTRIES),
        rng.choice(CITIES),
        rng.choice(SEGMENTS),
        "verified",
        now,
    )


def seed(uri: str, scale: int = 300, seed_value: int = 11, start: dt.datetime | None = None) -> dict[str, int]:
    """Create and fill ``core_banking``: ``scale`` customers with accounts and loans.

    Deterministic for a given ``seed_value``; ``updated_at`` spreads over the 30 days before
    ``start`` (default: now), so backfills over past windows have something to re-sync.
    """
    rng = random.Random(seed_value)
    _create_source(uri)
    start = start or dt.datetime.now(dt.UTC)
    customers: list[tuple[Any, ...]] = []
    accounts: list[tuple[Any, ...]] = []
    loans: list[tuple[Any, ...]] = []
    for customer_id in range(1, scale + 1):
        stamp = start - dt.timedelta(days=30) + dt.timedelta(seconds=rng.randint(0, 29 * 86400))
        customers.append(_customer(rng, customer_id, stamp))
        for _ in range(rng.randint(1, 3)):
            accounts.append(
                (
                    len(accounts) + 1,
                    customer_id,
                    rng.choice(("current", "savings", "card")),
                    rng.choice(("EUR", "EUR", "USD", "CHF")),
                    round(rng.uniform(-500, 50_000), 2),
                    "open",
                    stamp.date(),
                    stamp,
                )
            )
        if rng.random() < 0.4:
            loans.append(
                (
                    len(loans) + 1,
                    customer_id,
                    round(rng.uniform(1_000, 250_000), 2),
                    round(rng.uniform(1.5, 9.5), 3),
                    rng.choice((12, 24, 60, 120, 240)),
                    "active",
                    stamp,
                )
            )
    with connect(uri) as conn:
        copy_rows(conn, "customers", CUSTOMER_COLUMNS, customers)
        copy_rows(
            conn,
            "accounts",
            ("account_id", "customer_id", "kind", "currency", "balance", "status", "opened_on", "updated_at"),
            accounts,
        )
        copy_rows(
            conn, "loans", ("loan_id", "customer_id", "principal", "rate", "term_months", "status", "updated_at"), loans
        )
    return {"customers": len(customers), "accounts": len(accounts), "loans": len(loans)}


@dataclass
class BankRound:
    updated: int = 0
    new_customers: int = 0
    erased: int = 0
    balances: int = 0
    new_loans: int = 0
    repaid: int = 0


def simulate_round(uri: str, round_no: int = 1, seed_value: int = 11) -> BankRound:
    """A day at the bank: profile changes, new customers, balance moves, loans, one erasure request."""
    rng = random.Random(seed_value * 1000 + round_no)
    summary = BankRound()
    with connect(uri) as conn:
        ids = [r[0] for r in conn.execute("SELECT customer_id FROM customers ORDER BY customer_id")]
        count = max(len(ids) // 20, 3)
        for customer_id in rng.sample(ids, count):
            conn.execute(
                "UPDATE customers SET city = %s, segment = %s, email = replace(email, '@mail.', '@post.'), "
                "updated_at = now() WHERE customer_id = %s",
                (rng.choice(CITIES), rng.choice(SEGMENTS), customer_id),
            )
            summary.updated += 1
        next_id = (max(ids) if ids else 0) + 1
        new = [_customer(rng, next_id + n, dt.datetime.now(dt.UTC)) for n in range(max(count // 2, 1))]
        copy_rows(conn, "customers", CUSTOMER_COLUMNS, new)
        conn.execute("UPDATE customers SET updated_at = now() WHERE customer_id >= %s", (next_id,))
        summary.new_customers = len(new)
        summary.balances = conn.execute(
            "UPDATE accounts SET balance = balance + (hashtext(account_id::text || %s) %% 1000), updated_at = now() "
            "WHERE account_id %% 17 = %s",
            (str(round_no), round_no % 17),
        ).rowcount
        for customer in new[: max(len(new) // 2, 1)]:
            conn.execute(
                "INSERT INTO loans SELECT coalesce(max(loan_id), 0) + 1, %s, %s, 4.2, 60, 'active', now() FROM loans",
                (customer[0], round(rng.uniform(5_000, 90_000), 2)),
            )
            summary.new_loans += 1
        summary.repaid = conn.execute(
            "UPDATE loans SET status = 'repaid', updated_at = now() WHERE loan_id IN ("
            "SELECT loan_id FROM loans WHERE status = 'active' ORDER BY md5(loan_id::text || %s) LIMIT 2)",
            (str(round_no),),
        ).rowcount
        erased = rng.choice(ids)  # right to erasure: the customer and their products go everywhere
        with conn.transaction():
            conn.execute("DELETE FROM loans WHERE customer_id = %s", (erased,))
            conn.execute("DELETE FROM accounts WHERE customer_id = %s", (erased,))
            summary.erased = conn.execute("DELETE FROM customers WHERE customer_id = %s", (erased,)).rowcount
    return summary


# --------------------------------------------------------------------------- checks


def masked_master(uri: str, target: str, key: str) -> pd.DataFrame:
    """The master's customers as ``target`` must hold them (after masking), ordered by id."""
    with connect(uri) as conn:
        cursor = conn.execute(
            sql.SQL("SELECT {} FROM customers ORDER BY customer_id").format(
                sql.SQL(", ").join(map(sql.Identifier, CUSTOMER_COLUMNS))
            )
        )
        frame = pd.DataFrame(cursor.fetchall(), columns=list(CUSTOMER_COLUMNS))
    transform = masking_for(target, key)
    return transform(frame) if transform is not None else frame


def _frame(conn: Any, query: sql.Composable, columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame(conn.execute(query).fetchall(), columns=list(columns))


def customers_match_master(uris: Mapping[str, str], key: str) -> dict[str, tuple[int, int]]:
    """Per target: (rows in the target, rows that differ from the master after masking); 0 = equal."""
    outcome = {}
    for target, schema in TARGET_SCHEMAS.items():
        expected = masked_master(uris[SOURCE], target, key)
        columns = tuple(expected.columns)
        with connect(uris[target]) as conn:
            actual = _frame(
                conn,
                sql.SQL("SELECT {} FROM {} ORDER BY customer_id").format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, "customers")
                ),
                columns,
            )
        left = expected.reset_index(drop=True).astype(str)
        right = actual.reset_index(drop=True).astype(str)
        if len(left) != len(right):
            outcome[target] = (len(actual), abs(len(left) - len(right)) + len(left))
            continue
        outcome[target] = (len(actual), int((left != right).any(axis=1).sum()))
    return outcome


@dataclass(frozen=True)
class HistorySummary:
    versions: int
    current: int
    customers_with_current: int
    customers_in_target: int
    closed_by_delete: int

    @property
    def one_current_per_customer(self) -> bool:
        return self.current == self.customers_with_current == self.customers_in_target


def history_summary(uri: str) -> HistorySummary:
    with connect(uri) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE _is_current), "
            "count(DISTINCT customer_id) FILTER (WHERE _is_current), (SELECT count(*) FROM lending.customers), "
            "count(*) FILTER (WHERE _sync_deleted) "
            "FROM lending.customers_history"
        ).fetchone()
    assert row is not None
    return HistorySummary(*(int(v) for v in row))


def tokens_consistent(uris: Mapping[str, str]) -> tuple[int, int]:
    """(customers in both credit scoring and fraud detection, of them with the same token)."""
    tokens = []
    for target in ("credit_scoring", "fraud_detection"):
        with connect(uris[target]) as conn:
            rows = conn.execute(
                sql.SQL("SELECT customer_id, national_id_token FROM {}").format(
                    sql.Identifier(TARGET_SCHEMAS[target], "customers")
                )
            )
            tokens.append(dict(rows.fetchall()))
    both = set(tokens[0]) & set(tokens[1])
    return len(both), sum(tokens[0][k] == tokens[1][k] for k in both)


def ledger(uris: Mapping[str, str]) -> dict[str, list[tuple[str, str, int]]]:
    """Audit-ledger entries per sync id over the targets: (mode, status, rows staged), oldest first."""
    entries: dict[str, list[tuple[str, str, int]]] = {}
    for target, schema in TARGET_SCHEMAS.items():
        with connect(uris[target]) as conn:
            rows = conn.execute(
                sql.SQL("SELECT sync_id, mode, status, rows_staged FROM {} ORDER BY entry_id").format(
                    sql.Identifier(schema, "_sync_audit")
                )
            )
            for sync_id, mode, status, staged in rows:
                entries.setdefault(sync_id, []).append((mode, status, int(staged)))
    return entries


def last_reconciliations(uris: Mapping[str, str]) -> dict[str, tuple[int, int, int, int]]:
    """Per sync id, the last reconciliation: (target rows, missing, extra, different)."""
    found = {}
    for target, schema in TARGET_SCHEMAS.items():
        with connect(uris[target]) as conn:
            rows = conn.execute(
                sql.SQL(
                    "SELECT DISTINCT ON (sync_id) sync_id, target_count, missing_in_target, extra_in_target, different "
                    "FROM {} ORDER BY sync_id, reconciliation_id DESC"
                ).format(sql.Identifier(schema, "_sync_reconciliations"))
            )
            for sync_id, *counts in rows:
                found[sync_id] = tuple(int(c) for c in counts)
    return found  # type: ignore[return-value]


def gate_results(uris: Mapping[str, str]) -> list[tuple[str, bool, int]]:
    """Every quality-gate result recorded in the targets: (sync id, passed, rows)."""
    results: list[tuple[str, bool, int]] = []
    for target, schema in TARGET_SCHEMAS.items():
        with connect(uris[target]) as conn:
            rows = conn.execute(
                sql.SQL("SELECT sync_id, success, rows FROM {} ORDER BY result_id").format(
                    sql.Identifier(schema, "_sync_quality_results")
                )
            )
            results.extend((sync_id, bool(ok), int(n)) for sync_id, ok, n in rows)
    return results


# --------------------------------------------------------------------------- credit bureau (REST API)
#
# The bank buys credit reports from a bureau reachable only over its REST API (bearer token,
# cursor pagination, rate limited, publishing some reports late).  ``bank_credit_bureau_sync``
# syncs them into credit scoring (``scoring.bureau_reports``), through a quality gate that
# quarantines impossible scores, and credit scoring decides on them with the bank's own data.

BUREAU_CONN = "credit_bureau"
BUREAU_TARGET = "credit_scoring"
BUREAU_TABLE = "bureau_reports"
#: The collection our local API server (sync_dev/api_server.py) serves the reports from.
BUREAU_COLLECTION = "bureau_reports"
BUREAU_ENDPOINT = f"/v1/cursor/{BUREAU_COLLECTION}"
#: The bureau publishes a report up to this long after its ``updated_at``.
BUREAU_LAG = dt.timedelta(minutes=15)
#: Declared fields of a report (``path``: where the field is in the bureau's JSON).
BUREAU_COLUMNS: tuple[dict[str, Any], ...] = (
    {"name": "customer_id", "type": "bigint"},
    {"name": "report_id", "type": "text"},
    {"name": "bureau_score", "type": "integer", "path": "score.value"},
    {"name": "score_model", "type": "text", "path": "score.model"},
    {"name": "defaults_24m", "type": "integer"},
    {"name": "open_credit_lines", "type": "integer"},
    {"name": "inquiries_90d", "type": "integer"},
    {"name": "flags", "type": "jsonb", "required": False},
    {"name": "updated_at", "type": "timestamptz"},
)
#: The gate on a batch of reports: scores on the bureau's scale (others are quarantined).
BUREAU_EXPECTATIONS: list[dict[str, Any]] = [
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "customer_id"}},
    {
        "type": "expect_column_values_to_be_between",
        "kwargs": {"column": "bureau_score", "min_value": 300, "max_value": 850},
    },
    {"type": "expect_column_values_to_be_between", "kwargs": {"column": "defaults_24m", "min_value": 0}},
]


def bureau_report(customer_id: int, updated_at: dt.datetime, rng: random.Random) -> dict[str, Any]:
    """One report as the bureau's API serves it (nested score, flags as a JSON list)."""
    defaults = rng.choice((0, 0, 0, 0, 1, 2))
    flags = [f for f, p in (("thin_file", 0.1), ("address_mismatch", 0.05)) if rng.random() < p]
    return {
        "customer_id": customer_id,
        "report_id": f"BR-{customer_id:07d}-{int(updated_at.timestamp())}",
        "score": {"value": rng.randint(420, 820) - 60 * defaults, "model": "bureau-v4"},
        "defaults_24m": defaults,
        "open_credit_lines": rng.randint(0, 12),
        "inquiries_90d": rng.randint(0, 6),
        "flags": flags,
        "updated_at": updated_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
    }


def bureau_reports(
    customer_ids: range | list[int], now: dt.datetime, seed_value: int = 11, bad_every: int = 97
) -> list[dict[str, Any]]:
    """One report per customer, updated over the 30 days before ``now``; every ``bad_every``-th has
    an impossible score of 0 (the gate quarantines it)."""
    rng = random.Random(seed_value)
    reports = []
    for customer_id in customer_ids:
        stamp = now - dt.timedelta(days=30) + dt.timedelta(seconds=rng.randint(0, 29 * 86400))
        report = bureau_report(customer_id, stamp, rng)
        if bad_every and customer_id % bad_every == 0:
            report["score"]["value"] = 0
        reports.append(report)
    return reports


def credit_decisions(uri: str) -> dict[str, int]:
    """What credit scoring decides from its customers and the bureau's reports: approve (score >=
    680, no default), refer (580-679 or one default), decline (else), or no report yet."""
    with connect(uri) as conn:
        rows = conn.execute(
            "SELECT CASE WHEN b.customer_id IS NULL THEN 'no_report' "
            "WHEN b.bureau_score >= 680 AND b.defaults_24m = 0 THEN 'approve' "
            "WHEN b.bureau_score >= 580 AND b.defaults_24m <= 1 THEN 'refer' ELSE 'decline' END, count(*) "
            "FROM scoring.customers c LEFT JOIN scoring.bureau_reports b USING (customer_id) GROUP BY 1 ORDER BY 1"
        ).fetchall()
    return {str(kind): int(n) for kind, n in rows}


def bureau_matches(uri: str, served: list[dict[str, Any]]) -> tuple[int, int]:
    """(reports served with a valid score, how many of them credit scoring holds exactly)."""
    valid = {r["customer_id"]: r for r in served if 300 <= r["score"]["value"] <= 850}
    with connect(uri) as conn:
        held = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT customer_id, report_id, bureau_score, defaults_24m, updated_at FROM scoring.bureau_reports"
            )
        }
    same = sum(
        1
        for key, r in valid.items()
        if held.get(key)
        == (
            r["report_id"],
            r["score"]["value"],
            r["defaults_24m"],
            dt.datetime.fromisoformat(r["updated_at"].replace("Z", "+00:00")),
        )
    )
    return len(valid), same


__all__ = [
    "BUREAU_COLLECTION",
    "BUREAU_COLUMNS",
    "BUREAU_CONN",
    "BUREAU_ENDPOINT",
    "BUREAU_EXPECTATIONS",
    "BUREAU_LAG",
    "BUREAU_TABLE",
    "BUREAU_TARGET",
    "HISTORY_TABLE",
    "LOAN_EXPECTATIONS",
    "PASSTHROUGH",
    "SOURCE",
    "TARGET_COLUMNS",
    "TARGET_SCHEMAS",
    "HistorySummary",
    "bureau_matches",
    "bureau_report",
    "bureau_reports",
    "credit_decisions",
    "customer_expectations",
    "customers_match_master",
    "gate_results",
    "history_summary",
    "last_reconciliations",
    "ledger",
    "masked_master",
    "masking_for",
    "seed",
    "simulate_round",
    "tokens_consistent",
]
