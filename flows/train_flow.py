"""The `train-cifar` flow: download -> split -> train -> export ONNX -> evaluate it -> register.

Tasks are thin wrappers over `cifarlab`; MLflow calls go through `registry.tracking`. One MLflow run
per training run; a run interrupted mid-training is resumed (same config, same checkpoint) by the
next flow run of that config, and is never registered from. Evaluation measures the exported
ONNX file (the one the endpoint serves), so it follows the export: the accuracy that goes on the
registry version, into the champion rule and into the endpoint's answers is the served model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import Field

from cifarlab.config import DEFAULT_PRESET, DataConfig, RunConfig
from cifarlab.data import resolve_source
from flows import locks
from flows.common import import_champion, project_root, serves_here
from flows.int8 import int8_twin, int8_version_tags
from flows.reporting import closing_line, duration, summary_markdown
from flows.run_start import begin_run
from registry import tracking
from registry.champion import MIN_SHARED_IMAGES
from flows.params import DataOverrides, ModelOverrides, PresetName, TrainOverrides, resolve_config

# Which runs get an int8 twin (cifarlab/quantize.py): "champion", a run whose version becomes
# the champion (the one model that is served), built before the alias moves; "always", every
# run (its int8 figures on the run, and on its version if it is registered); "never".
Int8Twin = Literal["champion", "always", "never"]


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

def _network_fault(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed fetch only for a network fault: a wrong checksum stays wrong."""
    from cifarlab.data import DownloadError

    return isinstance(getattr(state, "data", None), DownloadError)


# No result cache on the data steps: they are cheap once the files verified (cifarlab.data keeps
# a stamp keyed by each file's size, inode and times, and the loaded arrays for the process),
# and a cached result could name a folder that no longer exists.
@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_network_fault)
def fetch_data(data: DataConfig, root: str) -> str:
    """Download (or find) and verify CIFAR-10; a verified, unchanged copy is only stat-ed.
    The flow sets this task's retries from `data.download_retries` (the only retry policy)."""
    from cifarlab.data import prepare_cifar10
    from cifarlab.experiment import checksums_of

    folder = prepare_cifar10(Path(root) / "data", data.source, checksums=checksums_of(data),
                             retries=0)
    get_run_logger().info("CIFAR-10 verified in %s", folder)
    return str(folder)


@task(cache_policy=NO_CACHE, persist_result=False)
def split_data(data: DataConfig, root: str, data_folder: str) -> dict[str, str]:
    """The seeded stratified split (milliseconds), written as index files."""
    from cifarlab.data import data_fingerprint
    from cifarlab.arrays import load_cifar10
    from cifarlab.experiment import DataBundle, array_cache, checksums_of, make_split

    # fetch_data has just verified this folder; the arrays (memory-mapped from the root's
    # cache after the first run) stay with the process for the training task of this flow run.
    bundle = DataBundle(folder=Path(data_folder),
                        data=load_cifar10(Path(data_folder), array_cache(Path(root))),
                        fingerprint=data_fingerprint(checksums_of(data)))
    split, split_dir = make_split(data, bundle, Path(root))
    get_run_logger().info("split %s: %d train / %d validation images", split.digest[:12],
                          len(split.train_idx), len(split.val_idx))
    return {"dir": str(split_dir), "sha256": split.digest}


@dataclass
class InMemory:
    """In-memory hand-over between the tasks of one flow run (never persisted): the trained
    run (cifarlab.experiment.TrainedRun), its export and its evaluation."""

    value: Any


@task(cache_policy=NO_CACHE, persist_result=False)
def train_model(config: RunConfig, root: str, run_dir: str, store: tracking.Store,
                run_id: str) -> InMemory:
    """Train (resuming from the run folder's checkpoint) and log every epoch."""
    from cifarlab.experiment import train_run

    logger = get_run_logger()
    # Epochs this run has on the tracking server already (a resumed run): never logged twice.
    logged = {m.step for m in store.client.get_metric_history(run_id, "val_loss")}
    total = config.train.epochs
    # The run's progress in the Prefect UI (the flow run's Artifacts tab), per epoch.
    progress = create_progress_artifact(
        100.0 * len(logged) / total, description=f"{config.preset}: epochs trained of {total}")

    def log_epoch(m, _model) -> None:
        if m.epoch in logged:
            return
        tracking.log_metrics(store, run_id, {
            "train_loss": m.train_loss, "train_accuracy": m.train_accuracy,
            "val_loss": m.val_loss, "val_accuracy": m.val_accuracy, "lr": m.lr,
            "epoch_seconds": m.epoch_seconds, "images_per_second": m.images_per_second,
            # (neither is recorded in checkpoints from before them)
            "val_images": m.val_images or None, "val_seconds": m.val_seconds or None,
        }, step=m.epoch)
        logged.add(m.epoch)
        left = (total - m.epoch) * m.train_seconds / m.epoch
        logger.info("epoch %d/%d: train loss %.3f acc %.2f%% | val%s loss %.3f acc %.2f%% | "
                    "%.1f s, about %s of training left", m.epoch, total, m.train_loss,
                    100 * m.train_accuracy, m.val_subset_note(config.data.val_size), m.val_loss,
                    100 * m.val_accuracy, m.epoch_seconds, duration(left))
        update_progress_artifact(progress, 100.0 * m.epoch / total)

    # The fetch task verified the data and owns the retries: none here.
    run = train_run(config, Path(root), hooks=[log_epoch], run_dir=Path(run_dir),
                    download_retries=0)
    t = run.trained
    # An epoch checkpointed just before a kill was not logged then: it is in the checkpoint's
    # history, so log it now.
    for m in t.history:
        log_epoch(m, None)
    tracking.log_metrics(store, run_id, {"train_seconds": t.train_seconds,
                                         "epochs_completed": t.epochs_completed})
    tracking.log_files(store, run_id, {k: v for k, v in run.files.items() if k != "split"})
    tracking.log_json(store, run_id, "resolved_config.json", config.model_dump(mode="json"))
    tracking.log_datasets(store, run_id, run)
    return InMemory(run)


