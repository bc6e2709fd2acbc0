"""The `sweep-cifar` flow: one `train-cifar` deployment run per grid point and seed, then the
statistics, and the best point (by mean validation accuracy) through the champion rule.

    prefect deployment run sweep-cifar/default -p study=report-lr -p seeds=3 -p epoch_scale=0.2
    prefect deployment run sweep-cifar/default -p preset=seed-baseline \\
        -p 'grid={"train.lr": [0.001, 0.0004], "train.batch_size": [16, 32]}'

Children go through the `train-cifar` deployment, so every worker of its pool (several GPU
hosts) takes points; at most `max_parallel` run at once. A point whose run fails is retried
(`retries`), then reported as failed; the others go on. MLflow: one parent run for the sweep,
each child nested under it (same experiment, `train-cifar`), so the UI's chart view compares
them. Statistics, tables and plots go to the parent run and to Prefect artifacts.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.futures import as_completed
from pydantic import Field

from cifarlab import studies
from cifarlab import sweep as sw
from cifarlab.plots import plot_sweep
from flows.common import project_root
from flows.params import DataOverrides, ModelOverrides, PresetName, TrainOverrides
from flows.sweep_plan import SweepPlan, make_plan, start_parent_run
from flows.sweep_registration import PointFailed, register_best_point
from registry import tracking, versions
from registry.champion import MIN_SHARED_IMAGES

StudyName = Literal[tuple(studies.STUDIES)]  # type: ignore[valid-type]


@task(cache_policy=NO_CACHE, persist_result=False, log_prints=True)
def run_point(deployment: str, parameters: dict[str, Any], label: str, seed: int) -> dict[str, Any]:
    """One `train-cifar` deployment run, waited for; a run that does not complete raises."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        name=deployment, parameters=parameters, timeout=None, as_subflow=True, tags=["sweep"]
    )
    assert isinstance(flow_run, FlowRun)  # (called from sync code: the sync variant ran)
    state = flow_run.state
    if state is None or not state.is_completed():
        name = state.name if state else "unknown"
        raise PointFailed(
            f"{label}, seed {seed}: flow run {flow_run.name} ended {name}: "
            f"{(state.message if state else '') or ''}".strip()
        )
    return {"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name}


def _run_all(
    jobs: list[tuple[sw.Point, int, dict[str, Any]]],
    deployment: str,
    max_parallel: int,
    retries: int,
    retry_delay_s: float,
) -> dict[tuple[int, int], dict]:
    """Submit the jobs, at most `max_parallel` in flight, the next as soon as one ends (Prefect's
    `as_completed`); returns (point, seed) -> outcome. Progress: a Prefect progress artifact
    and a log line per finished run."""
    task_fn = run_point.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    logger = get_run_logger()
    total = len(jobs)
    progress = create_progress_artifact(0.0, description=f"sweep: runs finished of {total}")
    pending = list(jobs)
    inflight: dict[Any, tuple[sw.Point, int]] = {}
    done: dict[tuple[int, int], dict] = {}

    def fill() -> None:
        while pending and len(inflight) < max_parallel:
            point, seed, params = pending.pop(0)
            future = task_fn.with_options(task_run_name=f"point-{point.index}-seed-{seed}").submit(
                deployment, params, point.label, seed
            )
            inflight[future] = (point, seed)

    fill()
    while inflight:
        future = next(as_completed(list(inflight)))
        point, seed = inflight.pop(future)
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            done[(point.index, seed)] = {"ok": False, "error": str(result)[:1000]}
            logger.warning(
                "run %d/%d failed: point %s seed %d, after %d attempt(s): %s",
                len(done),
                total,
                point.label,
                seed,
                retries + 1,
                result,
            )
        else:
            done[(point.index, seed)] = {"ok": True, **result}
            logger.info(
                "run %d/%d finished: point %s seed %d (%s)",
                len(done),
                total,
                point.label,
                seed,
                result["flow_run_name"],
            )
        update_progress_artifact(cast(UUID, progress), 100.0 * len(done) / total)
        fill()
    return done


def _outcomes(store: tracking.Store, sid: str, jobs, done, retries: int) -> list[sw.Outcome]:
    """Read each child's results back from MLflow (the source of truth on any host)."""
    runs = store.client.search_runs(
        [store.experiment_id], filter_string=f"tags.sweep_id = '{sid}'", max_results=5000
    )
    by_key = {}
    for run in runs:
        key = (run.data.tags.get("sweep_point_key"), run.data.tags.get("sweep_seed"))
        if run.info.status == "FINISHED" or key not in by_key:
            by_key[key] = run
    outcomes = []
    for point, seed, _params in jobs:
        state = done[(point.index, seed)]
        run = by_key.get((point.key, str(seed)))
        if state["ok"] and run is not None and run.info.status == "FINISHED":
            m = run.data.metrics
            outcomes.append(
                sw.Outcome(
                    point,
                    seed,
                    "ok",
                    run.info.run_id,
                    m.get("final_val_accuracy"),
                    m.get("test_accuracy"),
                    m.get("train_seconds"),
                )
            )
        else:
            error = state.get("error") or f"no finished MLflow run for {point.label} seed {seed}"
            outcomes.append(
                sw.Outcome(
                    point,
                    seed,
                    "failed",
                    run.info.run_id if run else None,
                    attempts=retries + 1,
                    error=error,
                )
            )
    return outcomes


@flow(name="sweep-cifar", log_prints=True)
def sweep_cifar(
    study: StudyName | None = None,  # type: ignore[valid-type]
    preset: PresetName | None = None,  # type: ignore[valid-type]
    grid: dict[str, list[Any]] | None = None,
    seeds: Annotated[int, Field(ge=1, le=20)] = 3,
    first_seed: int = 0,
    epoch_scale: Annotated[float, Field(gt=0, le=1)] = 1.0,
    data_scale: Annotated[float, Field(gt=0, le=1)] = 1.0,
    data: DataOverrides | None = None,  # type: ignore[valid-type]
    model: ModelOverrides | None = None,  # type: ignore[valid-type]
    train: TrainOverrides | None = None,  # type: ignore[valid-type]
    deployment: str = "train-cifar/default",
    max_parallel: Annotated[int, Field(ge=1, le=64)] = 1,
    retries: Annotated[int, Field(ge=0, le=5)] = 1,
    retry_delay_s: Annotated[float, Field(ge=0)] = 10.0,
    register_best: bool = True,
    min_shared_images: Annotated[int, Field(ge=1)] = MIN_SHARED_IMAGES,
    min_significance: Annotated[float, Field(gt=0, lt=1)] | None = None,
    skip_bentoml: bool = False,
    root: str | None = None,
) -> dict[str, Any]:
    """Run a study (`study`) or any grid (`preset` + `grid`) over seeds; summarise; register the
    best point by mean validation accuracy under the champion rule."""
    plan = make_plan(study, preset, grid, (data, model, train), seeds, first_seed, epoch_scale,
                     data_scale)  # fmt: skip
    root_dir = project_root(root)
    store = tracking.open_store(root_dir)
    parent = start_parent_run(store, plan, deployment, max_parallel, retries,
                              min_shared_images, min_significance)  # fmt: skip
    jobs = plan.jobs(parent, root)
    try:
        done = _run_all(jobs, deployment, max_parallel, retries, retry_delay_s)
        outcomes = _outcomes(store, plan.sid, jobs, done, retries)
        versions.require_artifact_store(store, parent)  # its files next: a dead store fails now
        rows, best, markdown = _summarise(store, parent, plan, outcomes)
        reg, candidate, bento = register_best_point(
            store, parent, plan.sid, best if register_best else None, plan.points, outcomes,
            plan.preset, root_dir, min_shared_images, min_significance,
            import_here=not skip_bentoml,
        )  # fmt: skip
        ok = [o for o in outcomes if o.status == "ok"]
        _publish_artifacts(plan.name, plan.sid, rows, markdown, reg, candidate, len(ok),
                           len(outcomes))  # fmt: skip
    except BaseException as exc:
        store.client.set_tag(parent, "failure", f"{type(exc).__name__}: {exc}"[:5000])
        tracking.end_run(store, parent, "FAILED")
        raise
    tracking.end_run(store, parent, "FINISHED" if ok else "FAILED")
    if not ok:
        raise PointFailed(f"sweep {plan.sid}: every run failed; see MLflow run {parent}")
    return {
        "sweep_id": plan.sid, "mlflow_parent_run_id": parent, "rows": rows,
        "best_point": best["point"] if best else None, "candidate_run_id": candidate,
        "registered_version": reg.version if reg else None,
        "alias": reg.alias if reg else None, "bento_tag": bento["tag"] if bento else None,
        "runs_ok": len(ok), "runs_failed": len(outcomes) - len(ok),
    }  # fmt: skip


def _summarise(
    store: tracking.Store, parent: str, plan: SweepPlan, outcomes: list[sw.Outcome]
) -> tuple[list[dict[str, Any]], Mapping[str, Any] | None, str]:
    """Rows per point (mean and sd over seeds, the report's figure beside), the best point and
    the markdown table, logged on the parent run."""
    rows = sw.summarise(outcomes, plan.study.report if plan.study else None)
    best = sw.best_point(rows)
    notes = sw.summary_notes(
        plan.name, plan.preset, plan.study, len(plan.points), plan.seeds, plan.epoch_scale,
        plan.data_scale, parent, plan.sid, plan.scale_notes,
    )  # fmt: skip
    markdown = sw.to_markdown(f"sweep-cifar: {plan.name}", rows, best, notes)
    _log_summary(store, parent, plan.grid, rows, best, outcomes, markdown)
    return rows, best, markdown


def _log_summary(
    store: tracking.Store,
    parent: str,
    grid: dict[str, list[Any]],
    rows: list[dict[str, Any]],
    best: Mapping[str, Any] | None,
    outcomes: list[sw.Outcome],
    markdown: str,
) -> None:
    """The summary table (CSV, Markdown), every run's outcome and the plot on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "summary_csv": Path(tmp) / "sweep_summary.csv",
            "summary_md": Path(tmp) / "sweep_summary.md",
            "runs_json": Path(tmp) / "sweep_runs.json",
        }
        files["summary_csv"].write_text(sw.to_csv(rows))
        files["summary_md"].write_text(markdown)
        files["runs_json"].write_text(
            json.dumps(
                [
                    {
                        "point": o.point.label,
                        "seed": o.seed,
                        "status": o.status,
                        "run_id": o.run_id,
                        "val_accuracy": o.val_accuracy,
                        "test_accuracy": o.test_accuracy,
                        "train_seconds": o.train_seconds,
                        "error": o.error,
                    }
                    for o in outcomes
                ],
                indent=2,
            )
        )
        if best is not None:
            files["plot"] = plot_sweep(rows, list(grid), Path(tmp) / "sweep_accuracy.png")
        tracking.log_files(store, parent, files)
    ok = [o for o in outcomes if o.status == "ok"]
    tracking.log_metrics(
        store,
        parent,
        {
            "runs_ok": len(ok),
            "runs_failed": len(outcomes) - len(ok),
            "best_val_acc_mean": best["val_acc_mean"] if best else None,
            "best_val_acc_std": best["val_acc_std"] if best else None,
            "best_test_acc_mean": best["test_acc_mean"] if best else None,
        },
    )
    if best is not None:
        store.client.set_tag(parent, "best_point", best["point"])


def _publish_artifacts(
    name: str,
    sid: str,
    rows: list[dict[str, Any]],
    markdown: str,
    reg: Any,
    candidate: str | None,
    n_ok: int,
    n_runs: int,
) -> None:
    """The summary and per-point table as Prefect artifacts."""
    registry_line = (
        f"\n**Registry:** run `{candidate}` (best seed of the best point) -> "
        f"{reg.name} v{reg.version} as `{reg.alias}`: {reg.reason}"
        if reg
        else "\n**Registry:** nothing registered"
    )
    create_markdown_artifact(
        key=f"sweep-{name}".lower().replace("_", "-"),
        markdown=markdown + registry_line,
        description=f"sweep {sid}: {n_ok}/{n_runs} runs ok",
    )
    create_table_artifact(
        key="sweep-table",
        table=[{k: v for k, v in r.items() if k != "errors"} for r in rows],
        description=f"sweep {sid} per-point statistics",
    )


if __name__ == "__main__":
    sweep_cifar(study="report-lr", epoch_scale=0.1, data_scale=0.1, seeds=2)
