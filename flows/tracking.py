"""MLflow in one place: the store, one run per training run, and the registry's champion rule.

Nothing happens at import time. `open_store(root)` picks the tracking URI (`MLFLOW_TRACKING_URI`
when set, else `sqlite:///<root>/mlflow.db`) and proves it can be written before any training.
Every call names its run id explicitly (MlflowClient), so no global "active run" is involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXPERIMENT = "train-cifar"
REGISTERED_MODEL = "cifar10-classifier"
CHAMPION, CHALLENGER = "champion", "challenger"
ONNX_MODEL_NAME = "onnx-model"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or written."""


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the SQLite file `mlflow.db` in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


@dataclass
class Store:
    """A checked tracking store and the experiment runs go to."""

    uri: str
    experiment_id: str

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def open_store(root: Path, experiment: str = EXPERIMENT) -> Store:
    """Connect, create the experiment if needed and write a tag: fail early and say why."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        # MLflow's client retries for minutes against a dead server; ask once, quickly.
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except OSError as exc:
            raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {exc}") from exc
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise TrackingUnavailable(f"MLflow tracking store {uri}: folder {db.parent} does "
                                      "not exist")
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingUnavailable(f"MLflow tracking store {uri} is not writable")
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = client.get_experiment_by_name(experiment)
        # With a SQLite store, artifacts sit beside the database, not in the current folder.
        artifacts = (Path(root).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        exp_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=artifacts)
        client.set_experiment_tag(exp_id, "pipeline.last_check", str(int(time.time())))
    except Exception as exc:  # any failure here means: do not start training
        raise TrackingUnavailable(
            f"MLflow tracking store {uri} is unreachable or unwritable: {exc}") from exc
    return Store(uri=uri, experiment_id=exp_id)


def code_version(repo: Path) -> str:
    """The git commit of the code (with '-dirty' for local changes), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, timeout=5).stdout.strip()
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

def find_resumable_run(store: Store, config_hash: str) -> Any | None:
    """The latest unfinished (RUNNING, FAILED or KILLED) run of this config, if any."""
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=f"tags.config_hash = '{config_hash}' and tags.registered = 'false'",
        order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        if run.info.status in ("RUNNING", "FAILED", "KILLED"):
            return run
    return None


def start_run(store: Store, run_name: str, params: dict[str, str], tags: dict[str, str],
              resume: Any | None = None) -> str:
    """Create (or reopen) a run, log its params once, return its id."""
    client = store.client
    if resume is not None:
        run_id = resume.info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return run_id
    run = client.create_run(store.experiment_id, run_name=run_name,
                            tags={**tags, "registered": "false"})
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def log_metrics(store: Store, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Many metrics in one call."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if v is not None and np.isfinite(v)]
    if batch:
        store.client.log_batch(run_id, metrics=batch)


def end_run(store: Store, run_id: str, status: str) -> None:
    """FINISHED or FAILED."""
    store.client.set_terminated(run_id, status=status)


def fail_stale_runs(store: Store, is_alive) -> list[str]:
    """Mark FAILED the RUNNING runs whose Prefect flow run is over (`is_alive(id)` is False)."""
    failed = []
    for run in store.client.search_runs([store.experiment_id],
                                        filter_string="attributes.status = 'RUNNING'"):
        flow_run_id = run.data.tags.get("prefect.flow_run_id")
        if flow_run_id and not is_alive(flow_run_id):
            store.client.set_terminated(run.info.run_id, status="FAILED")
            store.client.set_tag(run.info.run_id, "failure", "its flow run ended without it")
            failed.append(run.info.run_id)
    return failed


def log_onnx_model(store: Store, run_id: str, onnx_path: Path, example: np.ndarray,
                   metadata: dict[str, Any]) -> str:
    """Log the ONNX file with the onnx flavour (signature, a batch-of-2+ example) as the run's
    `onnx-model` artifact; returns its `runs:/` URI for the registry.

    Saved locally then uploaded through the client: the fluent `log_model` would need a global
    tracking URI, which MLflow also writes into the environment of every later run.
    """
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    from cifarlab.export import onnx_session

    logits = onnx_session(onnx_path).run(None, {"image": example})[0]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / ONNX_MODEL_NAME
        mlflow.onnx.save_model(
            onnx.load(str(onnx_path)), str(local), signature=infer_signature(example, logits),
            input_example=example, save_as_external_data=False, metadata=metadata,
            onnx_execution_providers=["CPUExecutionProvider"])
        store.client.log_artifacts(run_id, str(local), artifact_path=ONNX_MODEL_NAME)
    return f"runs:/{run_id}/{ONNX_MODEL_NAME}"


def log_files(store: Store, run_id: str, files: Mapping[str, Path], folder: str | None = None) -> None:
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


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

@dataclass
class Registration:
    """What registering a run did."""

    name: str
    version: str
    alias: str  # champion or challenger
    previous_champion: str | None
    previous_champion_val_accuracy: float | None


def register(store: Store, run_id: str, model_uri: str, val_accuracy: float,
             tags: Mapping[str, str], name: str = REGISTERED_MODEL) -> Registration:
    """Add a model version; it takes `champion` only if its validation accuracy beats the
    current champion's, else it is the `challenger`. Test accuracy plays no part."""
    client = store.client
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="CIFAR-10 classifiers (ONNX); the "
                                       "champion alias marks the best by validation accuracy")
    version = client.create_model_version(name, model_uri, run_id=run_id,
                                          tags={**tags, "val_accuracy": f"{val_accuracy:.6f}"})
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        champion_acc = float(champion.tags.get("val_accuracy", "-1"))
    except MlflowException:
        champion, champion_acc = None, None
    alias = CHAMPION if champion is None or val_accuracy > champion_acc else CHALLENGER
    client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(run_id, "registered", "true")
    client.set_tag(run_id, "registry.version", version.version)
    client.set_tag(run_id, "registry.alias", alias)
    return Registration(name, version.version, alias,
                        champion.version if champion else None, champion_acc)