@task(cache_policy=NO_CACHE, persist_result=False)
def export_model(trained: InMemory, store: tracking.Store, run_id: str) -> InMemory:
    """Export the model that will be served to ONNX and require parity with PyTorch."""
    from cifarlab.experiment import export_run
    from cifarlab.export import require_parity

    exported = export_run(trained.value, require=False)
    report = exported.parity
    tracking.log_metrics(store, run_id, {"onnx_max_abs_diff": report.max_abs_diff,
                                         "onnx_argmax_agreement": report.argmax_agreement})
    require_parity(report)  # a failed check fails the run: nothing is registered
    get_run_logger().info("ONNX parity: max |diff| %.2e, same class on %.2f%% of %d images "
                          "(TTA in the graph: %s)", report.max_abs_diff,
                          100 * report.argmax_agreement, report.images, exported.tta)
    return InMemory(exported)


@task(cache_policy=NO_CACHE, persist_result=False)
def evaluate_model(trained: InMemory, exported: InMemory, store: tracking.Store,
                   run_id: str, int8: bool = True) -> InMemory:
    """Validation and test accuracy of the exported file (onnxruntime), latency, plots; the
    unserved TTA figure apart. Logs the ONNX model (with its metrics) to MLflow. `int8`: build
    the int8 twin here (train_cifar's int8="always")."""
    import torch

    from cifarlab.constants import MEAN, STD
    from cifarlab.experiment import eval_inputs, evaluate_run, summarise, write_results
    from cifarlab.export import onnx_latency_ms
    from registry import champion

    run, ex = trained.value, exported.value
    inputs = eval_inputs(run)  # normalised once for the served file and its int8 twin
    ev = evaluate_run(run, ex, inputs)
    write_results(run, ex, ev)
    s = summarise(run, ex, ev)
    latency = onnx_latency_ms(ex.path)
    metrics = {
        "final_val_accuracy": ev.val.accuracy, "final_val_loss": ev.val.loss,
        "test_accuracy": ev.test.accuracy, "test_loss": ev.test.loss,
        "tta_val_accuracy": ev.tta_val.accuracy if ev.tta_val else None,
        "tta_test_accuracy": ev.tta_test.accuracy if ev.tta_test else None,
        **{f"val_accuracy.{k}": v for k, v in s["val_per_class_accuracy"].items()},
        **{f"test_accuracy.{k}": v for k, v in s["test_per_class_accuracy"].items()},
        **{f"onnx_latency_ms_batch{b}": ms for b, ms in latency.items()},
    }
    # Per-class figures on the run; the headline ones go with the logged model (below), which
    # links them to it and records them on the run too.
    tracking.log_metrics(store, run_id, {k: v for k, v in metrics.items() if "." in k})
    tracking.log_files(store, run_id, {k: run.files[k] for k in ("confusion_matrix", "results")})
    # What this file answers on the validation images: a later champion comparison with this
    # model reads them instead of running it again.
    champion.record_predictions(store, run_id, ex.path, run.split.val_idx, ev.val.predictions)
    weights = run.run_dir / "weights.pt"
    torch.save(run.trained.model.state_dict(), weights)
    tracking.log_files(store, run_id, {"weights": weights})
    example = inputs.val[:2]  # batch 2: the axis stays free
    logged = tracking.log_onnx_model(store, run_id, ex.path, example, metadata={
        "class_names": list(run.data.data.class_names), "mean": list(MEAN), "std": list(STD),
        "input": "normalised float32 (N, 3, 32, 32): (pixel/255 - mean) / std",
        "val_accuracy": ev.val.accuracy, "test_accuracy": ev.test.accuracy,
        "served_tta": ex.tta, "preset": run.config.preset,
        "evaluated": "this ONNX file, by onnxruntime",
    }, metrics={k: v for k, v in metrics.items() if "." not in k}, params={
        "preset": run.config.preset, "model": run.config.model.name, "served_tta": ex.tta})
    store.client.set_tag(run_id, "served_tta", ex.tta)
    store.client.set_tag(run_id, "onnx_model_id", logged.model_id)
    store.client.set_tag(run_id, "onnx_model_uri", logged.model_uri)
    tta = (f"; with unserved {ev.tta} TTA: validation {100 * ev.tta_val.accuracy:.2f}%, test "
           f"{100 * ev.tta_test.accuracy:.2f}%" if ev.tta_val else "")
    get_run_logger().info("served ONNX model: validation %.2f%%, test %.2f%%%s",
                          100 * ev.val.accuracy, 100 * ev.test.accuracy, tta)
    int8 = _int8_twin(run, ex, ev, inputs, store, run_id, latency) if int8 else None
    return InMemory({"evaluation": ev, "summary": s, "latency_ms": latency, "logged": logged,
                     "int8": int8})


