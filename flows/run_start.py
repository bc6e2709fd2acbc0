"""Opening a training run's MLflow run: the one unfinished run of this config is claimed and
resumed (across hosts, under a Prefect lock), else a new run is started with its tags."""

from __future__ import annotations

import contextlib
import getpass
import os
from pathlib import Path

from prefect import get_run_logger

from cifarlab.config import RunConfig
from flows import locks
from flows.common import PROJECT_ROOT
from flows.runs import crash_flow_run, flow_run_alive
from registry import hosts, tracking


def _user() -> str:
    """Who runs this: the login name, or the uid where the container has no passwd entry."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


def _run_tags(config: RunConfig, chash: str, split: dict[str, str], data_folder: str,
              ) -> dict[str, str]:  # fmt: skip
    """The run's tags: its flow run, config, code, split, data and where it runs."""
    from prefect.runtime import flow_run

    from cifarlab.data import data_fingerprint
    from cifarlab.experiment import checksums_of
    from cifarlab.tensors import resolve_device

    code = tracking.code_version(PROJECT_ROOT)
    return {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "prefect.flow_run_count": str(flow_run.run_count),
        "config_hash": chash,
        "preset": config.preset,
        "model": config.model.name,
        "code_version": code,
        "split_sha256": split["sha256"],
        "data_fingerprint": data_fingerprint(checksums_of(config.data)),
        "data_folder": data_folder,
        "device": str(resolve_device(config.train.device)),
        # What the MLflow UI shows as the run's source, user and git commit.
        "mlflow.source.type": "JOB",
        "mlflow.source.name": "flows/train_flow.py:train_cifar",
        "mlflow.source.git.commit": code.removesuffix("-dirty"),
        "mlflow.source.git.dirty": str(code.endswith("-dirty")).lower(),
        "mlflow.user": _user(),
        **hosts.process_tags(),
    }


def begin_run(
    store: tracking.Store,
    config: RunConfig,
    root: Path,
    split: dict[str, str],
    data_folder: str,
    extra_tags: dict[str, str] | None = None,
) -> tuple[str, Path]:
    """Resume this config's unfinished MLflow run, or start one; returns (run id, run folder)."""
    from cifarlab.experiment import config_hash

    chash = config_hash(config)
    tags = {**_run_tags(config, chash, split, data_folder), **(extra_tags or {})}
    params = tracking.flatten("", config.model_dump(mode="json"))
    # Claiming a run to resume is one step on every host: two flow runs of one config starting
    # together cannot both reopen it (the second sees it RUNNING, owned by the first).
    with locks.exclusive("resume", chash):
        # (the locks are not re-entrant: this config's is held already)
        tracking.fail_stale_runs(
            store,
            flow_run_alive,
            crash_flow_run,
            claim_lock=lambda h: (
                contextlib.nullcontext() if h == chash else locks.exclusive("resume", h)
            ),
        )
        resume = tracking.find_resumable_run(store, chash)
        run_id = tracking.start_run(store, f"{config.preset}-{chash}", params, tags, resume)
    if (
        resume is not None
        and resume.data.tags.get("run_dir")
        and Path(resume.data.tags["run_dir"]).is_dir()
    ):
        run_dir = Path(resume.data.tags["run_dir"])
        get_run_logger().info("resuming MLflow run %s from %s", run_id, run_dir)
    else:
        run_dir = root / "runs" / f"{config.preset}-{chash}-{run_id[:8]}"
        store.client.set_tag(run_id, "run_dir", str(run_dir))
    return run_id, run_dir
