"""The `train-cifar` flow: download -> split -> train -> export ONNX -> evaluate it -> register.

Tasks are thin wrappers over `cifarlab`; MLflow calls go through `flows.tracking`. One MLflow run
per training run; a run interrupted mid-training is resumed (same config, same checkpoint) by the
next flow run of that config, and is never registered from. Evaluation measures the exported
ONNX file (the one the endpoint serves), so it follows the export: the accuracy that goes on the
registry version, into the champion rule and into the endpoint's answers is the served model's.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
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
from flows import locks, tracking
from flows.champion import MIN_SHARED_IMAGES
from flows.params import DataOverrides, ModelOverrides, PresetName, TrainOverrides, resolve_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Which runs get an int8 twin (cifarlab/quantize.py): "champion", a run whose version becomes
# the champion (the one model that is served), built before the alias moves; "always", every
# run (its int8 figures on the run, and on its version if it is registered); "never".
Int8Twin = Literal["champion", "always", "never"]


def project_root(root: str | None) -> Path:
    """The folder a run writes under: the argument, else $CIFAR_ROOT, else the project folder."""
    return Path(root or os.environ.get("CIFAR_ROOT") or PROJECT_ROOT).resolve()


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
    from cifarlab.data import data_fingerprint, load_cifar10
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


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


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
                    100 * m.val_accuracy, m.epoch_seconds, _duration(left))
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
    from flows import champion

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


def int8_twin(onnx_path: Path, fp32_val: Any, data: Any, split: Any, out_path: Path,
              store: tracking.Store, run_id: str,
              fp32_latency_ms: dict[int, float] | None = None, inputs: Any = None) -> Any:
    """The statically quantised copy of the served file `onnx_path` (cifarlab/quantize.py),
    calibrated on the split's training images, evaluated on its validation images and the test
    set (`inputs`: both normalised, cifarlab.experiment.EvalInputs, or None to make them) and
    timed beside it (`fp32_val`: the file's own validation result), logged to MLflow run
    `run_id` as `int8/model_int8.onnx` with its figures; None (with a warning) if onnxruntime
    cannot quantise this graph: the fp32 model is what counts."""
    from cifarlab.experiment import split_inputs
    from cifarlab.quantize import MAX_DROP, build_int8, calibration_set

    inputs = inputs or split_inputs(data, split)
    try:
        report = build_int8(onnx_path, fp32_val, calibration_set(data.train_images, split.train_idx),
                            inputs.val, data.train_labels[split.val_idx], inputs.test,
                            data.test_labels, out_path, fp32_latency_ms)
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        get_run_logger().warning("no int8 model: onnxruntime could not quantise it (%s: %s)",
                                 type(exc).__name__, exc)
        return None
    tracking.log_metrics(store, run_id, {
        "int8_val_accuracy": report.val.accuracy, "int8_test_accuracy": report.test.accuracy,
        "int8_val_drop": report.val_drop,
        **{f"int8_latency_ms_batch{b}": ms for b, ms in report.latency_ms.items()}})
    tracking.log_files(store, run_id, {"model_int8": report.path}, folder="int8")
    store.client.set_tag(run_id, "int8_servable", str(report.servable).lower())
    store.client.set_tag(run_id, "int8_judged_with_dot_product",
                         tracking.bool_tag(report.judged_with_dot_product))
    store.client.set_tag(run_id, "int8_weight_bits", str(report.weight_bits))
    get_run_logger().info(
        "int8 model: validation %.2f%% (%+.2f points vs fp32; servable if within %.1f: %s), "
        "test %.2f%%, %.3f ms vs %.3f ms at batch 1", 100 * report.val.accuracy,
        -100 * report.val_drop, 100 * MAX_DROP, "yes" if report.servable else "no",
        100 * report.test.accuracy, report.latency_ms[1], report.fp32_latency_ms[1])
    return report


def int8_version_tags(report: Any) -> dict[str, str]:
    """An int8 twin's figures as registry version tags (none without a twin)."""
    if report is None:
        return {}
    return {"int8_val_accuracy": f"{report.val.accuracy:.6f}",
            "int8_test_accuracy": f"{report.test.accuracy:.6f}",
            "int8_servable": str(report.servable).lower(),
            "int8_judged_with_dot_product": tracking.bool_tag(report.judged_with_dot_product)}


@task(cache_policy=NO_CACHE, persist_result=False)
def register_model(trained: InMemory, exported: InMemory, evaluated: InMemory,
                   store: tracking.Store, run_id: str, min_shared_images: int,
                   min_significance: float | None, int8: Int8Twin = "champion") -> Any:
    """A new registry version; `champion` only if its ONNX model beats the champion's on their
    shared validation images (flows/champion.py). Publishes the comparison and model card.
    With `int8` "champion", a version that is promoted gets its int8 twin first."""
    from flows import champion

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
        champion_tags=champion_twin if int8 == "champion" else None)
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