def _int8_twin(run: Any, ex: Any, ev: Any, inputs: Any, store: tracking.Store, run_id: str,
               fp32_latency_ms: dict[int, float]) -> Any:
    """`int8_twin` of a run trained in this flow run (`inputs`: its sets normalised, or None)."""
    return int8_twin(ex.path, ev.val, run.data.data, run.split, run.run_dir / "model_int8.onnx",
                     store, run_id, fp32_latency_ms, inputs)


@task(cache_policy=NO_CACHE, persist_result=False)
def register_model(trained: InMemory, exported: InMemory, evaluated: InMemory,
                   store: tracking.Store, run_id: str, min_shared_images: int,
                   min_significance: float | None, int8: Int8Twin = "champion") -> Any:
    """A new registry version; `champion` only if its ONNX model beats the champion's on their
    shared validation images (registry/champion.py). Publishes the comparison and model card.
    With `int8` "champion", a version that is promoted gets its int8 twin first."""
    from registry import champion

    run, ex, ev = trained.value, exported.value, evaluated.value
    logged = ev["logged"]

    def champion_twin() -> dict[str, str]:
        ev["int8"] = _int8_twin(run, ex, ev["evaluation"], None, store, run_id, ev["latency_ms"])
        return int8_version_tags(ev["int8"])
    done = champion.register(
        store, run_id, logged.model_uri, ex.path, run.data.data, tags={
            "val_accuracy": f"{ev['evaluation'].val.accuracy:.6f}",
            "test_accuracy": f"{ev['evaluation'].test.accuracy:.6f}",
            "preset": run.config.preset, "served_tta": ex.tta,
            "onnx_max_abs_diff": f"{ex.parity.max_abs_diff:.3e}",
            "parity_passed": str(ex.parity.passed).lower(), **int8_version_tags(ev["int8"]),
        }, min_shared_images=min_shared_images, min_significance=min_significance,
        model_id=logged.model_id,
        # evaluate_model has run this file over its validation split: reuse those classes.
        known=(run.split.val_idx, ev["evaluation"].val.predictions),
        champion_tags=champion_twin if int8 == "champion" else None,
        lock=locks.exclusive("registry", tracking.REGISTERED_MODEL))
    reg = done.registration
    logger = get_run_logger()
    logger.info("registered %s version %s as %s: %s", reg.name, reg.version, reg.alias,
                reg.reason)
    if int8 == "champion" and reg.alias != tracking.CHAMPION:
        logger.info("no int8 twin: only a champion gets one (int8=always builds it for every run)")
    if done.report_markdown:
        create_markdown_artifact(
            key="champion-vs-challenger", markdown=done.report_markdown + (
                f"\n\nHeat map and gallery: MLflow run `{run_id}`, artifacts "
                f"`{champion.REPORT_FOLDER}/`."),
            description=f"{reg.name} v{reg.version} vs champion v{reg.previous_champion}")
    create_markdown_artifact(key="model-card", markdown=done.model_card,
                             description=f"{reg.name} v{reg.version}")
    return done


# ---------------------------------------------------------------------------------------------
# Flow
# ---------------------------------------------------------------------------------------------

