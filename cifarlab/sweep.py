"""Sweeps as data: grids over config fields, the lab report's studies, and their statistics.

No Prefect here (the flow is `flows/sweep_flow.py`): a grid is expanded into points, each point
into the `train-cifar` parameters of one run per seed, and finished runs are summarised per
point (mean and standard deviation over seeds) into a table, CSV, markdown and plots.

A grid maps a dotted config path to the values it takes, e.g.
    {"train.lr": [0.001, 0.0004], "model.options.kernel_size": [3, 1]}
    {"data": [{"train_size": 36000, "val_size": 10000}, {"train_size": 45000, "val_size": 5000}]}
Points are the cartesian product of the keys' values; a value that is a mapping sets several
fields of that section at once (the split study changes train and validation size together).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cifarlab.config import RunConfig, preset
from cifarlab.studies import Study, SweepError, format_value

SECTIONS = ("data", "model", "train")


@dataclass(frozen=True)
class Point:
    """One grid point: its label, the values it sets, and the overrides of each section."""

    index: int
    label: str
    values: dict[str, Any]
    overrides: dict[str, dict[str, Any]]
    # The grid points this point runs for: itself, or several that became identical once scaled.
    grid_labels: tuple[str, ...] = ()

    def stands_for(self) -> tuple[str, ...]:
        """Labels of the grid points it runs (its own label when unscaled)."""
        return self.grid_labels or (self.label,)

    @property
    def key(self) -> str:
        """Short stable id of the point (for tags and file names)."""
        return hashlib.sha256(self.label.encode()).hexdigest()[:10]


def _set(target: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    if isinstance(value, Mapping) and isinstance(target.get(path[-1]), dict):
        target[path[-1]] = {**target[path[-1]], **value}
    else:
        target[path[-1]] = copy.deepcopy(value)


def expand(
    preset_name: str,
    grid: Mapping[str, Sequence[Any]],
    base: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Point]:
    """Grid -> points, each validated as a full RunConfig now (a bad value fails the sweep
    before anything runs, naming the point and the field)."""
    if not grid:
        raise SweepError("the grid is empty: give at least one parameter and its values")
    shared: dict[str, dict[str, Any]] = {s: dict(v) for s, v in (base or {}).items() if v}
    base_config = preset(preset_name, **shared)
    keys = list(grid)
    for key in keys:
        if key.split(".")[0] not in SECTIONS:
            raise SweepError(f"grid key {key!r} must start with one of {', '.join(SECTIONS)}")
        choices = grid[key]
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices:
            raise SweepError(f"grid key {key!r}: give a non-empty list of values, not {choices!r}")
    points = []
    for index, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        values = dict(zip(keys, combo, strict=True))
        overrides: dict[str, dict[str, Any]] = copy.deepcopy(shared)
        for key, value in values.items():
            path = key.split(".")
            if path[0] == "model" and len(path) > 2 and path[1] == "options":
                # Options replace as a whole in a preset merge: start from the preset's own.
                overrides.setdefault("model", {}).setdefault(
                    "options", copy.deepcopy(base_config.model.options)
                )
            if len(path) == 1:
                if not isinstance(value, Mapping):
                    raise SweepError(
                        f"grid key {key!r} sets a whole section: its values must be "
                        f"mappings of fields, got {value!r}"
                    )
                overrides[path[0]] = {**overrides.get(path[0], {}), **value}
            else:
                _set(overrides, path, value)
        label = ", ".join(f"{k}={format_value(v)}" for k, v in values.items())
        try:
            preset(preset_name, **overrides)
        except Exception as exc:  # pydantic ValidationError or an unknown preset
            raise SweepError(f"point {label}: {exc}") from None
        points.append(Point(index, label, values, overrides))
    return points


def scaled(
    overrides: Mapping[str, Mapping[str, Any]],
    config: RunConfig,
    epoch_scale: float,
    data_scale: float,
) -> dict[str, dict[str, Any]]:
    """Shrink a point for a quick run: epochs x epoch_scale, train/val sizes x data_scale
    (rounded up, at least 1 epoch and 10 images per class)."""
    for name, value in (("epoch_scale", epoch_scale), ("data_scale", data_scale)):
        if not 0 < value <= 1:
            raise SweepError(f"{name}={value}: must be in (0, 1]")
    out = {s: dict(v) for s, v in overrides.items()}
    if epoch_scale < 1:
        out.setdefault("train", {})["epochs"] = max(1, math.ceil(config.train.epochs * epoch_scale))
    if data_scale < 1:
        data = out.setdefault("data", {})
        data["train_size"] = max(100, math.ceil(config.data.train_size * data_scale))
        data["val_size"] = max(100, math.ceil(config.data.val_size * data_scale))
    return out


def _value_at(overrides: Mapping[str, Any], key: str, grid_value: Any) -> Any:
    """The value a grid key takes in (scaled) overrides; for a whole section, only the fields
    the grid value sets."""
    path = key.split(".")
    node: Any = overrides
    for part in path:
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    if len(path) == 1 and isinstance(grid_value, Mapping):
        return {f: node.get(f, v) for f, v in grid_value.items()}
    return node if node != {} else grid_value


def scale_points(
    points: Sequence[Point], preset_name: str, epoch_scale: float, data_scale: float
) -> tuple[list[Point], list[str]]:
    """The points as they will run: scaled, labelled with the values actually run, and merged
    where scaling made them identical; plus a note per merge and on what scaling changed."""
    if epoch_scale == 1 and data_scale == 1:
        return list(points), []
    runs: dict[str, Point] = {}
    for point in points:
        overrides = scaled(
            point.overrides, preset(preset_name, **point.overrides), epoch_scale, data_scale
        )
        values = {k: _value_at(overrides, k, v) for k, v in point.values.items()}
        label = ", ".join(f"{k}={format_value(v)}" for k, v in values.items())
        fingerprint = json.dumps(overrides, sort_keys=True, default=str)
        if fingerprint in runs:
            first = runs[fingerprint]
            runs[fingerprint] = Point(
                first.index,
                first.label,
                first.values,
                first.overrides,
                (*first.stands_for(), point.label),
            )
        else:
            runs[fingerprint] = Point(len(runs), label, values, overrides, (point.label,))
    merged = list(runs.values())
    notes = [
        f"Scaled (epochs x {epoch_scale}, data x {data_scale}): every point is labelled "
        "with the values actually run."
    ]
    notes += [
        f"Grid points {', '.join(p.stands_for())} became the same run ({p.label}) once "
        "scaled: merged into one point."
        for p in merged
        if len(p.stands_for()) > 1
    ]
    return merged, notes


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One run of one point and seed, as read back from MLflow (or a failure)."""

    point: Point
    seed: int
    status: str  # "ok" or "failed"
    run_id: str | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    train_seconds: float | None = None
    attempts: int = 1
    error: str | None = None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(
    outcomes: Sequence[Outcome], report: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """One row per point: mean and standard deviation over its finished seeds."""
    report = report or {}
    rows = []
    by_point: dict[int, list[Outcome]] = {}
    for o in outcomes:
        by_point.setdefault(o.point.index, []).append(o)
    for index in sorted(by_point):
        runs = by_point[index]
        point = runs[0].point
        ok = [o for o in runs if o.status == "ok"]
        val_mean, val_std = _mean_std([o.val_accuracy for o in ok if o.val_accuracy is not None])
        test_mean, test_std = _mean_std(
            [o.test_accuracy for o in ok if o.test_accuracy is not None]
        )
        secs, _ = _mean_std([o.train_seconds for o in ok if o.train_seconds is not None])
        rows.append(
            {
                "point": point.label,
                **{k: format_value(v) for k, v in point.values.items()},
                "grid_points": "; ".join(point.stands_for()),
                "seeds_ok": len(ok),
                "seeds_failed": len(runs) - len(ok),
                "val_acc_mean": val_mean,
                "val_acc_std": val_std,
                "test_acc_mean": test_mean,
                "test_acc_std": test_std,
                "train_seconds_mean": secs,
                # The report's figure where the point stands for exactly one grid point (scaled runs
                # show the full-scale figure beside theirs; the notes say so); none for merged points.
                "report_test_acc": (
                    report.get(point.stands_for()[0]) if len(point.stands_for()) == 1 else None
                ),
                "errors": "; ".join(sorted({o.error for o in runs if o.error}))[:500] or None,
            }
        )
    return rows


def best_point(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The point with the highest mean validation accuracy (test accuracy plays no part)."""
    done = [r for r in rows if r["val_acc_mean"] is not None]
    return max(done, key=lambda r: r["val_acc_mean"]) if done else None


def pct(value: float | None, std: float | None = None) -> str:
    """A fraction as a percentage, with ± sd when given; "-" when missing."""
    if value is None:
        return "-"
    return f"{100 * value:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * value:.2f}"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summary_notes(
    name: str,
    preset_name: str,
    study: Study | None,
    points: int,
    seeds: Sequence[int],
    epoch_scale: float,
    data_scale: float,
    parent: str,
    sid: str,
    scale_notes: Sequence[str],
) -> list[str]:
    """The lines above a sweep's table: what ran, how it was chosen, what scaling changed."""
    notes = [
        f"Study `{name}` on preset `{preset_name}`: "
        f"{study.description if study else 'custom grid'}.",
        f"{points} points x {len(seeds)} seeds (seeds {list(seeds)}); epoch scale "
        f"{epoch_scale}, data scale {data_scale}; sd = sample standard deviation over seeds.",
        f"MLflow parent run `{parent}`; sweep id `{sid}`. The best point is chosen by mean "
        "validation accuracy (of each run's exported ONNX model); test accuracy is reported "
        "only.",
        *scale_notes,
    ]
    if study and study.report and (epoch_scale < 1 or data_scale < 1):
        notes.append(
            "The report column holds the report's full-scale figures; these runs were "
            "scaled down, so compare the trend, not the level."
        )
    return notes


def to_markdown(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    best: Mapping[str, Any] | None,
    notes: Sequence[str] = (),
) -> str:
    """The per-point table (mean ± sd over seeds, the report's figure beside) as markdown."""
    scaled_run = any(r.get("grid_points", r["point"]) != r["point"] for r in rows)
    grid_col = ("| grid point(s) " if scaled_run else "", "|---" if scaled_run else "")
    lines = [
        f"# {title}",
        "",
        *notes,
        "",
        f"| point {grid_col[0]}| seeds ok / failed | val % (mean ± sd) | test % (mean ± sd) "
        "| report test % | train s (mean) |",
        f"|---{grid_col[1]}|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " **(best by val)**" if best is not None and r["point"] == best["point"] else ""
        report = f"{r['report_test_acc']:.2f}" if r["report_test_acc"] is not None else "-"
        secs = f"{r['train_seconds_mean']:.1f}" if r["train_seconds_mean"] is not None else "-"
        grid = f"| {r.get('grid_points', r['point'])} " if scaled_run else ""
        lines.append(
            f"| {r['point']}{mark} {grid}| {r['seeds_ok']} / {r['seeds_failed']} | "
            f"{pct(r['val_acc_mean'], r['val_acc_std'])} | "
            f"{pct(r['test_acc_mean'], r['test_acc_std'])} | {report} | {secs} |"
        )
    failed = [r for r in rows if r["errors"]]
    if failed:
        lines += ["", "## Failures", ""] + [f"- {r['point']}: {r['errors']}" for r in failed]
    return "\n".join(lines) + "\n"


def sweep_id(
    study: str,
    preset_name: str,
    grid: Mapping[str, Any],
    seeds: Sequence[int],
    extra: Mapping[str, Any],
) -> str:
    """Short id of one sweep: a hash of what defines it (callers add the start time to tell
    repeats apart)."""
    blob = json.dumps(
        {"study": study, "preset": preset_name, "grid": grid, "seeds": list(seeds), **extra},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