def serves_here(store: tracking.Store) -> bool:
    """Whether this host fills a BentoML store with the champion: $CIFAR_PUBLISH_BENTOML
    (true/false) when set; else yes with a local tracking store (one machine does everything)
    and no with a tracking server (serving hosts import the champion from it themselves)."""
    setting = os.environ.get("CIFAR_PUBLISH_BENTOML", "").strip().lower()
    if setting in ("1", "true", "yes"):
        return True
    if setting in ("0", "false", "no"):
        return False
    if setting:
        raise ValueError(f"CIFAR_PUBLISH_BENTOML={setting!r}: expected true or false")
    return not store.uri.startswith(("http://", "https://"))


@task(cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=2)
def publish_champion(store: tracking.Store, root: str) -> dict[str, Any]:
    """Copy the registry's champion into the BentoML model store (a no-op when it is already the
    newest model there), so that `bentoml serve` / `bentoml build` pick it up."""
    from flows.publish import bentoml_home, import_champion

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

def crash_flow_run(flow_run_id: str, reason: str, run_count: str | None = None) -> None:
    """End a flow run whose process is gone (its worker was killed): Crashed, not Running
    for ever. `run_count` is the attempt that process ran: a later attempt (a retry started
    elsewhere) is left alone."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            found = client.read_flow_run(flow_run_id)
            if run_count is not None and str(found.run_count) != str(run_count):
                return
            if not found.state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
    except Exception as exc:  # noqa: BLE001 - unknown to this API: nothing to end here
        logging.getLogger(__name__).warning("could not mark flow run %s crashed: %s",
                                            flow_run_id, exc)


def flow_run_alive(flow_run_id: str) -> bool:
    """False only when Prefect knows this flow run and it has ended."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return not client.read_flow_run(flow_run_id).state.is_final()
    except Exception:  # unknown to this Prefect API: not ours to judge
        return True


def _user() -> str:
    """Who runs this: the login name, or the uid where the container has no passwd entry."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


def _begin_run(store: tracking.Store, config: RunConfig, root: Path, split: dict[str, str],
               data_folder: str, extra_tags: dict[str, str] | None = None) -> tuple[str, Path]:
    """Resume this config's unfinished MLflow run, or start one; returns (run id, run folder)."""
    from prefect.runtime import flow_run

    from cifarlab.data import data_fingerprint
    from cifarlab.experiment import checksums_of, config_hash
    from cifarlab.tensors import resolve_device

    chash = config_hash(config)
    code = tracking.code_version(PROJECT_ROOT)
    tags = {
        "prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
        "prefect.flow_run_count": str(flow_run.run_count), "config_hash": chash, "preset": config.preset, "model": config.model.name,
        "code_version": code, "split_sha256": split["sha256"],
        "data_fingerprint": data_fingerprint(checksums_of(config.data)),
        "data_folder": data_folder, "device": str(resolve_device(config.train.device)),
        # What the MLflow UI shows as the run's source, user and git commit.
        "mlflow.source.type": "JOB", "mlflow.source.name": "flows/train_flow.py:train_cifar",
        "mlflow.source.git.commit": code.removesuffix("-dirty"),
        "mlflow.source.git.dirty": str(code.endswith("-dirty")).lower(),
        "mlflow.user": _user(), **tracking.process_tags(),
        **(extra_tags or {}),
    }
    params = tracking.flatten("", config.model_dump(mode="json"))
    # Claiming a run to resume is one step on every host: two flow runs of one config starting
    # together cannot both reopen it (the second sees it RUNNING, owned by the first).
    with locks.exclusive("resume", chash):
        # (the locks are not re-entrant: this config's is held already)
        tracking.fail_stale_runs(store, flow_run_alive, crash_flow_run, claim_lock=lambda h: (
            contextlib.nullcontext() if h == chash else locks.exclusive("resume", h)))
        resume = tracking.find_resumable_run(store, chash)
        run_id = tracking.start_run(store, f"{config.preset}-{chash}", params, tags, resume)
    if resume is not None and resume.data.tags.get("run_dir") and \
            Path(resume.data.tags["run_dir"]).is_dir():
        run_dir = Path(resume.data.tags["run_dir"])
        get_run_logger().info("resuming MLflow run %s from %s", run_id, run_dir)
    else:
        run_dir = root / "runs" / f"{config.preset}-{chash}-{run_id[:8]}"
        store.client.set_tag(run_id, "run_dir", str(run_dir))
    return run_id, run_dir


