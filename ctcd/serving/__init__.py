"""The local model server: MLflow's scoring app run by gunicorn with uvicorn workers.

A service's runtime folder holds `current.json`, the desired state (the model the workers
should serve and how many workers); the server's master (`ctcd.serving.master`) converges its
workers on it one at a time, so versions swap with no downtime whoever asked for the swap.
"""
