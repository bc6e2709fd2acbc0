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
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import Field

from cifarlab.config import DEFAULT_PRESET
from cifarlab import studies
from cifarlab import sweep as sw
from registry import hosts, tracking
from registry.champion import MIN_SHARED_IMAGES
from flows.params import DataOverrides, ModelOverrides, PresetName, TrainOverrides
from flows.common import project_root
from flows.sweep_registration import PointFailed, register_best_point

StudyName = Literal[tuple(studies.STUDIES)]  # type: ignore[valid-type]


@task(cache_policy=NO_CACHE, persist_result=False, log_prints=True)
def run_point(deployment: str, parameters: dict[str, Any], label: str, seed: int) -> dict[str, Any]:
    """One `train-cifar` deployment run, waited for; a run that does not complete raises."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name=deployment, parameters=parameters, timeout=None,
                              as_subflow=True, tags=["sweep"])
    state = flow_run.state
    if state is None or not state.is_completed():
        name = state.name if state else "unknown"
        raise PointFailed(f"{label}, seed {seed}: flow run {flow_run.name} ended {name}: "
                          f"{(state.message if state else '') or ''}".strip())
    return {"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name}


def _run_all(jobs: list[tuple[sw.Point, int, dict[str, Any]]], deployment: str,
             max_parallel: int, retries: int, retry_delay_s: float) -> dict[tuple[int, int], dict]:
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
                deployment, params, point.label, seed)
            inflight[future] = (point, seed)

    fill()
    while inflight:
        future = next(as_completed(list(inflight)))
        point, seed = inflight.pop(future)
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            done[(point.index, seed)] = {"ok": False, "error": str(result)[:1000]}
            logger.warning("run %d/%d failed: point %s seed %d, after %d attempt(s): %s",
                           len(done), total, point.label, seed, retries + 1, result)
        else:
            done[(point.index, seed)] = {"ok": True, **result}
            logger.info("run %d/%d finished: point %s seed %d (%s)", len(done), total,
                        point.label, seed, result["flow_run_name"])
        update_progress_artifact(progress, 100.0 * len(done) / total)
        fill()
    return done


def _outcomes(store: tracking.Store, sid: str, jobs, done, retries: int) -> list[sw.Outcome]:
    """Read each child's results back from MLflow (the source of truth on any host)."""
    runs = store.client.search_runs([store.experiment_id], filter_string=f"tags.sweep_id = '{sid}'",
                                    max_results=5000)
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
            outcomes.append(sw.Outcome(point, seed, "ok", run.info.run_id,
                                       m.get("final_val_accuracy"), m.get("test_accuracy"),
                                       m.get("train_seconds")))
        else:
            error = state.get("error") or f"no finished MLflow run for {point.label} seed {seed}"
            outcomes.append(sw.Outcome(point, seed, "failed", run.info.run_id if run else None,
                                       attempts=retries + 1, error=error))
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
    chosen, grid, preset_name = _study_grid(study, preset, grid)
    common = {s: part.model_dump(exclude_none=True)
              for s, part in (("data", data), ("model", model), ("train", train)) if part is not None}
    name, seed_list = study or "custom", list(range(first_seed, first_seed + seeds))
    grid_points, points, scale_notes, sid = _points(name, preset_name, grid, common, seed_list,
                                                    epoch_scale, data_scale)
    root_dir = project_root(root)
    store = tracking.open_store(root_dir)
    parent = _start_parent_run(store, sid, name, preset_name, grid, seeds, first_seed,
                               epoch_scale, data_scale, common, deployment, max_parallel,
                               retries, len(points), len(grid_points), min_shared_images,
                               min_significance)
    jobs = _jobs(points, seed_list, preset_name, parent, sid, root)
    try:
        done = _run_all(jobs, deployment, max_parallel, retries, retry_delay_s)
        outcomes = _outcomes(store, sid, jobs, done, retries)
        notes = sw.summary_notes(name, preset_name, chosen, len(points), seed_list,
                                 epoch_scale, data_scale, parent, sid, scale_notes)
        rows, best, markdown = _summarise(store, parent, name, grid, chosen, outcomes, notes)
        reg, candidate, bento = register_best_point(
            store, parent, sid, best if register_best else None, points, outcomes, preset_name,
            root_dir, min_shared_images, min_significance, import_here=not skip_bentoml)
        ok = [o for o in outcomes if o.status == "ok"]
        _publish_artifacts(name, sid, rows, markdown, reg, candidate, len(ok), len(outcomes))
    except BaseException as exc:
        store.client.set_tag(parent, "failure", f"{type(exc).__name__}: {exc}"[:5000])
        tracking.end_run(store, parent, "FAILED")
        raise
    tracking.end_run(store, parent, "FINISHED" if ok else "FAILED")
    if not ok:
        raise PointFailed(f"sweep {sid}: every run failed; see the summary in MLflow run {parent}")
    return {"sweep_id": sid, "mlflow_parent_run_id": parent, "rows": rows,
            "best_point": best["point"] if best else None, "candidate_run_id": candidate,
            "registered_version": reg.version if reg else None, "alias": reg.alias if reg else None,
            "bento_tag": bento["tag"] if bento else None, "runs_ok": len(ok),
            "runs_failed": len(outcomes) - len(ok)}


