"""What a sweep runs, decided before anything starts: the grid (a ready-made study's or the
caller's) expanded into points, scaled, times the seeds; the sweep's id; its parent MLflow run;
and the `train-cifar` parameters of every (point, seed)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from pydantic import BaseModel

from cifarlab import studies
from cifarlab import sweep as sw
from cifarlab.config import DEFAULT_PRESET
from registry import hosts, tracking


@dataclass(frozen=True)
class SweepPlan:
    """A sweep before it runs."""

    sid: str  # unique per start
    name: str  # the study's, or "custom"
    study: studies.Study | None
    preset: str  # the base preset every point overrides
    grid: dict[str, list[Any]]
    common: dict[str, Any]  # overrides every point shares (data/model/train)
    grid_points: list[sw.Point]  # as the grid gives them
    points: list[sw.Point]  # as they run: scaled, merged where scaling made them one
    scale_notes: list[str]
    seeds: list[int]
    epoch_scale: float
    data_scale: float

    def jobs(self, parent: str, root: str | None) -> list[tuple[sw.Point, int, dict[str, Any]]]:
        """The `train-cifar` parameters of every (point, seed): nested under the parent run,
        tagged with the sweep, never registered on their own."""
        jobs = []
        for point in self.points:
            for seed in self.seeds:
                jobs.append((point, seed, self._params(point, seed, parent, root)))
        return jobs

    def _params(self, point: sw.Point, seed: int, parent: str, root: str | None) -> dict[str, Any]:
        overrides = point.overrides
        params: dict[str, Any] = {
            "preset": self.preset,
            **{s: v for s, v in overrides.items() if v and s != "train"},
            "train": {**overrides.get("train", {}), "seed": seed},
            "skip_registry": True,
            "mlflow_parent_run_id": parent,
            # No int8 twin per run: the sweep builds one for the run it registers, if that
            # run's version is promoted (`register_candidate`).
            "int8": "never",
            "mlflow_tags": {
                "sweep_id": self.sid, "sweep_point": point.label, "sweep_point_key": point.key,
                "sweep_seed": str(seed), "sweep_role": "child",
            },
        }  # fmt: skip
        if root:
            params["root"] = root
        return params


def make_plan(
    study: str | None, preset: str | None, grid: dict[str, list[Any]] | None,
    parts: tuple[BaseModel | None, BaseModel | None, BaseModel | None], seeds: int,
    first_seed: int, epoch_scale: float, data_scale: float,
) -> SweepPlan:  # fmt: skip
    """The plan of a ready-made study (`study`) or any grid (`preset` + `grid`); `parts` are
    the data, model and train overrides every point shares."""
    chosen = studies.STUDIES[study] if study else None
    if grid is None:
        if chosen is None:
            raise studies.SweepError(
                f"give a study (one of {', '.join(studies.STUDIES)}) or a grid"
            )
        grid = chosen.grid
    base = preset or (chosen.preset if chosen else DEFAULT_PRESET)
    common = {s: part.model_dump(exclude_none=True)
              for s, part in zip(("data", "model", "train"), parts) if part is not None}  # fmt: skip
    name, seed_list = study or "custom", list(range(first_seed, first_seed + seeds))
    grid_points = sw.expand(base, grid, common)
    points, scale_notes = sw.scale_points(grid_points, base, epoch_scale, data_scale)
    sid = sw.sweep_id(name, base, grid, seed_list, {"common": common, "epoch_scale": epoch_scale,
                                                    "data_scale": data_scale, "time": time.time()})  # fmt: skip
    return SweepPlan(sid, name, chosen, base, grid, common, grid_points, points, scale_notes,
                     seed_list, epoch_scale, data_scale)  # fmt: skip


def start_parent_run(
    store: tracking.Store, plan: SweepPlan, deployment: str, max_parallel: int, retries: int,
    min_shared_images: int, min_significance: float | None,
) -> str:  # fmt: skip
    """The sweep's MLflow run, which every child run is nested under."""
    from prefect.runtime import flow_run

    params = {
        "study": plan.name, "preset": plan.preset, "grid": json.dumps(plan.grid),
        "seeds": str(len(plan.seeds)), "first_seed": str(plan.seeds[0]),
        "epoch_scale": str(plan.epoch_scale), "data_scale": str(plan.data_scale),
        "common_overrides": json.dumps(plan.common), "deployment": deployment,
        "max_parallel": str(max_parallel), "retries": str(retries),
        "points": str(len(plan.points)), "grid_points": str(len(plan.grid_points)),
        "min_shared_images": str(min_shared_images), "min_significance": str(min_significance),
    }  # fmt: skip
    tags = {"sweep_id": plan.sid, "sweep_role": "parent", "study": plan.name,
            **hosts.process_tags()}  # fmt: skip
    parent = tracking.start_run(store, f"sweep-{plan.name}-{plan.sid}", params, tags)
    store.client.set_tag(parent, "prefect.flow_run_id", str(flow_run.id))
    n, seeds = len(plan.points), len(plan.seeds)
    get_run_logger().info("sweep %s: %d points x %d seeds = %d runs via %s (MLflow parent run %s)",
                          plan.sid, n, seeds, n * seeds, deployment, parent)  # fmt: skip
    return parent
