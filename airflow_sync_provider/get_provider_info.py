"""Provider metadata, read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-sync-provider",
        "name": "Database Sync",
        "description": "Exactly-once incremental and change-data-capture sync from SQLAlchemy sources into PostgreSQL.",
        "versions": ["0.1.0"],
        "integrations": [
            {
                "integration-name": "Database Sync",
                "external-doc-url": "https://github.com/airflow-sync-provider/airflow-sync-provider",
                "tags": ["software"],
            }
        ],
        "hooks": [
            {
                "integration-name": "Database Sync",
                "python-modules": [
                    "airflow_sync_provider.hooks.source",
                    "airflow_sync_provider.hooks.target",
                    "airflow_sync_provider.hooks.cdc",
                    "airflow_sync_provider.hooks.events",
                    "airflow_sync_provider.hooks.api",
                ],
            }
        ],
        "operators": [
            {
                "integration-name": "Database Sync",
                "python-modules": [
                    "airflow_sync_provider.operators.sync",
                    "airflow_sync_provider.operators.cdc",
                    "airflow_sync_provider.operators.reconcile",
                    "airflow_sync_provider.operators.quality",
                    "airflow_sync_provider.operators.events",
                    "airflow_sync_provider.operators.health",
                    "airflow_sync_provider.operators.api",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": "Database Sync",
                "python-modules": ["airflow_sync_provider.sensors.cdc"],
            }
        ],
        "triggers": [
            {
                "integration-name": "Database Sync",
                "python-modules": ["airflow_sync_provider.triggers.cdc", "airflow_sync_provider.triggers.events"],
            }
        ],
        "notifications": ["airflow_sync_provider.notifications.sync_alert.SyncAlertNotifier"],
        "extra-links": [
            "airflow_sync_provider.plugins.links.SyncStatusLink",
            "airflow_sync_provider.plugins.links.QualityReportLink",
        ],
        "connection-types": [
            {
                "connection-type": "sync_sqlalchemy",
                "hook-class-name": "airflow_sync_provider.hooks.source.SyncSourceHook",
                "hook-name": "SQLAlchemy source (Database Sync)",
                "ui-field-behaviour": {
                    "hidden-fields": [],
                    "relabeling": {"schema": "Database"},
                    "placeholders": {
                        "extra": '{"sqlalchemy_drivername": "mssql+pymssql"}  or  {"sqlalchemy_url": "..."}',
                    },
                },
            },
            {
                "connection-type": "nats",
                "hook-class-name": "airflow_sync_provider.hooks.events.NatsJetStreamHook",
                "hook-name": "NATS JetStream (Database Sync)",
            },
            {
                "connection-type": "mqtt",
                "hook-class-name": "airflow_sync_provider.hooks.events.MqttHook",
                "hook-name": "MQTT (Database Sync)",
            },
        ],
        "config": {
            "sync": {
                "description": "Defaults for airflow-sync-provider operators.",
                "options": {
                    "staging_uri": {
                        "description": "Where staged Parquet batches are written: a local folder, or a URI every "
                        "worker can read. <scheme>://<conn_id>@<bucket>/<prefix> (e.g. "
                        "s3://aws_default@my-bucket/sync) takes credentials from that Airflow connection; "
                        "plain pyarrow URIs (s3://bucket/prefix) use the workers' environment. Split "
                        "operators refuse a local folder on a non-local executor. "
                        "Defaults to ~/.cache/airflow_sync_provider/staging.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://aws_default@my-bucket/airflow-sync/staging",
                        "default": None,
                    },
                    "status_conn_ids": {
                        "description": "Comma-separated Airflow connection ids of the PostgreSQL targets the "
                        "Sync status view (Browse -> Sync status) reads; every schema in them that holds sync "
                        "evidence is shown.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "warehouse,inventory_target",
                        "default": "",
                    },
                },
            }
        },
    }
