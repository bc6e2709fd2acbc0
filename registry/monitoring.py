"""The drift monitor's side of MLflow: the champion's reference, the window of records it is
tested on, and the monitoring run that keeps the result.

Each check is one run in the experiment `cifar10-monitoring` (beside the serving hosts' shipped
records): tags name the model version and the verdict; the window's statistics are metrics (one
value per run, so the MLflow UI charts them across checks, and per time bin as steps with the
bin's time); the report page (`report.html`), the plots and the verdict are artifacts.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.drift import Verdict
from cifarlab.drift_report import Series, parse_time
from registry.run_logging import REFERENCE_ARTIFACT
from registry.ship_records import MONITORING_EXPERIMENT, MONITORING_PREFIX
from registry.tracking import REGISTERED_MODEL, Store, has_artifact, open_store
from registry.versions import champion_version

MONITOR_KIND = "monitor"


class NoReference(RuntimeError):
    """The model version to watch has no reference to compare with."""


def watched_version(store: Store, version: str | None = None) -> Any | None:
    """The registry version to watch: `version`, else the champion (None: none yet)."""
    if version is not None:
        from mlflow.exceptions import MlflowException

        try:
            return store.client.get_model_version(REGISTERED_MODEL, str(version))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise ValueError(
                f"model_version={version!r}: no such version of {REGISTERED_MODEL}"
            ) from None
    return champion_version(store)  # None before the first champion


def load_reference(store: Store, version: Any) -> dict[str, np.ndarray]:
    """The version's validation answers (cifarlab/drift.py), logged when its run was evaluated.
    Only a missing file is NoReference; a tracking server that fails to answer raises its own
    error (a dead artifact store is not a reason to retrain)."""
    if not has_artifact(store, version.run_id, REFERENCE_ARTIFACT):
        raise NoReference(
            f"{REGISTERED_MODEL} v{version.version} (run {version.run_id}) has no "
            f"{REFERENCE_ARTIFACT}: it was evaluated before the monitor existed; retrain it "
            "or watch a newer version"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = store.client.download_artifacts(version.run_id, REFERENCE_ARTIFACT, tmp)
        with np.load(path) as data:
            return {k: data[k] for k in data.files}


def window(
    records: Iterable[dict[str, Any]], start: float, end: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Of one version's records: its answers given in [start, end), and the labels that arrived
    in [start, end) (a label comes after its answer, maybe in a later window: it counts in the
    window it arrived in, so none is lost)."""
    preds: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = []
    for r in records:
        if start <= parse_time(r["time"]) < end:
            kind = r.get("kind", "prediction")
            if kind == "prediction":
                preds.append(r)
            elif kind == "feedback":
                feedback.append(r)
    return preds, feedback


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def verdict_metrics(verdict: Verdict, live: tuple[int, int]) -> dict[str, float]:
    """One number per statistic: what the MLflow UI charts from check to check."""
    labelled, correct = live
    out = {"drift": float(verdict.drift), "images": float(verdict.images), **verdict.summary}
    for t in verdict.tests:
        out[f"p_adjusted.{t.name}"] = t.p_corrected
        out[f"statistic.{t.name}"] = t.statistic
    out["feedback_labelled"] = float(labelled)
    if labelled:
        out["live_accuracy"] = correct / labelled
    return _finite(out)


def log_check(
    root: Path,
    uri: str | None,
    verdict: Verdict,
    s: Series,
    context: Mapping[str, Any],
    files: Mapping[str, Path],
) -> str:
    """One monitoring run for one check; its id."""
    store = open_store(root, MONITORING_EXPERIMENT, uri, MONITORING_PREFIX)
    client = store.client
    version = str(context["model_version"])
    run = client.create_run(
        store.experiment_id,
        run_name=f"monitor v{version} {context['window_end']}",
        tags={
            "cifar.kind": MONITOR_KIND,
            "model_name": REGISTERED_MODEL,
            "model_version": version,
            "drift": str(verdict.drift).lower(),
            "drift.fired": ", ".join(verdict.fired)[:5000],
            "records": str(context.get("records", ""))[:5000],
        },
    )
    rid = run.info.run_id
    try:
        _log_results(client, rid, verdict, s, context, files)
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid


def _log_results(
    client: Any,
    rid: str,
    verdict: Verdict,
    s: Series,
    context: Mapping[str, Any],
    files: Mapping[str, Path],
) -> None:
    from mlflow.entities import Metric

    now = int(parse_time(str(context["window_end"])) * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in verdict_metrics(verdict, live_counts(s)).items()]
    for step, t0 in enumerate(s.start):  # the window's bins, as steps at their own time
        per_bin = {"bin.answers": s.answers[step], "bin.confidence": s.confidence[step],
                   "bin.ood_rate": s.ood_rate[step], "bin.live_accuracy": s.accuracy[step][0]}  # fmt: skip
        metrics += [Metric(k, v, int(t0 * 1000), step) for k, v in _finite(per_bin).items()]
    for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 per call
        client.log_batch(rid, metrics=metrics[i : i + 900])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "verdict.json").write_text(
            json.dumps(verdict_json(verdict, context), indent=2)
        )
        (Path(tmp) / "series.json").write_text(json.dumps(s.as_dict()))
        client.log_artifacts(rid, tmp)
    for path in files.values():
        client.log_artifact(rid, str(path))


def live_counts(s: Series) -> tuple[int, int]:
    return sum(s.labelled), sum(s.correct)


def verdict_json(verdict: Verdict, context: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **{k: v for k, v in context.items()},
        "drift": verdict.drift,
        "fired": verdict.fired,
        "images": verdict.images,
        "summary": verdict.summary,
        "tests": [asdict(t) for t in verdict.tests],
    }
