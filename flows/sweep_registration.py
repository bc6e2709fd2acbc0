"""How a sweep registers: the best point's best seed goes through the champion rule on the
sweep's host (its data checked against the run's own), with the point's statistics on the
version and, when it is promoted, its int8 twin."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from cifarlab import sweep as sw
from cifarlab.export import PARITY_ATOL
from flows import locks
from flows.common import import_champion, serves_here
from registry import run_logging, tracking, versions


class PointFailed(RuntimeError):
    """A child run that did not complete."""


def register_candidate(
    store: tracking.Store,
    best_row: Mapping[str, Any],
    outcomes: list[sw.Outcome],
    sid: str,
    bundle: Any,
    min_shared_images: int,
    min_significance: float | None,
) -> tuple[Any, str]:
    """The best point's best seed goes through the parity check and the same champion rule as
    a single run; its tags and model card carry the point's mean ± sd, not just the seed's.
    Promoted, it gets its int8 twin first, as a single run's champion does. `bundle`: the data
    this host loaded (cifarlab.experiment.DataBundle), the run's own by fingerprint."""
    from registry import champion

    candidates = [o for o in outcomes if o.status == "ok" and o.point.label == best_row["point"]]
    cand = max(candidates, key=lambda o: o.val_accuracy or -1)
    assert cand.run_id is not None  # an "ok" outcome has its run
    run, model_id, model_uri = _checked_candidate(store, cand.run_id, bundle.fingerprint)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = versions.download_onnx(store, model_uri, Path(tmp))
        built = _int8_tags(run)  # a run that built its twin itself (int8=always)

        def champion_twin() -> dict[str, str]:
            return build_int8_twin(store, run, onnx_path, bundle.data, Path(tmp))

        done = champion.register(
            store, cand.run_id, model_uri, onnx_path, bundle.data,
            tags={**_candidate_tags(run, cand, best_row, sid), **built,
                  **run_logging.ood_tags(run.data.tags)},
            min_shared_images=min_shared_images, min_significance=min_significance,
            model_id=model_id, card_extra=(("sweep", _card_note(cand, best_row, sid)),),
            champion_tags=None if built else champion_twin,
            lock=locks.exclusive("registry", tracking.REGISTERED_MODEL),
        )  # fmt: skip
    return done, cand.run_id


def _checked_candidate(
    store: tracking.Store, run_id: str, fingerprint: str
) -> tuple[Any, str | None, str]:
    """The candidate's MLflow run, LoggedModel id and URI, once its ONNX parity check passed
    and it trained on the data this host loaded (else PointFailed, naming why)."""
    run = store.client.get_run(run_id)
    diff = run.data.metrics.get("onnx_max_abs_diff")
    agree = run.data.metrics.get("onnx_argmax_agreement")
    if diff is None or agree is None or diff > PARITY_ATOL or agree < 1.0:
        raise PointFailed(
            f"candidate run {run_id} has no passing ONNX parity check "
            f"(max |diff| {diff}, argmax agreement {agree}): not registered"
        )
    model_id, model_uri = run.data.tags.get("onnx_model_id"), run.data.tags.get("onnx_model_uri")
    if not model_uri:
        raise PointFailed(f"candidate run {run_id} logged no ONNX model")
    # The champion rule and the twin read this host's images at the run's indices.
    trained_on = run.data.tags.get("data_fingerprint", "(no data_fingerprint tag)")
    if trained_on != fingerprint:
        raise PointFailed(
            f"candidate run {run_id} was trained on data {trained_on}, but "
            f"this host loaded data {fingerprint}: not registered"
        )
    return run, model_id, model_uri


def _candidate_tags(
    run: Any, cand: sw.Outcome, best_row: Mapping[str, Any], sid: str
) -> dict[str, str]:
    """The version's tags: the seed's figures and the point's statistics over its seeds."""
    return {
        "val_accuracy": f"{cand.val_accuracy:.6f}",
        "test_accuracy": f"{cand.test_accuracy:.6f}",
        "preset": run.data.params.get("preset", ""),
        "sweep_id": sid,
        "sweep_point": best_row["point"],
        "sweep_seeds": str(best_row["seeds_ok"]),
        "sweep_point_val_mean": f"{best_row['val_acc_mean']:.6f}",
        "sweep_point_val_sd": f"{best_row['val_acc_std']:.6f}",
        "sweep_point_test_mean": f"{best_row['test_acc_mean']:.6f}",
        "served_tta": run.data.tags.get("served_tta", "none"),
        "onnx_max_abs_diff": f"{run.data.metrics['onnx_max_abs_diff']:.3e}",
        "parity_passed": "true",
    }


