"""The local and team stacks: Prefect and MLflow servers, PostgreSQL, workers, the reaper and the
process helpers that start and stop them (`python -m stacks up|run|team|worker|reap`)."""