@flow(name="train-cifar", log_prints=True)
def train_cifar(preset: PresetName = DEFAULT_PRESET, data: DataOverrides | None = None,  # type: ignore[valid-type]
                model: ModelOverrides | None = None,  # type: ignore[valid-type]
                train: TrainOverrides | None = None,  # type: ignore[valid-type]
                root: str | None = None, skip_registry: bool = False,
                skip_bentoml: bool = False, mlflow_parent_run_id: str | None = None,
                mlflow_tags: dict[str, str] | None = None,
                min_shared_images: Annotated[int, Field(ge=1)] = MIN_SHARED_IMAGES,
                min_significance: Annotated[float, Field(gt=0, lt=1)] | None = None,
                int8: Int8Twin = "champion",
                ) -> dict[str, Any]:
    """Train a preset (with overrides), export it to ONNX, evaluate the exported file, register
    it (champion only if it beats the champion on their shared validation images, with McNemar's
    p below `min_significance` when set) and put the champion in the BentoML store. A sweep
    passes its MLflow run as `mlflow_parent_run_id` (the run is nested under it) and its tags.
    `int8`: which runs get an int8 twin (the service's int8 precision serves it): "champion"
    (the version promoted to champion, before the alias moves), "always" or "never"."""
    config = resolve_config(preset, data, model, train)
    # Pin the data source now, so the cache key and the MLflow params name the real source.
    config.data.source = resolve_source(config.data.source)
    root_dir = project_root(root)
    root_dir.mkdir(parents=True, exist_ok=True)
    store = tracking.open_store(root_dir)  # an unusable store fails here, before any training
    import_here = not (skip_registry or skip_bentoml) and serves_here(store)

    fetch = fetch_data.with_options(
        retries=config.data.download_retries,
        retry_delay_seconds=exponential_backoff(config.data.download_backoff_s)(
            config.data.download_retries) or 0)
    data_folder = fetch(config.data, str(root_dir))
    split = split_data(config.data, str(root_dir), data_folder)
    extra_tags = {**(mlflow_tags or {})}
    if mlflow_parent_run_id:
        extra_tags["mlflow.parentRunId"] = mlflow_parent_run_id
    run_id, run_dir = begin_run(store, config, root_dir, split, data_folder, extra_tags)
    evaluated, done = _train_to_registry(config, root_dir, run_dir, store, run_id, skip_registry,
                                         min_shared_images, min_significance, int8)
    # After the run is closed: a BentoML failure fails the flow but not the registered model.
    bento = import_champion(store, str(root_dir)) if import_here else None
    return _report(config, evaluated.value["summary"], done, store, run_id, bento)


def _train_to_registry(config: RunConfig, root_dir: Path, run_dir: Path, store: tracking.Store,
                       run_id: str, skip_registry: bool, min_shared_images: int,
                       min_significance: float | None, int8: Int8Twin) -> tuple[InMemory, Any]:
    """train -> export -> evaluate -> register inside the MLflow run, which ends FINISHED, or
    FAILED with the error on its `failure` tag."""
    done = None
    try:
        # (registration included: a champion's int8 twin is built in it)
        with tracking.system_metrics(store, run_id):
            trained = train_model(config, str(root_dir), str(run_dir), store, run_id)
            exported = export_model(trained, store, run_id)
            evaluated = evaluate_model(trained, exported, store, run_id,
                                       int8=int8 == "always")
            if not skip_registry:
                done = register_model(trained, exported, evaluated, store, run_id,
                                      min_shared_images, min_significance, int8)
    except BaseException as exc:
        store.client.set_tag(run_id, "failure", f"{type(exc).__name__}: {exc}"[:5000])
        tracking.end_run(store, run_id, "FAILED")
        raise
    tracking.end_run(store, run_id, "FINISHED")
    return evaluated, done


def _report(config: RunConfig, s: dict[str, Any], done: Any, store: tracking.Store, run_id: str,
            bento: dict[str, Any] | None) -> dict[str, Any]:
    """The summary artifact, the MLflow run's description, the closing lines; the flow's result."""
    summary = summary_markdown(config, s, done, store, run_id, bento)
    create_markdown_artifact(
        key="train-cifar-summary", markdown=summary,
        description=f"{config.preset}: validation {100 * s['val_accuracy']:.2f} % (served model)")
    # The MLflow run page shows this as the run's description.
    store.client.set_tag(run_id, "mlflow.note.content", summary.split("\n## Config")[0][:8000])
    reg = done.registration if done else None
    get_run_logger().info("%s", closing_line(config, s, store, run_id, reg, bento))
    return {
        "mlflow_run_id": run_id, "tracking_uri": tracking.display_uri(store.uri),
        "preset": config.preset, "val_accuracy": s["val_accuracy"],
        "test_accuracy": s["test_accuracy"], "tta_val_accuracy": s["tta_val_accuracy"],
        "train_seconds": s["train_seconds"], "parity": s["parity"],
        "registered_version": reg.version if reg else None, "alias": reg.alias if reg else None,
        "promotion_reason": reg.reason if reg else None,
        "bento_tag": bento["tag"] if bento else None,
    }


if __name__ == "__main__":
    train_cifar()
