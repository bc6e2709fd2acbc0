"""The `train-cifar` flow: download -> split -> train -> export ONNX -> evaluate it -> register.

Tasks are thin wrappers over `cifarlab`; MLflow calls go through `registry.tracking`. One MLflow run
per training run; a run interrupted mid-training is resumed (same config, same checkpoint) by the
next flow run of that config, and is never registered from. Evaluation measures the exported
ONNX file (the one the endpoint serves), so it follows the export: the accuracy that goes on the
registry version, into the champion rule and into the endpoint's answers is the served model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff
from pydantic import Field

from cifarlab.config import DEFAULT_PRESET, RunConfig
from cifarlab.data import resolve_source
from flows import feedback_data
from flows.common import import_champion, project_root, serves_here
from flows.params import DataOverrides, ModelOverrides, PresetName, TrainOverrides, resolve_config
from flows.reporting import closing_line, summary_markdown
from flows.run_start import begin_run
from flows.train_tasks import (
    Evaluated,
    Int8Twin,
    evaluate_model,
    export_model,
    fetch_data,
    register_model,
    split_data,
    train_model,
)
from registry import tracking
from registry.champion import MIN_SHARED_IMAGES

if TYPE_CHECKING:
    from registry.champion import Registered

# ---------------------------------------------------------------------------------------------
# Flow
# ---------------------------------------------------------------------------------------------


@flow(name="train-cifar", log_prints=True)
def train_cifar(
    preset: PresetName = DEFAULT_PRESET,  # type: ignore[valid-type]  # Literal built at import
    data: DataOverrides | None = None,  # type: ignore[valid-type]
    model: ModelOverrides | None = None,  # type: ignore[valid-type]
    train: TrainOverrides | None = None,  # type: ignore[valid-type]
    root: str | None = None,
    skip_registry: bool = False,
    skip_bentoml: bool = False,
    mlflow_parent_run_id: str | None = None,
    mlflow_tags: dict[str, str] | None = None,
    min_shared_images: Annotated[int, Field(ge=1)] = MIN_SHARED_IMAGES,
    min_significance: Annotated[float, Field(gt=0, lt=1)] | None = None,
    int8: Int8Twin = "champion",
    feedback_images: str | None = None,
) -> dict[str, Any]:
    """Train a preset (with overrides), export it to ONNX, evaluate the exported file, register
    it (champion only if it beats the champion on their shared validation images, with McNemar's
    p below `min_significance` when set) and put the champion in the BentoML store. A sweep
    passes its MLflow run as `mlflow_parent_run_id` (the run is nested under it) and its tags.
    `int8`: which runs get an int8 twin (the service's int8 precision serves it): "champion"
    (the version promoted to champion, before the alias moves), "always" or "never".
    `feedback_images`: "auto" (the drift trigger's) or a folder adds the images clients
    labelled through /feedback to the training split."""
    config = resolve_config(preset, data, model, train)
    # Pin the data source now, so the cache key and the MLflow params name the real source.
    config.data.source = resolve_source(config.data.source)
    root_dir = project_root(root)
    root_dir.mkdir(parents=True, exist_ok=True)
    store = tracking.open_store(root_dir)  # an unusable store fails here, before any training
    import_here = not (skip_registry or skip_bentoml) and serves_here(store)
    learns_from = _feedback(config, feedback_images, root_dir)

    fetch = fetch_data.with_options(
        retries=config.data.download_retries,
        retry_delay_seconds=exponential_backoff(config.data.download_backoff_s)(
            config.data.download_retries
        )
        or 0,
    )
    data_folder = fetch(config.data, str(root_dir))
    split = split_data(config.data, str(root_dir), data_folder)
    extra_tags = {**(mlflow_tags or {})}
    if mlflow_parent_run_id:
        extra_tags["mlflow.parentRunId"] = mlflow_parent_run_id
    run_id, run_dir = begin_run(store, config, root_dir, split, data_folder, extra_tags)
    evaluated, done = _train_to_registry(config, root_dir, run_dir, store, run_id, skip_registry,
                                         min_shared_images, min_significance, int8)  # fmt: skip
    # After the run is closed: a BentoML failure fails the flow but not the registered model.
    bento = import_champion(store, str(root_dir)) if import_here else None
    return _report(config, {**evaluated.summary, "learns_from": learns_from}, done, store,
                   run_id, bento)  # fmt: skip


def _feedback(config: RunConfig, spec: str | None, root_dir: Path) -> str | None:
    """Add the images clients labelled to the config's training data; what it learns from."""
    if spec is None:
        return None
    config.data.extra_train, learns_from = feedback_data.gather(spec, root_dir)
    get_run_logger().info("feedback: %s", learns_from)
    return learns_from


def _train_to_registry(
    config: RunConfig,
    root_dir: Path,
    run_dir: Path,
    store: tracking.Store,
    run_id: str,
    skip_registry: bool,
    min_shared_images: int,
    min_significance: float | None,
    int8: Int8Twin,
) -> tuple[Evaluated, Registered | None]:
    """train -> export -> evaluate -> register inside the MLflow run, which ends FINISHED, or
    FAILED with the error on its `failure` tag."""
    done = None
    try:
        # (registration included: a champion's int8 twin is built in it)
        with tracking.system_metrics(store, run_id):
            trained = train_model(config, str(root_dir), str(run_dir), store, run_id)
            exported = export_model(trained, store, run_id)
            evaluated = evaluate_model(trained, exported, store, run_id, int8=int8 == "always")
            if not skip_registry:
                done = register_model(
                    trained,
                    exported,
                    evaluated,
                    store,
                    run_id,
                    min_shared_images,
                    min_significance,
                    int8,
                )
    except BaseException as exc:
        store.client.set_tag(run_id, "failure", f"{type(exc).__name__}: {exc}"[:5000])
        tracking.end_run(store, run_id, "FAILED")
        raise
    tracking.end_run(store, run_id, "FINISHED")
    return evaluated, done


def _report(
    config: RunConfig,
    s: dict[str, Any],
    done: Any,
    store: tracking.Store,
    run_id: str,
    bento: dict[str, Any] | None,
) -> dict[str, Any]:
    """The summary artifact, the MLflow run's description, the closing lines; the flow's result."""
    summary = summary_markdown(config, s, done, store, run_id, bento)
    create_markdown_artifact(
        key="train-cifar-summary",
        markdown=summary,
        description=f"{config.preset}: validation {100 * s['val_accuracy']:.2f} % (served model)",
    )
    # The MLflow run page shows this as the run's description.
    store.client.set_tag(run_id, "mlflow.note.content", summary.split("\n## Config")[0][:8000])
    reg = done.registration if done else None
    get_run_logger().info("%s", closing_line(config, s, store, run_id, reg, bento))
    return {
        "mlflow_run_id": run_id,
        "tracking_uri": tracking.display_uri(store.uri),
        "preset": config.preset,
        "val_accuracy": s["val_accuracy"],
        "test_accuracy": s["test_accuracy"],
        "tta_val_accuracy": s["tta_val_accuracy"],
        "train_seconds": s["train_seconds"],
        "parity": s["parity"],
        "feedback_images": s.get("feedback_images"),
        "registered_version": reg.version if reg else None,
        "alias": reg.alias if reg else None,
        "promotion_reason": reg.reason if reg else None,
        "bento_tag": bento["tag"] if bento else None,
    }


if __name__ == "__main__":
    train_cifar()
