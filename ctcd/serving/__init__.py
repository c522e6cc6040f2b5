"""The local model server: MLflow's scoring app run by gunicorn with uvicorn workers.

A service's runtime folder holds `current.json` (the model the server should serve); each
worker loads that model when it boots, so replacing workers one by one (SIGTTIN, SIGTTOU)
swaps versions with no downtime (see `blocks/local_process.rolling_swap`).
"""