def _summarise(store: tracking.Store, parent: str, name: str, grid: dict[str, list[Any]],
               chosen: studies.Study | None, outcomes: list[sw.Outcome], notes: list[str],
               ) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str]:
    """Rows per point (mean and sd over seeds, the report's figure beside), the best point and
    the markdown table, logged on the parent run."""
    rows = sw.summarise(outcomes, chosen.report if chosen else None)
    best = sw.best_point(rows)
    markdown = sw.to_markdown(f"sweep-cifar: {name}", rows, best, notes)
    _log_summary(store, parent, grid, rows, best, outcomes, markdown)
    return rows, best, markdown


def _points(name: str, preset_name: str, grid: dict[str, list[Any]], common: dict[str, Any],
            seed_list: list[int], epoch_scale: float, data_scale: float,
            ) -> tuple[list[sw.Point], list[sw.Point], list[str], str]:
    """The grid's points, the same scaled (with notes on what scaling changed) and the sweep's
    id (unique per start)."""
    grid_points = sw.expand(preset_name, grid, common)
    points, scale_notes = sw.scale_points(grid_points, preset_name, epoch_scale, data_scale)
    sid = sw.sweep_id(name, preset_name, grid, seed_list, {
        "common": common, "epoch_scale": epoch_scale, "data_scale": data_scale,
        "time": time.time()})
    return grid_points, points, scale_notes, sid


def _study_grid(study: str | None, preset: str | None, grid: dict[str, list[Any]] | None,
                ) -> tuple[studies.Study | None, dict[str, list[Any]], str]:
    """The ready-made study (if named), the grid and the base preset a sweep runs."""
    chosen = studies.STUDIES[study] if study else None
    if grid is None and chosen is None:
        raise studies.SweepError("give a study (one of " + ", ".join(studies.STUDIES) + ") or a grid")
    grid = grid if grid is not None else chosen.grid  # type: ignore[union-attr]  # one is set
    return chosen, grid, preset or (chosen.preset if chosen else DEFAULT_PRESET)


def _start_parent_run(store: tracking.Store, sid: str, name: str, preset_name: str,
                      grid: dict[str, list[Any]], seeds: int, first_seed: int,
                      epoch_scale: float, data_scale: float, common: dict[str, Any],
                      deployment: str, max_parallel: int, retries: int, n_points: int,
                      n_grid_points: int, min_shared_images: int,
                      min_significance: float | None) -> str:
    """The sweep's MLflow run, which every child run is nested under."""
    from prefect.runtime import flow_run

    parent = tracking.start_run(store, f"sweep-{name}-{sid}", {
        "study": name, "preset": preset_name, "grid": json.dumps(grid), "seeds": str(seeds),
        "first_seed": str(first_seed), "epoch_scale": str(epoch_scale),
        "data_scale": str(data_scale), "common_overrides": json.dumps(common),
        "deployment": deployment, "max_parallel": str(max_parallel), "retries": str(retries),
        "points": str(n_points), "grid_points": str(n_grid_points),
        "min_shared_images": str(min_shared_images),
        "min_significance": str(min_significance)},
        {"sweep_id": sid, "sweep_role": "parent", "study": name, **hosts.process_tags()})
    store.client.set_tag(parent, "prefect.flow_run_id", str(flow_run.id))
    get_run_logger().info("sweep %s: %d points x %d seeds = %d runs via %s (MLflow parent run "
                          "%s)", sid, n_points, seeds, n_points * seeds, deployment, parent)
    return parent


