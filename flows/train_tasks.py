"""The tasks of `train-cifar` (flows/train_flow.py): thin wrappers over `cifarlab` that log to
MLflow through `registry`. Their results are handed on in memory within one flow run (never
persisted): the trained run, its export, its evaluation and the registration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from cifarlab.config import DataConfig, RunConfig
from flows import locks
from flows.int8 import int8_twin, int8_version_tags
from flows.reporting import duration
from registry import run_logging, tracking

if TYPE_CHECKING:
    from cifarlab.experiment import EvalInputs, Evaluation, Exported, TrainedRun
    from cifarlab.quantize import Int8Report
    from registry.champion import Registered
    from registry.run_logging import LoggedOnnx

# Which runs get an int8 twin (cifarlab/quantize.py): "champion", a run whose version becomes
# the champion (the one model that is served), built before the alias moves; "always", every
# run (its int8 figures on the run, and on its version if it is registered); "never".
Int8Twin = Literal["champion", "always", "never"]


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

    folder = prepare_cifar10(
        Path(root) / "data", data.source, checksums=checksums_of(data), retries=0
    )
    get_run_logger().info("CIFAR-10 verified in %s", folder)
    return str(folder)


@task(cache_policy=NO_CACHE, persist_result=False)
def split_data(data: DataConfig, root: str, data_folder: str) -> dict[str, str]:
    """The seeded stratified split (milliseconds), written as index files."""
    from cifarlab.arrays import load_cifar10
    from cifarlab.data import data_fingerprint
    from cifarlab.experiment import DataBundle, array_cache, checksums_of, make_split

    # fetch_data has just verified this folder; the arrays (memory-mapped from the root's
    # cache after the first run) stay with the process for the training task of this flow run.
    bundle = DataBundle(
        folder=Path(data_folder),
        data=load_cifar10(Path(data_folder), array_cache(Path(root))),
        fingerprint=data_fingerprint(checksums_of(data)),
    )
    split, split_dir = make_split(data, bundle, Path(root))
    get_run_logger().info(
        "split %s: %d train / %d validation images",
        split.digest[:12],
        len(split.train_idx),
        len(split.val_idx),
    )
    return {"dir": str(split_dir), "sha256": split.digest}


@dataclass
class Evaluated:
    """What evaluate_model hands on to registration and the summary (in memory, never
    persisted): the served file's evaluation, the summary figures, its onnxruntime latency by
    batch size, the LoggedModel it was logged as, and its int8 twin (once built)."""

    evaluation: Evaluation
    summary: dict[str, Any]
    latency_ms: dict[int, float]
    logged: LoggedOnnx
    int8: Int8Report | None = None


class EpochLog:
    """train_model's hook after each epoch: its metrics to MLflow (once: a resumed run's epochs
    already there are skipped), a log line with the training time left, the progress artifact
    the Prefect UI shows."""

    def __init__(self, config: RunConfig, store: tracking.Store, run_id: str) -> None:
        self.config, self.store, self.run_id = config, store, run_id
        self.logged = {m.step for m in store.client.get_metric_history(run_id, "val_loss")}
        self.total = config.train.epochs
        self.progress = create_progress_artifact(
            100.0 * len(self.logged) / self.total,
            description=f"{config.preset}: epochs trained of {self.total}",
        )

    def __call__(self, m: Any, _model: Any = None) -> None:
        if m.epoch in self.logged:
            return
        metrics = {
            "train_loss": m.train_loss, "train_accuracy": m.train_accuracy,
            "val_loss": m.val_loss, "val_accuracy": m.val_accuracy, "lr": m.lr,
            "epoch_seconds": m.epoch_seconds, "images_per_second": m.images_per_second,
            # (neither is recorded in checkpoints from before them)
            "val_images": m.val_images or None, "val_seconds": m.val_seconds or None,
        }  # fmt: skip
        tracking.log_metrics(self.store, self.run_id, metrics, step=m.epoch)
        self.logged.add(m.epoch)
        left = (self.total - m.epoch) * m.train_seconds / m.epoch
        get_run_logger().info(
            "epoch %d/%d: train loss %.3f acc %.2f%% | val%s loss %.3f acc %.2f%% | "
            "%.1f s, about %s of training left",
            m.epoch, self.total, m.train_loss, 100 * m.train_accuracy,
            m.val_subset_note(self.config.data.val_size), m.val_loss, 100 * m.val_accuracy,
            m.epoch_seconds, duration(left),
        )  # fmt: skip
        update_progress_artifact(cast(UUID, self.progress), 100.0 * m.epoch / self.total)


@task(cache_policy=NO_CACHE, persist_result=False)
def train_model(
    config: RunConfig, root: str, run_dir: str, store: tracking.Store, run_id: str
) -> TrainedRun:
    """Train (resuming from the run folder's checkpoint) and log every epoch."""
    from cifarlab.experiment import train_run

    log_epoch = EpochLog(config, store, run_id)
    # The fetch task verified the data and owns the retries: none here.
    run = train_run(
        config, Path(root), hooks=[log_epoch], run_dir=Path(run_dir), download_retries=0
    )
    t = run.trained
    # An epoch checkpointed just before a kill was not logged then: it is in the checkpoint's
    # history, so log it now.
    for m in t.history:
        log_epoch(m, None)
    tracking.log_metrics(
        store, run_id, {"train_seconds": t.train_seconds, "epochs_completed": t.epochs_completed}
    )
    tracking.log_files(store, run_id, {k: v for k, v in run.files.items() if k != "split"})
    tracking.log_json(store, run_id, "resolved_config.json", config.model_dump(mode="json"))
    run_logging.log_datasets(store, run_id, run)
    return run


@task(cache_policy=NO_CACHE, persist_result=False)
def export_model(run: TrainedRun, store: tracking.Store, run_id: str) -> Exported:
    """Export the model that will be served to ONNX and require parity with PyTorch."""
    from cifarlab.experiment import export_run
    from cifarlab.export import require_parity

    exported = export_run(run, require=False)
    report = exported.parity
    tracking.log_metrics(
        store,
        run_id,
        {
            "onnx_max_abs_diff": report.max_abs_diff,
            "onnx_argmax_agreement": report.argmax_agreement,
        },
    )
    require_parity(report)  # a failed check fails the run: nothing is registered
    get_run_logger().info(
        "ONNX parity: max |diff| %.2e, same class on %.2f%% of %d images (TTA in the graph: %s)",
        report.max_abs_diff,
        100 * report.argmax_agreement,
        report.images,
        exported.tta,
    )
    return exported


@task(cache_policy=NO_CACHE, persist_result=False)
def evaluate_model(
    run: TrainedRun, ex: Exported, store: tracking.Store, run_id: str, int8: bool = True
) -> Evaluated:
    """Validation and test accuracy of the exported file (onnxruntime), latency, plots; the
    unserved TTA figure apart. Logs the ONNX model (with its metrics) to MLflow. `int8`: build
    the int8 twin here (train_cifar's int8="always")."""

    from cifarlab.experiment import eval_inputs, evaluate_run, summarise, write_results
    from cifarlab.export import onnx_latency_ms
    from registry import predictions

    inputs = eval_inputs(run)  # normalised once for the served file and its int8 twin
    ev = evaluate_run(run, ex, inputs)
    write_results(run, ex, ev)
    s = summarise(run, ex, ev)
    latency = onnx_latency_ms(ex.path)
    metrics = _eval_metrics(ev, s, latency)
    # Per-class figures on the run; the headline ones go with the logged model (below), which
    # links them to it and records them on the run too.
    tracking.log_metrics(store, run_id, {k: v for k, v in metrics.items() if "." in k})
    tracking.log_files(store, run_id, {k: run.files[k] for k in ("confusion_matrix", "results")})
    # What this file answers on the validation images: a later champion comparison with this
    # model reads them instead of running it again.
    predictions.record_predictions(store, run_id, ex.path, run.split.val_idx, ev.val.predictions)
    logged = _log_served_model(run, ex, ev, inputs, store, run_id, metrics)
    if ev.ood is not None:
        from cifarlab.drift import reference

        run_logging.log_ood_reference(store, run_id, ev.ood)
        assert ev.val.logits is not None  # (evaluate_onnx keeps them)
        run_logging.log_reference(store, run_id, reference(ev.val.logits, inputs.val, ev.ood))
    store.client.set_tag(run_id, "served_tta", ex.tta)
    store.client.set_tag(run_id, "onnx_model_id", logged.model_id)
    store.client.set_tag(run_id, "onnx_model_uri", logged.model_uri)
    tta = (f"; with unserved {ev.tta} TTA: validation {100 * ev.tta_val.accuracy:.2f}%, test "
           f"{100 * ev.tta_test.accuracy:.2f}%" if ev.tta_val and ev.tta_test else "")  # fmt: skip
    get_run_logger().info("served ONNX model: validation %.2f%%, test %.2f%%%s",
                          100 * ev.val.accuracy, 100 * ev.test.accuracy, tta)  # fmt: skip
    twin = _int8_twin(run, ex, ev, inputs, store, run_id, latency) if int8 else None
    return Evaluated(ev, s, latency, logged, twin)


def _eval_metrics(ev: Evaluation, s: dict[str, Any], latency: dict[int, float]) -> dict[str, Any]:
    """The served file's figures as MLflow metrics (per class with a dot in the name)."""
    return {
        "final_val_accuracy": ev.val.accuracy,
        "final_val_loss": ev.val.loss,
        "test_accuracy": ev.test.accuracy,
        "test_loss": ev.test.loss,
        "tta_val_accuracy": ev.tta_val.accuracy if ev.tta_val else None,
        "tta_test_accuracy": ev.tta_test.accuracy if ev.tta_test else None,
        **{f"val_accuracy.{k}": v for k, v in s["val_per_class_accuracy"].items()},
        **{f"test_accuracy.{k}": v for k, v in s["test_per_class_accuracy"].items()},
        **{f"onnx_latency_ms_batch{b}": ms for b, ms in latency.items()},
    }


def _log_served_model(
    run: TrainedRun,
    ex: Exported,
    ev: Evaluation,
    inputs: EvalInputs,
    store: tracking.Store,
    run_id: str,
    metrics: dict[str, Any],
) -> LoggedOnnx:
    """The weights as an artifact, and the served ONNX file as the run's LoggedModel with its
    headline metrics (the registry's versions point at it)."""
    import torch

    from cifarlab.constants import MEAN, STD

    weights = run.run_dir / "weights.pt"
    torch.save(run.trained.model.state_dict(), weights)
    tracking.log_files(store, run_id, {"weights": weights})
    metadata = {
        "class_names": list(run.data.data.class_names), "mean": list(MEAN), "std": list(STD),
        "input": "normalised float32 (N, 3, 32, 32): (pixel/255 - mean) / std",
        "val_accuracy": ev.val.accuracy, "test_accuracy": ev.test.accuracy,
        "served_tta": ex.tta, "preset": run.config.preset,
        "evaluated": "this ONNX file, by onnxruntime",
    }  # fmt: skip
    return run_logging.log_onnx_model(
        store, run_id, ex.path, inputs.val[:2],  # batch 2: the axis stays free
        metadata=metadata, metrics={k: v for k, v in metrics.items() if "." not in k},
        params={"preset": run.config.preset, "model": run.config.model.name, "served_tta": ex.tta},
    )  # fmt: skip


def _int8_twin(
    run: TrainedRun,
    ex: Exported,
    ev: Evaluation,
    inputs: EvalInputs | None,
    store: tracking.Store,
    run_id: str,
    fp32_latency_ms: dict[int, float],
) -> Int8Report | None:
    """`int8_twin` of a run trained in this flow run (`inputs`: its sets normalised, or None)."""
    return int8_twin(
        ex.path,
        ev.val,
        run.data.data,
        run.split,
        run.run_dir / "model_int8.onnx",
        store,
        run_id,
        fp32_latency_ms,
        inputs,
    )


@task(cache_policy=NO_CACHE, persist_result=False)
def register_model(
    run: TrainedRun,
    ex: Exported,
    evaluated: Evaluated,
    store: tracking.Store,
    run_id: str,
    min_shared_images: int,
    min_significance: float | None,
    int8: Int8Twin = "champion",
) -> Registered:
    """A new registry version; `champion` only if its ONNX model beats the champion's on their
    shared validation images (registry/champion.py). Publishes the comparison and model card.
    With `int8` "champion", a version that is promoted gets its int8 twin first."""
    from registry import champion

    ev = evaluated

    def champion_twin() -> dict[str, str]:
        ev.int8 = _int8_twin(run, ex, ev.evaluation, None, store, run_id, ev.latency_ms)
        return int8_version_tags(ev.int8)

    done = champion.register(
        store,
        run_id,
        ev.logged.model_uri,
        ex.path,
        run.data.data,
        tags={
            "val_accuracy": f"{ev.evaluation.val.accuracy:.6f}",
            "test_accuracy": f"{ev.evaluation.test.accuracy:.6f}",
            "preset": run.config.preset,
            "served_tta": ex.tta,
            "onnx_max_abs_diff": f"{ex.parity.max_abs_diff:.3e}",
            "parity_passed": str(ex.parity.passed).lower(),
            **int8_version_tags(ev.int8),
            **run_logging.ood_tags(store.client.get_run(run_id).data.tags),
        },
        min_shared_images=min_shared_images,
        min_significance=min_significance,
        model_id=ev.logged.model_id,
        # evaluate_model has run this file over its validation split: reuse those classes.
        known=(run.split.val_idx, ev.evaluation.val.predictions),
        champion_tags=champion_twin if int8 == "champion" else None,
        lock=locks.exclusive("registry", tracking.REGISTERED_MODEL),
    )
    reg = done.registration
    logger = get_run_logger()
    logger.info("registered %s version %s as %s: %s", reg.name, reg.version, reg.alias, reg.reason)
    if int8 == "champion" and reg.alias != tracking.CHAMPION:
        logger.info("no int8 twin: only a champion gets one (int8=always builds it for every run)")
    _registration_artifacts(done, run_id)
    return done


def _registration_artifacts(done: Registered, run_id: str) -> None:
    """The comparison report and the model card as Prefect markdown artifacts of the flow run."""
    from registry.champion import REPORT_FOLDER

    reg = done.registration
    if done.report_markdown:
        create_markdown_artifact(
            key="champion-vs-challenger",
            markdown=done.report_markdown + f"\n\nHeat map and gallery: MLflow run `{run_id}`, "
            f"artifacts `{REPORT_FOLDER}/`.",
            description=f"{reg.name} v{reg.version} vs champion v{reg.previous_champion}",
        )
    create_markdown_artifact(
        key="model-card", markdown=done.model_card, description=f"{reg.name} v{reg.version}"
    )
