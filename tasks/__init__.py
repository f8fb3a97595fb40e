"""Pipeline logic as plain typed functions, importable and testable without Prefect running."""