def _jobs(points: list[sw.Point], seed_list: list[int], preset_name: str, parent: str,
          sid: str, root: str | None) -> list[tuple[sw.Point, int, dict[str, Any]]]:
    """The `train-cifar` parameters of every (point, seed): nested under the parent run, tagged
    with the sweep, never registered on their own."""
    jobs = []
    for point in points:
        overrides = point.overrides
        for seed in seed_list:
            params: dict[str, Any] = {
                "preset": preset_name,
                **{s: v for s, v in overrides.items() if v and s != "train"},
                "train": {**overrides.get("train", {}), "seed": seed},
                "skip_registry": True, "mlflow_parent_run_id": parent,
                # No int8 twin per run: the sweep builds one for the run it registers, if that
                # run's version is promoted (`register_candidate`).
                "int8": "never",
                "mlflow_tags": {"sweep_id": sid, "sweep_point": point.label,
                                "sweep_point_key": point.key, "sweep_seed": str(seed),
                                "sweep_role": "child"},
            }
            if root:
                params["root"] = root
            jobs.append((point, seed, params))
    return jobs


def _log_summary(store: tracking.Store, parent: str, grid: dict[str, list[Any]],
                 rows: list[dict[str, Any]], best: dict[str, Any] | None,
                 outcomes: list[sw.Outcome], markdown: str) -> None:
    """The summary table (CSV, Markdown), every run's outcome and the plot on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        files = {"summary_csv": Path(tmp) / "sweep_summary.csv",
                 "summary_md": Path(tmp) / "sweep_summary.md",
                 "runs_json": Path(tmp) / "sweep_runs.json"}
        files["summary_csv"].write_text(sw.to_csv(rows))
        files["summary_md"].write_text(markdown)
        files["runs_json"].write_text(json.dumps([{
            "point": o.point.label, "seed": o.seed, "status": o.status, "run_id": o.run_id,
            "val_accuracy": o.val_accuracy, "test_accuracy": o.test_accuracy,
            "train_seconds": o.train_seconds, "error": o.error} for o in outcomes], indent=2))
        if best is not None:
            files["plot"] = sw.plot(rows, list(grid), Path(tmp) / "sweep_accuracy.png")
        tracking.log_files(store, parent, files)
    ok = [o for o in outcomes if o.status == "ok"]
    tracking.log_metrics(store, parent, {
        "runs_ok": len(ok), "runs_failed": len(outcomes) - len(ok),
        "best_val_acc_mean": best["val_acc_mean"] if best else None,
        "best_val_acc_std": best["val_acc_std"] if best else None,
        "best_test_acc_mean": best["test_acc_mean"] if best else None})
    if best is not None:
        store.client.set_tag(parent, "best_point", best["point"])


def _publish_artifacts(name: str, sid: str, rows: list[dict[str, Any]], markdown: str, reg: Any,
                       candidate: str | None, n_ok: int, n_runs: int) -> None:
    """The summary and per-point table as Prefect artifacts."""
    registry_line = (f"\n**Registry:** run `{candidate}` (best seed of the best point) -> "
                     f"{reg.name} v{reg.version} as `{reg.alias}`: {reg.reason}" if reg
                     else "\n**Registry:** nothing registered")
    create_markdown_artifact(key=f"sweep-{name}".lower().replace("_", "-"),
                             markdown=markdown + registry_line,
                             description=f"sweep {sid}: {n_ok}/{n_runs} runs ok")
    create_table_artifact(key="sweep-table", table=[
        {k: v for k, v in r.items() if k != "errors"} for r in rows],
        description=f"sweep {sid} per-point statistics")


if __name__ == "__main__":
    sweep_cifar(study="report-lr", epoch_scale=0.1, data_scale=0.1, seeds=2)
