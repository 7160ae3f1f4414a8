"""The two reference case studies: schemas, deterministic data generators, change simulators and the
business checks their DAGs (``dags/inventory_sync.py``, ``dags/bank_customer_sync.py``) run.

Plain Python (psycopg, pandas): the DAGs import it, the demo and the tests drive it.  Nothing here
touches a database at import time.

It lives beside the DAGs, not in the provider's wheel: Airflow puts the DAG folder on ``sys.path``
when it parses a DAG file or runs a task, so ``import case_studies`` works wherever the DAGs are
deployed (e.g. the ``dags/`` mount of docker-compose).  ``dags/.airflowignore`` keeps the
dag-processor from parsing these modules as DAG files.
"""
