"""The `train-cifar` flow: download -> split -> train -> evaluate -> export ONNX -> register.

Tasks are thin wrappers over `cifarlab`; MLflow calls go through `flows.tracking`. One MLflow run
per training run; a run interrupted mid-training is resumed (same config, same checkpoint) by the
next flow run of that config, and is never registered from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.tasks import exponential_backoff

from cifarlab.config import DataConfig, RunConfig
from cifarlab.data import resolve_source
from flows import tracking
from flows.params import DataOverrides, ModelOverrides, PresetName, TrainOverrides, resolve_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARITY_IMAGES = 1000  # validation images the ONNX export is checked on


def project_root(root: str | None) -> Path:
    """The folder a run writes under: the argument, else $CIFAR_ROOT, else the project folder."""
    return Path(root or os.environ.get("CIFAR_ROOT") or PROJECT_ROOT).resolve()


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=5))
def fetch_data(data: DataConfig, root: str) -> str:
    """Download (or find) and verify CIFAR-10; cached across flow runs by source and root."""
    from cifarlab.experiment import load_data

    bundle = load_data(data, Path(root))
    get_run_logger().info("CIFAR-10 verified in %s (fingerprint %s)", bundle.folder,
                          bundle.fingerprint)
    return str(bundle.folder)


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def split_data(data: DataConfig, root: str, data_folder: str) -> dict[str, str]:
    """The seeded stratified split, written as index files; cached across flow runs."""
    from cifarlab.data import OFFICIAL_FILE_MD5, data_fingerprint, load_cifar10
    from cifarlab.experiment import DataBundle, make_split

    # fetch_data has just verified this folder: read it without hashing every file again.
    bundle = DataBundle(folder=Path(data_folder), data=load_cifar10(Path(data_folder)),
                        fingerprint=data_fingerprint(data.checksums or OFFICIAL_FILE_MD5))
    split, split_dir = make_split(data, bundle, Path(root))
    get_run_logger().info("split %s: %d train / %d validation images", split.digest[:12],
                          len(split.train_idx), len(split.val_idx))
    return {"dir": str(split_dir), "sha256": split.digest}


@dataclass
class Trained:
    """In-memory hand-over from training to evaluation and export (never persisted)."""

    outcome: Any  # cifarlab.experiment.RunOutcome


@task(tags=["gpu"], cache_policy=NO_CACHE, persist_result=False)
def train_and_evaluate(config: RunConfig, root: str, run_dir: str, store: tracking.Store,
                       run_id: str) -> Trained:
    """Train (resuming from the run folder's checkpoint), log every epoch, evaluate val/test."""
    from cifarlab.experiment import run_experiment

    logger = get_run_logger()

    def log_epoch(m, _model) -> None:
        tracking.log_metrics(store, run_id, {
            "train_loss": m.train_loss, "train_accuracy": m.train_accuracy,
            "val_loss": m.val_loss, "val_accuracy": m.val_accuracy, "lr": m.lr,
            "epoch_seconds": m.epoch_seconds, "images_per_second": m.images_per_second,
        }, step=m.epoch)
        logger.info("epoch %d: train loss %.3f acc %.2f%% | val loss %.3f acc %.2f%% | %.1f s",
                    m.epoch, m.train_loss, 100 * m.train_accuracy, m.val_loss,
                    100 * m.val_accuracy, m.epoch_seconds)

    outcome = run_experiment(config, Path(root), hooks=[log_epoch], run_dir=Path(run_dir))
    s = outcome.summary()
    tracking.log_metrics(store, run_id, {
        "final_val_accuracy": s["val_accuracy"], "final_val_loss": s["val_loss"],
        "test_accuracy": s["test_accuracy"], "test_loss": s["test_loss"],
        "train_seconds": s["train_seconds"], "epochs_completed": s["epochs_completed"],
        **{f"test_accuracy.{k}": v for k, v in s["test_per_class_accuracy"].items()},
    })
    tracking.log_files(store, run_id, {k: v for k, v in outcome.files.items() if k != "split"})
    tracking.log_json(store, run_id, "resolved_config.json", config.model_dump(mode="json"))
    logger.info("validation %.2f%%, test %.2f%% (TTA %s)", 100 * s["val_accuracy"],
                100 * s["test_accuracy"], s["tta"])
    return Trained(outcome)


@task(cache_policy=NO_CACHE, persist_result=False)
def export_onnx_checked(trained: Trained, store: tracking.Store, run_id: str) -> dict[str, Any]:
    """Export to ONNX, compare with PyTorch on validation images; a mismatch fails the run."""
    import torch

    from cifarlab.constants import MEAN, STD
    from cifarlab.export import check_parity, export_onnx, onnx_latency_ms, require_parity
    from cifarlab.tensors import normalize

    o = trained.outcome
    path = export_onnx(o.trained.model, o.run_dir / "model.onnx")
    val_images = o.data.data.train_images[o.split.val_idx[:PARITY_IMAGES]]
    report = check_parity(o.trained.model, path, val_images)
    tracking.log_metrics(store, run_id, {"onnx_max_abs_diff": report.max_abs_diff,
                                         "onnx_argmax_agreement": report.argmax_agreement})
    require_parity(report)
    latency = onnx_latency_ms(path)
    tracking.log_metrics(store, run_id, {f"onnx_latency_ms_batch{b}": ms
                                         for b, ms in latency.items()})
    weights = o.run_dir / "weights.pt"
    torch.save(o.trained.model.state_dict(), weights)
    tracking.log_files(store, run_id, {"weights": weights})
    example = normalize(val_images[:2], torch.device("cpu")).numpy()  # batch 2: batch axis stays free
    model_uri = tracking.log_onnx_model(store, run_id, path, example, metadata={
        "class_names": list(o.data.data.class_names), "mean": list(MEAN), "std": list(STD),
        "input": "normalised float32 (N, 3, 32, 32): (pixel/255 - mean) / std",
        "val_accuracy": o.val.accuracy, "test_accuracy": o.test.accuracy,
        "preset": o.config.preset,
    })
    get_run_logger().info("ONNX parity: max |diff| %.2e, same class on %.2f%% of %d images",
                          report.max_abs_diff, 100 * report.argmax_agreement, report.images)
    return {"path": str(path), "model_uri": model_uri, "parity": report.as_dict(),
            "latency_ms": latency}


@task(cache_policy=NO_CACHE, persist_result=False)
def register_model(trained: Trained, exported: dict[str, Any], store: tracking.Store,
                   run_id: str) -> tracking.Registration:
    """New registry version; champion only if it beats the champion on validation accuracy."""
    o = trained.outcome
    reg = tracking.register(store, run_id, exported["model_uri"], o.val.accuracy, tags={
        "test_accuracy": f"{o.test.accuracy:.6f}", "preset": o.config.preset,
        "onnx_max_abs_diff": f"{exported['parity']['max_abs_diff']:.3e}",
        "parity_passed": str(exported["parity"]["passed"]).lower(),
    })
    get_run_logger().info("registered %s version %s as %s (previous champion: %s at %s)",
                          reg.name, reg.version, reg.alias, reg.previous_champion,
                          reg.previous_champion_val_accuracy)
    return reg


@task(cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=2)
def publish_champion(store: tracking.Store, root: str) -> dict[str, Any]:
    """Copy the registry's champion into the BentoML model store (a no-op when it is already the
    newest model there), so that `bentoml serve` / `bentoml build` pick it up."""
    from serving.champion import bentoml_home, import_champion

    home = bentoml_home(Path(root))
    result = import_champion(store.uri, home)
    get_run_logger().info("BentoML store %s: %s = %s v%s (%s)", home, result.tag,
                          result.registered_model, result.version,
                          "imported" if result.created else "already the newest")
    return {"tag": result.tag, "version": result.version, "created": result.created,
            "bentoml_home": str(home)}


# ---------------------------------------------------------------------------------------------
# Flow
# ---------------------------------------------------------------------------------------------

def _flow_run_alive(flow_run_id: str) -> bool:
    """False only when Prefect knows this flow run and it has ended."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return not client.read_flow_run(flow_run_id).state.is_final()
    except Exception:  # unknown to this Prefect API: not ours to judge
        return True


def _begin_run(store: tracking.Store, config: RunConfig, root: Path, split: dict[str, str],
               data_folder: str, extra_tags: dict[str, str] | None = None) -> tuple[str, Path]:
    """Resume this config's unfinished MLflow run, or start one; returns (run id, run folder)."""
    from prefect.runtime import flow_run

    from cifarlab.data import OFFICIAL_FILE_MD5, data_fingerprint
    from cifarlab.experiment import config_hash
    from cifarlab.tensors import resolve_device

    chash = config_hash(config)
    tags = {
        "prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
        "config_hash": chash, "preset": config.preset, "model": config.model.name,
        "code_version": tracking.code_version(PROJECT_ROOT), "split_sha256": split["sha256"],
        "data_fingerprint": data_fingerprint(config.data.checksums or OFFICIAL_FILE_MD5),
        "data_folder": data_folder, "device": str(resolve_device(config.train.device)),
        **(extra_tags or {}),
    }
    resume = tracking.find_resumable_run(store, chash)
    params = tracking.flatten("", config.model_dump(mode="json"))
    run_id = tracking.start_run(store, f"{config.preset}-{chash}", params, tags, resume)
    if resume is not None and resume.data.tags.get("run_dir"):
        run_dir = Path(resume.data.tags["run_dir"])
        get_run_logger().info("resuming MLflow run %s from %s", run_id, run_dir)
    else:
        run_dir = root / "runs" / f"{config.preset}-{chash}-{run_id[:8]}"
        store.client.set_tag(run_id, "run_dir", str(run_dir))
    return run_id, run_dir


def _summary_markdown(config: RunConfig, trained: Trained, exported: dict[str, Any] | None,
                      reg: tracking.Registration | None, store: tracking.Store,
                      run_id: str, bento: dict[str, Any] | None = None) -> str:
    s = trained.outcome.summary()
    rows = "\n".join(f"| {k} | {100 * v:.2f} % |" for k, v in s["test_per_class_accuracy"].items())
    parity = exported["parity"] if exported else None
    lines = [
        f"# train-cifar: {config.preset} ({config.model.name})",
        "",
        "| | |", "|---|---|",
        f"| validation accuracy | **{100 * s['val_accuracy']:.2f} %** |",
        f"| test accuracy (reported, not used to choose) | {100 * s['test_accuracy']:.2f} % |",
        f"| epochs / training time | {s['epochs_completed']} / {s['train_seconds']:.1f} s on {s['device']} |",
        f"| ONNX parity | max abs diff {parity['max_abs_diff']:.2e}, same class "
        f"{100 * parity['argmax_agreement']:.2f} % |" if parity else "| ONNX parity | not run |",
        f"| registry | {reg.name} v{reg.version} -> `{reg.alias}` |" if reg else
        "| registry | not registered |",
        f"| BentoML store | `{bento['tag']}` (v{bento['version']}, the champion) |" if bento else
        "| BentoML store | not updated |",
        f"| MLflow | run `{run_id}` in `{store.uri}` |",
        f"| split | `{s['split_sha256'][:16]}` ({s['trained_on']}) |",
        "", "## Per-class test accuracy", "", "| class | accuracy |", "|---|---|", rows,
        "", "## Config", "", "```json", config.model_dump_json(indent=2), "```",
    ]
    return "\n".join(lines)


@flow(name="train-cifar", log_prints=True)
def train_cifar(preset: PresetName = "fast", data: DataOverrides | None = None,  # type: ignore[valid-type]
                model: ModelOverrides | None = None,  # type: ignore[valid-type]
                train: TrainOverrides | None = None,  # type: ignore[valid-type]
                root: str | None = None, skip_registry: bool = False,
                skip_bentoml: bool = False, mlflow_parent_run_id: str | None = None,
                mlflow_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train a preset (with overrides), track it in MLflow, export to ONNX, register it, and put
    the champion in the BentoML store. A sweep passes its MLflow run as `mlflow_parent_run_id`
    (the run is nested under it) and its own tags."""
    config = resolve_config(preset, data, model, train)
    # Pin the data source now, so the cache key and the MLflow params name the real source.
    config.data.source = resolve_source(config.data.source)
    root_dir = project_root(root)
    root_dir.mkdir(parents=True, exist_ok=True)
    store = tracking.open_store(root_dir)  # an unusable store fails here, before any training
    tracking.fail_stale_runs(store, _flow_run_alive)

    data_folder = fetch_data(config.data, str(root_dir))
    split = split_data(config.data, str(root_dir), data_folder)
    extra_tags = {**(mlflow_tags or {})}
    if mlflow_parent_run_id:
        extra_tags["mlflow.parentRunId"] = mlflow_parent_run_id
    run_id, run_dir = _begin_run(store, config, root_dir, split, data_folder, extra_tags)
    exported = reg = None
    try:
        trained = train_and_evaluate(config, str(root_dir), str(run_dir), store, run_id)
        exported = export_onnx_checked(trained, store, run_id)
        if not skip_registry:
            reg = register_model(trained, exported, store, run_id)
    except BaseException as exc:
        store.client.set_tag(run_id, "failure", f"{type(exc).__name__}: {exc}"[:5000])
        tracking.end_run(store, run_id, "FAILED")
        raise
    tracking.end_run(store, run_id, "FINISHED")
    # After the run is closed: a BentoML failure fails the flow but not the registered model.
    bento = None if skip_registry or skip_bentoml else publish_champion(store, str(root_dir))

    create_markdown_artifact(
        key="train-cifar-summary",
        markdown=_summary_markdown(config, trained, exported, reg, store, run_id, bento),
        description=f"{config.preset}: validation {100 * trained.outcome.val.accuracy:.2f} %")
    s = trained.outcome.summary()
    return {
        "mlflow_run_id": run_id, "tracking_uri": store.uri, "preset": config.preset,
        "val_accuracy": s["val_accuracy"], "test_accuracy": s["test_accuracy"],
        "train_seconds": s["train_seconds"], "parity": exported["parity"],
        "registered_version": reg.version if reg else None, "alias": reg.alias if reg else None,
        "bento_tag": bento["tag"] if bento else None,
    }


if __name__ == "__main__":
    train_cifar()
