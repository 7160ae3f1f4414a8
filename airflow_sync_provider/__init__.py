"""airflow-sync-provider: exactly-once incremental and CDC sync into PostgreSQL for Apache Airflow 3.

``airflow_sync_provider.core`` is the engine (no Airflow imports); ``hooks``/``operators``/``sensors``/
``triggers`` are the thin Airflow layer over it.
"""

__version__ = "0.1.0"
