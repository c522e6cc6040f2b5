"""The local model server: MLflow's scoring app run by gunicorn with uvicorn workers.

A service's runtime folder holds `current.json` (the model the server should serve); each
worker loads that model when it boots, so a SIGHUP to the gunicorn master swaps versions.
"""
