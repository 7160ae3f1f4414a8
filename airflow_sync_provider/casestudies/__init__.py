"""The two reference case studies: schemas, deterministic data generators, change simulators and the
business checks their DAGs (``dags/inventory_sync.py``, ``dags/bank_customer_sync.py``) run.

Plain Python (psycopg, pandas): the DAGs import it, the demo and the tests drive it.  Nothing here
touches a database at import time.
"""
