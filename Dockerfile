# Airflow 3 image with this provider installed (used by every Airflow service in docker-compose.yaml:
# the workers run the syncs and the triggerer imports the CDC trigger classes); the s3 extra
# stages batches in the bucket through an Airflow aws connection.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root pyproject.toml README.md /opt/airflow-sync-provider/
COPY --chown=airflow:root airflow_sync_provider /opt/airflow-sync-provider/airflow_sync_provider
RUN pip install --no-cache-dir "/opt/airflow-sync-provider[mysql,s3]"
