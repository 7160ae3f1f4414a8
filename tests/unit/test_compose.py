"""docker-compose.yaml, checked by parsing (no Docker engine runs here): the Airflow 3 CeleryExecutor
services with two workers, staging on S3 (MinIO) through an Airflow connection, the provider built
into every Airflow container, dags/ mounted, the case-study databases with wal_level=logical, and
the connections the DAGs use pre-registered.  tests/cluster runs the same shape for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from airflow_sync_provider.core.staging import StagingArea, names_connection
from case_studies.databases import ALL_SYSTEMS

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker-1",
    "airflow-worker-2",
    "airflow-triggerer",
    "airflow-init",
)


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def test_airflow_services_run_celery_with_redis_and_postgres_metadata() -> None:
    services = _compose()["services"]
    assert set(AIRFLOW_SERVICES) | {"postgres", "redis", "casestudy-db"} <= set(services)
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        assert "@postgres/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080"), name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"], name
    commands = {name: services[name].get("command") for name in AIRFLOW_SERVICES[:-1]}
    assert commands == {
        "airflow-apiserver": "api-server",
        "airflow-scheduler": "scheduler",
        "airflow-dag-processor": "dag-processor",
        "airflow-worker-1": "celery worker",
        "airflow-worker-2": "celery worker",
        "airflow-triggerer": "triggerer",
    }
    assert services["airflow-worker-1"]["hostname"] != services["airflow-worker-2"]["hostname"]


def test_staging_is_a_bucket_behind_an_airflow_connection_not_a_shared_disk() -> None:
    compose = _compose()
    services = compose["services"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        uri = env["AIRFLOW__SYNC__STAGING_URI"]
        conn_id = names_connection(uri)
        assert conn_id and not StagingArea(uri).is_local, name
        connection = json.loads(env[f"AIRFLOW_CONN_{conn_id.upper()}"])
        assert connection["conn_type"] == "aws", name
        endpoint = connection["extra"]["endpoint_url"]
        assert endpoint.startswith("http://minio:"), name
        assert not any("staging" in volume for volume in services[name].get("volumes", [])), name
    bucket = uri.split("@", 1)[1].split("/", 1)[0]
    assert f"local/{bucket}" in services["minio-init"]["command"][-1]  # the bucket is created up front
    assert services["airflow-apiserver"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "[mysql,s3]" in (REPO / "Dockerfile").read_text()  # the s3 extra: amazon provider with s3fs


def test_every_airflow_container_has_the_provider_and_the_dags() -> None:
    services = _compose()["services"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.startswith("# ") and "FROM apache/airflow:3." in dockerfile
    assert 'pip install --no-cache-dir "/opt/airflow-sync-provider' in dockerfile
    for name in AIRFLOW_SERVICES:
        service = services[name]
        assert service["build"] == "." and service["image"] == "airflow-sync-provider:local", name
        assert "./dags:/opt/airflow/dags:ro" in service["volumes"], name
    assert "airflow providers list | grep airflow-sync-provider" in services["airflow-init"]["command"][-1]
    # the image gets the provider only; the DAGs' helper package comes with the dags/ mount
    assert (REPO / "dags" / "case_studies" / "__init__.py").is_file()
    assert "case_studies" not in dockerfile


def test_case_study_databases_have_logical_wal_and_registered_connections() -> None:
    compose = _compose()
    db = compose["services"]["casestudy-db"]
    command = " ".join(db["command"])
    assert "wal_level=logical" in command and "max_replication_slots=" in command
    init_sql = next(v for v in db["volumes"] if "docker-entrypoint-initdb.d" in v).split(":")[0]
    databases = {
        line.split()[2].rstrip(";")
        for line in (REPO / init_sql).read_text().splitlines()
        if line.startswith("CREATE DATABASE")
    }
    env = compose["services"]["airflow-worker-1"]["environment"]
    connections = {
        k.removeprefix("AIRFLOW_CONN_").lower(): v
        for k, v in env.items()
        if k.startswith("AIRFLOW_CONN_") and k != "AIRFLOW_CONN_SYNC_STAGING"
    }
    assert set(connections) == databases == set(ALL_SYSTEMS)  # every system the case-study DAGs use
    assert env["AIRFLOW_VAR_SYNC_TOKEN_KEY"]  # the bank DAG's tokenisation secret
    for conn_id, uri in connections.items():
        assert uri == f"postgres://sync:sync@casestudy-db:5432/{conn_id}"