def _card_note(cand: sw.Outcome, best_row: Mapping[str, Any], sid: str) -> str:
    """The model card's line on the sweep the version came from, and its selection bias."""
    point_stats = (
        f"{sw.pct(best_row['val_acc_mean'], best_row['val_acc_std'])} % validation, "
        f"{sw.pct(best_row['test_acc_mean'], best_row['test_acc_std'])} % test "
        f"(mean ± sd over {best_row['seeds_ok']} seeds)"
    )
    return (
        f"`{sid}`, point {best_row['point']}: {point_stats}; this version is "
        f"its seed with the best validation accuracy (seed {cand.seed}). "
        "Point and seed were chosen on the validation images that the "
        "comparison with the champion also uses, which favours this model "
        "(selection bias); `min_significance` asks for a margin."
    )


def build_int8_twin(
    store: tracking.Store, run: Any, onnx_path: Path, data: Any, folder: Path
) -> dict[str, str]:
    """The int8 twin of a sweep's run (its downloaded ONNX file), on the run's own split
    (rebuilt from its params and checked against its split hash), logged to the run and
    judged on this host's CPU; its version tags (none, with a warning, where the split cannot
    be rebuilt from `data`)."""
    from cifarlab.experiment import split_inputs
    from cifarlab.export import evaluate_onnx
    from flows.int8 import int8_twin, int8_version_tags
    from registry.predictions import SplitUnknown, run_split

    try:
        split = run_split(run, data.train_labels.numpy())
    except SplitUnknown as exc:
        get_run_logger().warning("no int8 twin for run %s: %s", run.info.run_id, exc)
        return {}
    inputs = split_inputs(data, split)
    fp32_val = evaluate_onnx(onnx_path, inputs.val, data.train_labels[split.val_idx])
    # (both files timed here, on the host that judges the twin)
    return int8_version_tags(
        int8_twin(
            onnx_path,
            fp32_val,
            data,
            split,
            folder / "model_int8.onnx",
            store,
            run.info.run_id,
            inputs=inputs,
        )
    )


def register_best_point(
    store: tracking.Store,
    parent: str,
    sid: str,
    best: Mapping[str, Any] | None,
    points: list[sw.Point],
    outcomes: list[sw.Outcome],
    preset_name: str,
    root_dir: Path,
    min_shared_images: int,
    min_significance: float | None,
    import_here: bool,
) -> tuple[Any, str | None, dict[str, Any] | None]:
    """The best point's best seed through the champion rule; the champion into the BentoML
    store where this host serves. Returns (registration, candidate run id, BentoML result),
    all None when there is no best point to register."""
    if best is None:
        return None, None, None
    from cifarlab.config import preset as make_config
    from cifarlab.data import resolve_source
    from cifarlab.experiment import load_data

    logger = get_run_logger()
    # The champion rule compares on images: this host loads (and verifies) the data.
    best_point = next(p for p in points if p.label == best["point"])
    data_cfg = make_config(preset_name, **best_point.overrides).data
    data_cfg.source = resolve_source(data_cfg.source)
    bundle = load_data(data_cfg, root_dir)
    done, candidate = register_candidate(
        store, best, outcomes, sid, bundle, min_shared_images, min_significance
    )
    reg = done.registration
    store.client.set_tag(parent, "candidate_run_id", candidate)
    store.client.set_tag(parent, "registry.version", str(reg.version))
    store.client.set_tag(parent, "registry.alias", reg.alias)
    logger.info(
        "best point %s (val %.2f %% mean): run %s registered as v%s -> %s: %s",
        best["point"],
        100 * best["val_acc_mean"],
        candidate,
        reg.version,
        reg.alias,
        reg.reason,
    )
    if done.report_markdown:
        create_markdown_artifact(
            key="champion-vs-challenger",
            markdown=done.report_markdown,
            description=f"sweep {sid} candidate vs the champion",
        )
    bento = None
    if reg.alias == tracking.CHAMPION and import_here and serves_here(store):
        bento = import_champion(store, str(root_dir))
    return reg, candidate, bento


def _int8_tags(run: Any) -> dict[str, str]:
    """The child run's int8 figures as registry version tags (none if it built no int8 model)."""
    tags, metrics = run.data.tags, run.data.metrics
    if "int8_servable" not in tags:
        return {}
    return {
        "int8_val_accuracy": f"{metrics['int8_val_accuracy']:.6f}",
        "int8_test_accuracy": f"{metrics['int8_test_accuracy']:.6f}",
        "int8_servable": tags["int8_servable"],
        **(
            {"int8_judged_with_dot_product": tags["int8_judged_with_dot_product"]}
            if "int8_judged_with_dot_product" in tags
            else {}
        ),
    }
