"""Flow runs as Prefect's API knows them: whether one is still going, and ending one whose
process is gone. Used by a run that resumes another's MLflow run and by the stacks' reaper."""

from __future__ import annotations

import logging
from uuid import UUID


def crash_flow_run(flow_run_id: str, reason: str, run_count: str | None = None) -> None:
    """End a flow run whose process is gone (its worker was killed): Crashed, not Running
    for ever. `run_count` is the attempt that process ran: a later attempt (a retry started
    elsewhere) is left alone."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            found = client.read_flow_run(UUID(flow_run_id))
            if run_count is not None and str(found.run_count) != str(run_count):
                return
            if found.state is not None and not found.state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
    except Exception as exc:  # noqa: BLE001 - unknown to this API: nothing to end here
        logging.getLogger(__name__).warning(
            "could not mark flow run %s crashed: %s", flow_run_id, exc
        )


def flow_run_alive(flow_run_id: str) -> bool:
    """False only when Prefect knows this flow run and it has ended."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # noqa: BLE001 - unknown to this Prefect API: not ours to judge
        return True
    return state is None or not state.is_final()