def _closing_line(config: RunConfig, s: dict[str, Any], store: tracking.Store, run_id: str,
                  reg: Any, bento: dict[str, Any] | None) -> str:
    """What a person at the terminal wants at the end: how well, where to look, what next."""
    exp = store.experiment_id
    if store.uri.startswith(("http://", "https://")):
        where = f"{tracking.display_uri(store.uri)}/#/experiments/{exp}/runs/{run_id}"
    else:
        where = (f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id} "
                 "(after `make mlflow-ui`)")
    lines = [f"trained {config.preset} ({config.model.name}) in {s['train_seconds']:.0f} s: "
             f"validation {100 * s['val_accuracy']:.2f} %, test {100 * s['test_accuracy']:.2f} % "
             "(the served ONNX file)", f"MLflow run: {where}"]
    if reg is not None:
        lines.append(f"registry: {reg.name} version {reg.version} is {reg.alias} ({reg.reason})")
    if bento is not None:
        lines.append(f"serve it: make serve, then curl -F image=@cat.png "
                     f"http://127.0.0.1:3000/classify (BentoML model {bento['tag']})")
    elif reg is not None and reg.alias == tracking.CHAMPION:
        lines.append("serve it: cifar-import-champion, then make serve")
    return "\n".join(lines)


def _summary_markdown(config: RunConfig, summary: dict[str, Any], done: Any | None,
                      store: tracking.Store, run_id: str, bento: dict[str, Any] | None = None) -> str:
    s = summary
    rows = "\n".join(f"| {k} | {100 * s['val_per_class_accuracy'][k]:.2f} % | {100 * v:.2f} % |"
                     for k, v in s["test_per_class_accuracy"].items())
    parity = s["parity"]
    reg = done.registration if done else None
    tta = (f"| unserved {s['tta']} TTA (reported only) | validation "
           f"{100 * s['tta_val_accuracy']:.2f} %, test {100 * s['tta_test_accuracy']:.2f} % |"
           if s["tta_val_accuracy"] is not None else None)
    lines = [
        f"# train-cifar: {config.preset} ({config.model.name})",
        "",
        "Accuracies are those of the exported ONNX model, the file the endpoint serves "
        f"(TTA in its graph: {s['served_tta']}).",
        "",
        "| | |", "|---|---|",
        f"| validation accuracy | **{100 * s['val_accuracy']:.2f} %** ({s['val_images']} images) |",
        f"| test accuracy (reported, not used to choose) | {100 * s['test_accuracy']:.2f} % |",
        *([tta] if tta else []),
        f"| epochs / training time | {s['epochs_completed']} / {s['train_seconds']:.1f} s on {s['device']} |",
        f"| ONNX parity | max abs diff {parity['max_abs_diff']:.2e}, same class "
        f"{100 * parity['argmax_agreement']:.2f} % |",
        f"| registry | {reg.name} v{reg.version} -> `{reg.alias}`: {reg.reason} |" if reg else
        "| registry | not registered |",
        f"| BentoML store | `{bento['tag']}` (v{bento['version']}, the champion) |" if bento else
        "| BentoML store | not updated |",
        f"| MLflow | run `{run_id}` in `{tracking.display_uri(store.uri)}` |",
        f"| split | `{s['split_sha256'][:16]}` ({s['trained_on']}) |",
        "", "## Per-class accuracy", "", "| class | validation | test |", "|---|---|---|", rows,
        "", "## Config", "", "```json", config.model_dump_json(indent=2), "```",
    ]
    return "\n".join(lines)


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
    publish = not (skip_registry or skip_bentoml) and serves_here(store)

    fetch = fetch_data.with_options(
        retries=config.data.download_retries,
        retry_delay_seconds=exponential_backoff(config.data.download_backoff_s)(
            config.data.download_retries) or 0)
    data_folder = fetch(config.data, str(root_dir))
    split = split_data(config.data, str(root_dir), data_folder)
    extra_tags = {**(mlflow_tags or {})}
    if mlflow_parent_run_id:
        extra_tags["mlflow.parentRunId"] = mlflow_parent_run_id
    run_id, run_dir = _begin_run(store, config, root_dir, split, data_folder, extra_tags)
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
    # After the run is closed: a BentoML failure fails the flow but not the registered model.
    bento = publish_champion(store, str(root_dir)) if publish else None

    s = evaluated.value["summary"]
    summary = _summary_markdown(config, s, done, store, run_id, bento)
    create_markdown_artifact(
        key="train-cifar-summary", markdown=summary,
        description=f"{config.preset}: validation {100 * s['val_accuracy']:.2f} % (served model)")
    # The MLflow run page shows this as the run's description.
    store.client.set_tag(run_id, "mlflow.note.content", summary.split("\n## Config")[0][:8000])
    reg = done.registration if done else None
    get_run_logger().info("%s", _closing_line(config, s, store, run_id, reg, bento))
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
