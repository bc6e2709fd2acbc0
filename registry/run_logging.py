"""What a run logs besides metrics: its exported ONNX file as an MLflow LoggedModel (the
registry's versions point at it) and its training and validation images as MLflow datasets."""

from __future__ import annotations

import hashlib
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from registry.tracking import ONNX_MODEL_NAME, Store, _retry_lost_race, display_uri


@dataclass
class LoggedOnnx:
    """An ONNX model logged as an MLflow 3 LoggedModel of a run."""

    model_id: str
    model_uri: str  # its artifact location: what the registry version points at


def log_onnx_model(
    store: Store,
    run_id: str,
    onnx_path: Path,
    example: np.ndarray,
    metadata: dict[str, Any],
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, str] | None = None,
) -> LoggedOnnx:
    """Log the ONNX file (onnx flavour, signature, a batch-of-2+ example) as a LoggedModel
    linked to the run, with its metrics, so the UI lists it under the run and the registry.

    The same steps as the fluent `mlflow.onnx.log_model`, through the client: the fluent API
    needs a global tracking URI, which MLflow also writes into the environment of later runs.
    """
    import mlflow.onnx
    import onnx
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model, infer_signature

    from cifarlab.export import onnx_session

    client = store.client
    logits = onnx_session(onnx_path).run(None, {"image": example})[0]
    model = client.create_logged_model(
        experiment_id=store.experiment_id,
        name=ONNX_MODEL_NAME,
        source_run_id=run_id,
        params=dict(params or {}),
        model_type="onnx-classifier",
    )
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / ONNX_MODEL_NAME
        mlflow.onnx.save_model(
            onnx.load(str(onnx_path)),
            str(local),
            signature=infer_signature(example, logits),
            input_example=example,
            save_as_external_data=False,
            metadata=metadata,
            # Stated (onnx and onnxruntime at this host's versions), not inferred: MLflow's
            # inference loads the model in a subprocess, for seconds, to find the same.
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            onnx_execution_providers=["CPUExecutionProvider"],
            mlflow_model=Model(
                artifact_path=model.artifact_location,
                run_id=run_id,
                model_id=model.model_id,
                model_uuid=model.model_id,
            ),
        )
        client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, "READY")
    _log_model_metrics(store, run_id, model.model_id, metrics or {})
    return LoggedOnnx(model.model_id, model.artifact_location)


def _log_model_metrics(
    store: Store, run_id: str, model_id: str, metrics: Mapping[str, float]
) -> None:
    """The run's metrics, also on the LoggedModel (the UI shows them beside the model)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, 0, model_id=model_id)
        for k, v in metrics.items()
        if v is not None and np.isfinite(v)
    ]
    for start in range(0, len(batch), 100):
        store.client.log_batch(run_id, metrics=batch[start : start + 100])


def log_datasets(store: Store, run_id: str, run: Any) -> None:
    """The training and validation images of a run (cifarlab.experiment.TrainedRun) as MLflow
    datasets: named by split, with the split's hash as digest and the data source; no pixels
    are copied into MLflow."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import (  # type: ignore[attr-defined]  # registered at import time
        LocalArtifactDatasetSource,
    )
    from mlflow.entities import DatasetInput, InputTag

    source = run.config.data.source or str(run.data.folder)
    if source.startswith(("http://", "https://")):
        src = HTTPDatasetSource(display_uri(source))
    else:
        path = urllib.parse.urlsplit(source).path if source.startswith("file:") else source
        src = LocalArtifactDatasetSource(str(Path(path).resolve()))
    split = run.split
    inputs = []
    for context, idx in (("training", split.train_idx), ("validation", split.val_idx)):
        digest = hashlib.sha256(f"{split.digest}:{context}".encode()).hexdigest()[:16]
        # (MLflow's own class, declared abstract for its `profile`, which it returns None for)
        ds = MetaDataset(source=src, name=f"cifar10-{context}-{len(idx)}", digest=digest)  # type: ignore[abstract]
        inputs.append(
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        )
    if run.extra is not None:  # images clients labelled through /feedback (cifarlab/labelled.py)
        packed = run.extra.path
        store.client.log_artifact(run_id, str(packed), "feedback")  # small: 3 KB an image
        ds = MetaDataset(  # type: ignore[abstract]
            source=LocalArtifactDatasetSource(str(packed.resolve())),
            name=f"feedback-{len(run.extra)}",
            digest=packed.stem.rsplit("-", 1)[-1][:16],
        )
        inputs.append(
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
        )
        client_tags = {"feedback_images": str(len(run.extra)),
                       "feedback_images_dropped": str(run.extra.dropped)}  # fmt: skip
        for k, v in client_tags.items():
            store.client.set_tag(run_id, k, v)
    # Every run of a split logs the same datasets: runs finishing together race to create them.
    client = store.client
    _retry_lost_race(lambda: client.log_inputs(run_id, datasets=inputs))


OOD_ARTIFACT = "ood/ood_reference.json"  # a run's out-of-distribution reference (cifarlab/ood.py)


def log_ood_reference(store: Store, run_id: str, ref: Any) -> None:
    """The served file's out-of-distribution reference as a run artifact, its threshold and
    method as run tags (a registered version carries them: `ood_tags`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(OOD_ARTIFACT).name
        path.write_text(ref.to_json() + "\n")
        store.client.log_artifact(run_id, str(path), str(Path(OOD_ARTIFACT).parent))
    store.client.set_tag(run_id, "ood_threshold", f"{ref.threshold:.6f}")
    store.client.set_tag(run_id, "ood_method", ref.method)


def ood_tags(run_tags: Mapping[str, str]) -> dict[str, str]:
    """The run's out-of-distribution threshold and method as registry version tags."""
    return {k: run_tags[k] for k in ("ood_threshold", "ood_method") if k in run_tags}


REFERENCE_ARTIFACT = "monitoring/reference.npz"  # what a version's answers are compared with


def log_reference(store: Store, run_id: str, arrays: Mapping[str, Any]) -> None:
    """The served file's answers on its validation images (cifarlab/drift.py) as a run
    artifact, for the drift monitor."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(REFERENCE_ARTIFACT).name
        np.savez_compressed(path, **arrays)
        store.client.log_artifact(run_id, str(path), str(Path(REFERENCE_ARTIFACT).parent))
