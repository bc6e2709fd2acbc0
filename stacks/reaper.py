"""The reaper: fails the MLflow runs nobody runs any more, so none stays RUNNING for ever (the
team stack runs `python -m stacks reap --every 30`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from stacks.local import tracking_host


def reap(root: Path, host: str) -> list[str]:
    """Fail the MLflow runs nobody runs any more (registry.tracking.fail_stale_runs): those whose
    flow run has ended (a host that never came back; the zombie automation crashed its flow
    run), and those whose process on this host is gone (their flow runs become Crashed).
    Needs the tracking and Prefect settings in the environment."""
    os.environ["CIFAR_HOST"] = host
    from flows import locks
    from flows.runs import crash_flow_run, flow_run_alive
    from registry import tracking

    store = tracking.open_store(root)
    failed = tracking.fail_stale_runs(
        store, flow_run_alive, crash_flow_run, claim_lock=lambda h: locks.exclusive("resume", h)
    )
    for run_id in failed:
        print(
            f"{host}: MLflow run {run_id} was RUNNING with nobody running it: marked FAILED "
            "(the next run of its config on its host resumes it)",
            flush=True,
        )
    return failed


def run_reaper(root: Path, every: float) -> int:
    """`reap` every `every` seconds until stopped; a server that does not answer is retried."""

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    host = tracking_host()
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            try:
                reap(root, host)
            except Exception as exc:  # noqa: BLE001 - a server restarting: try again later
                print(f"reaper: {type(exc).__name__}: {exc}", flush=True)
            time.sleep(every)
    return 0
