"""Turning flows into Prefect deployments, and finding the servers they deployed."""
