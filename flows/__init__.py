"""Prefect flows, one per DVC stage; each module runs with `python -m flows.<stage>`."""
