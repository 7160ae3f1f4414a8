"""Data for the two case studies: seed the source systems, or simulate a round of business.

Trigger it from the UI ("Trigger DAG w/ config") before the first runs of ``inventory_sync`` and
``bank_customer_sync``, and again with ``action=changes`` to produce a realistic round of inserts,
updates and deletes at every source (stock movements, orders, profile changes, an erasure request).
The generators are deterministic: the same ``seed`` gives the same data; ``skus``/``customers``
scale it from a demo to a benchmark.  It writes only to the source systems.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from airflow.sdk import DAG, BaseHook, Param, task

from case_studies.databases import BANK_SOURCE, INVENTORY_SOURCES

log = logging.getLogger(__name__)

with DAG(
    dag_id="case_study_data",
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["case-study", "data"],
    doc_md=__doc__,
    params={
        "action": Param("seed", enum=["seed", "changes"], description="seed the sources, or simulate a round"),
        "skus": Param(500, type="integer", minimum=1, description="inventory: SKUs"),
        "customers": Param(300, type="integer", minimum=1, description="bank: customers"),
        "round": Param(1, type="integer", minimum=1, description="changes: round number (deterministic)"),
        "seed": Param(7, type="integer", description="random seed"),
    },
):

    def _uri(conn_id: str) -> str:
        return BaseHook.get_connection(conn_id).get_uri()

    @task
    def inventory_sources(**context: Any) -> dict[str, Any]:
        from case_studies import inventory
        from case_studies.databases import is_seeded

        params = context["params"]
        uris = {conn_id: _uri(conn_id) for conn_id in INVENTORY_SOURCES}
        if params["action"] == "seed":
            if is_seeded(uris["warehouse_a"], "public.stock"):
                log.info("inventory sources are already seeded; nothing to do")
                return {}
            return inventory.seed(uris, params["skus"], params["seed"])
        return inventory.simulate_round(uris, params["round"], params["skus"], params["seed"]).counts

    @task
    def bank_source(**context: Any) -> dict[str, Any]:
        from case_studies import bank
        from case_studies.databases import is_seeded

        params = context["params"]
        uri = _uri(BANK_SOURCE)
        if params["action"] == "seed":
            if is_seeded(uri, "public.customers"):
                log.info("core_banking is already seeded; nothing to do")
                return {}
            return bank.seed(uri, params["customers"], params["seed"])
        return vars(bank.simulate_round(uri, params["round"], params["seed"]))

    inventory_sources()
    bank_source()
