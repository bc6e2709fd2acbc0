"""MLflow in one place: the store, one run per training run, and the registry's champion rule.

Nothing happens at import time. `open_store(root)` picks the tracking URI (`MLFLOW_TRACKING_URI`
when set, else `sqlite:///<root>/mlflow.db`) and proves it can be written before any training.
Every call names its run id explicitly (MlflowClient), so no global "active run" is involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from registry.hosts import host_name, process_gone

EXPERIMENT = "train-cifar"
REGISTERED_MODEL = "cifar10-classifier"
CHAMPION, CHALLENGER = "champion", "challenger"
ONNX_MODEL_NAME = "onnx-model"
EXPERIMENT_KIND = "custom_model_development"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or written."""


def _lost_insert_race(exc: Exception) -> bool:
    """MLflow creates some rows by looking first, then inserting (an experiment by name, a
    dataset by name and digest). Two runs doing it at the same moment both insert, and the
    database refuses the second one's key: SQLite, PostgreSQL and MySQL say so in these words,
    which the tracking server passes on. Nothing else (a foreign key, a missing value) is a
    race."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and any(
        s in str(exc)
        for s in ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")
    )


def _retry_lost_race(call, attempts: int = 5):
    """`call()`, again when it lost an insert race: the row it wanted now exists, and the next
    try finds it instead of inserting it (the failed transaction was rolled back whole)."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts - 1 or not _lost_insert_race(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the SQLite file `mlflow.db` in the project root."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    )


def files_through_the_server() -> None:
    """Artifacts go through the tracking server, both ways (unless this process's environment
    says otherwise). A server on S3 offers its clients presigned URLs of its object store, which
    MLflow's client then uses for every download and for uploads over 500 MB: an address other
    hosts may not reach (docs/team-stack.md, "Object store")."""
    for direction in ("UPLOAD", "DOWNLOAD"):
        os.environ.setdefault(f"MLFLOW_ENABLE_PROXY_MULTIPART_{direction}", "false")


@dataclass
class Store:
    """A checked tracking store and the experiment runs go to."""

    uri: str
    experiment_id: str

    def __post_init__(self) -> None:
        files_through_the_server()

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def open_store(
    root: Path, experiment: str = EXPERIMENT, uri: str | None = None, prefix: str | None = None
) -> Store:
    """Connect, create the experiment if needed and write a tag: fail early and say why.
    `uri`: the store (default: `tracking_uri(root)`). `prefix`: on a tracking server, the
    experiment's own folder of the server's artifact store (else one named by its id)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in flow logs
    from mlflow import MlflowClient

    uri = uri or tracking_uri(root)
    shown = display_uri(uri)  # never a password in an error message
    if uri.startswith(("http://", "https://")):
        # MLflow's client retries for minutes against a dead server; ask once, quickly.
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except OSError as exc:
            raise TrackingUnavailable(
                f"MLflow tracking server {shown} is unreachable: {exc}"
            ) from exc
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise TrackingUnavailable(
                f"MLflow tracking store {shown}: folder {db.parent} does not exist"
            )
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingUnavailable(f"MLflow tracking store {shown} is not writable")
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # With a SQLite store, artifacts sit beside the database, not in the current folder.
        artifacts = (
            (Path(root).resolve() / "mlartifacts").as_uri()
            if uri.startswith("sqlite:")
            else f"mlflow-artifacts:/{prefix}"
            if prefix and uri.startswith(("http://", "https://"))
            else None
        )

        def experiment_id() -> str:  # (another host may create it at the same moment)
            found = client.get_experiment_by_name(experiment)
            return (
                found.experiment_id
                if found
                else client.create_experiment(experiment, artifact_location=artifacts)
            )

        def tag() -> None:  # (tags too are created by looking first, then inserting)
            client.set_experiment_tag(exp_id, "pipeline.last_check", str(int(time.time())))
            # MLflow 3's UI opens an experiment without this tag as a GenAI one (no runs).
            client.set_experiment_tag(exp_id, "mlflow.experimentKind", EXPERIMENT_KIND)

        exp_id = _retry_lost_race(experiment_id)
        _retry_lost_race(tag)
    except Exception as exc:  # any failure here means: do not start training
        raise TrackingUnavailable(
            f"MLflow tracking store {shown} is unreachable or unwritable: {exc}"
        ) from exc
    return Store(uri=uri, experiment_id=exp_id)


def code_version(repo: Path) -> str:
    """The git commit of the code (with '-dirty' for local changes), or 'unknown'."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> {'train.lr': '0.0004', ...} for MLflow params."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list | tuple) else str(value)}


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def bool_tag(value: bool | None) -> str:
    """A yes/no/unknown as a tag value: "true", "false" or "unknown"."""
    return "unknown" if value is None else ("true" if value else "false")


def tag_bool(tag: str | None) -> bool | None:
    """`bool_tag`'s value back; None for "unknown", an absent tag or anything else."""
    return {"true": True, "false": False}.get(tag or "")


