"""The provider's Airflow plugin: the "Sync status" view (:mod:`.status_plugin`, :mod:`.app`) and the
operators' extra links (:mod:`.links`).  Importing this package imports neither FastAPI nor the app."""