def find_resumable_run(store: Store, config_hash: str, host: str | None = None) -> Any | None:
    """The latest unfinished run of this config that no process owns any more (FAILED or
    KILLED; `fail_stale_runs` turns the RUNNING runs of ended flow runs into FAILED first) and
    whose checkpoint lives on this host. A RUNNING run is someone's live run: never taken."""
    host = host or host_name()
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=f"tags.config_hash = '{config_hash}' and tags.registered = 'false' "
        f"and tags.host = '{host}'",
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    for run in runs:
        tags = run.data.tags
        # FAILED, yet its process on this host still runs (a cancel not yet landed): not ours.
        alive_elsewhere = (
            tags.get("pid", "").isdigit()
            and int(tags["pid"]) != os.getpid()
            and not process_gone(tags)
        )
        if run.info.status in ("FAILED", "KILLED") and not alive_elsewhere:
            return run
    return None


def start_run(
    store: Store,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
    resume: Any | None = None,
) -> str:
    """Create (or reopen) a run, log its params once, return its id."""
    from mlflow.entities import Param, RunTag

    client = store.client
    if resume is not None:
        run_id = resume.info.run_id
        # The new owner's tags (flow run, pid) first, RUNNING last: a reaper never sees this
        # run RUNNING under its dead owner's name.
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if "failure" in resume.data.tags:  # why it stopped last time no longer describes it
            client.delete_tag(run_id, "failure")
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        store.experiment_id, run_name=run_name, tags={**tags, "registered": "false"}
    )
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def log_metrics(
    store: Store, run_id: str, metrics: Mapping[str, float | None], step: int = 0
) -> None:
    """Many metrics in one call; None and non-finite values are left out."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and np.isfinite(v)
    ]
    if batch:
        store.client.log_batch(run_id, metrics=batch)


def end_run(store: Store, run_id: str, status: str) -> None:
    """FINISHED or FAILED."""
    store.client.set_terminated(run_id, status=status)


def fail_stale_runs(
    store: Store,
    is_alive,
    on_dead_process=None,
    claim_lock=lambda _config_hash: contextlib.nullcontext(),
) -> list[str]:
    """Mark FAILED the RUNNING runs nobody runs any more: their Prefect flow run has ended
    (`is_alive(flow_run_id)` is False), or their process on this host is gone (a worker killed
    with its flow runs; `on_dead_process(flow_run_id, reason, run_count)` is then told, to end
    the flow run too). Runs of live processes, here or on other hosts, are left alone.
    `claim_lock(config_hash)` is the lock resume claims take: the verdict is re-checked and
    carried out under it, so no claim slips in between."""
    failed = []
    for run in store.client.search_runs(
        [store.experiment_id], filter_string="attributes.status = 'RUNNING'"
    ):
        tags = run.data.tags
        flow_run_id = tags.get("prefect.flow_run_id")
        reason = None
        if process_gone(tags):
            reason = f"its process {tags['pid']} on {tags['host']} is gone"
        elif flow_run_id and not is_alive(flow_run_id):
            reason = "its flow run ended without it"
        if reason is None:
            continue
        # Another flow run may have claimed it since the search (resume writes its own tags
        # before RUNNING): fail it only if it is still the run we judged.
        with claim_lock(tags.get("config_hash", "")):
            now = store.client.get_run(run.info.run_id)
            owner = ("prefect.flow_run_id", "pid", "host")
            if now.info.status != "RUNNING" or any(
                now.data.tags.get(k) != tags.get(k) for k in owner
            ):
                continue
            store.client.set_tag(run.info.run_id, "failure", reason)
            store.client.set_terminated(run.info.run_id, status="FAILED")
        failed.append(run.info.run_id)
        if reason.startswith("its process") and flow_run_id and on_dead_process is not None:
            on_dead_process(
                flow_run_id,
                f"MLflow run {run.info.run_id}: {reason}",
                tags.get("prefect.flow_run_count"),
            )
    return failed


@contextlib.contextmanager
def system_metrics(store: Store, run_id: str, interval_s: float | None = None):
    """Record CPU, memory, disk, network (and GPU where present) as `system/*` metrics of the
    run while the block runs, every `interval_s` (default $CIFAR_SYSTEM_METRICS_INTERVAL_S,
    else 10 s; MLflow logs whole intervals only)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    if interval_s is None:
        interval_s = float(os.environ.get("CIFAR_SYSTEM_METRICS_INTERVAL_S", "10"))

    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=interval_s,
        samples_before_logging=1,
        resume_logging=True,
        tracking_uri=store.uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def display_uri(uri: str) -> str:
    """A URI fit for logs, tags and artifacts: user name and password masked, query string
    (tokens of presigned URLs) and fragment dropped."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or parts.scheme == "file" or len(parts.scheme) == 1:
        return uri  # a path (or a Windows drive letter): nothing secret in it
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        netloc = f"***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


def log_files(
    store: Store, run_id: str, files: Mapping[str, Path], folder: str | None = None
) -> None:
    """Upload files as run artifacts."""
    for path in files.values():
        if Path(path).is_file():
            store.client.log_artifact(run_id, str(path), artifact_path=folder)


def log_json(store: Store, run_id: str, name: str, data: Any) -> None:
    """A JSON artifact from a Python value."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        store.client.log_artifact(run_id, str(path))


def has_artifact(store: Store, run_id: str, path: str) -> bool:
    """Whether the run has the file `path`: ask before downloading one that may be missing. A
    tracking server on S3 answers a missing file with HTTP 500, which MLflow's client retries
    for minutes; a listing answers at once."""
    folder = path.rpartition("/")[0] or None
    listed = store.client.list_artifacts(run_id, folder)
    return any(f.path == path and not f.is_dir for f in listed)
