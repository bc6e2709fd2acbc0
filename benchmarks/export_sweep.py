"""Copy a finished sweep's summary out of MLflow into benchmarks/results/.

    python benchmarks/export_sweep.py --study report-lr --name sweep-report-lr-cpu-full \\
        [--tracking-uri sqlite:///path/to/mlflow.db]

Takes the newest FINISHED `sweep-cifar` parent run of the study and writes `<name>.md`,
`<name>.csv`, `<name>.png` and `<name>-runs.json` (every child run: point, seed, validation and
test accuracy of its served model, training seconds), plus the CPU it ran on in the markdown.
With `--resummarise` the table, notes and plot are rebuilt from the child runs in MLflow with
this checkout's `cifarlab/sweep.py` (for a sweep that ran with older summary code).
The sweep itself is `make sweep STUDY=... SEEDS=...` (or `prefect deployment run sweep-cifar/...`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from machine_info import cpu_model  # beside this script

from registry import tracking

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "sweep_summary.md": ".md",
    "sweep_summary.csv": ".csv",
    "sweep_accuracy.png": ".png",
    "sweep_runs.json": "-runs.json",
}


def resummarise(store: tracking.Store, experiment_id: str, parent, out: Path, name: str) -> None:
    """Rebuild the summary of a finished sweep from its child runs with the current code."""
    from cifarlab import studies
    from cifarlab import sweep as sw
    from cifarlab.plots import plot_sweep

    p = parent.data.params
    study = studies.STUDIES.get(p["study"])
    epoch_scale, data_scale = float(p["epoch_scale"]), float(p["data_scale"])
    grid = json.loads(p["grid"])
    points, scale_notes = sw.scale_points(
        sw.expand(p["preset"], grid, json.loads(p["common_overrides"])),
        p["preset"],
        epoch_scale,
        data_scale,
    )
    sid = parent.data.tags["sweep_id"]
    seeds = list(range(int(p["first_seed"]), int(p["first_seed"]) + int(p["seeds"])))
    runs: dict[tuple[str | None, str | None], Any] = {}
    for r in store.client.search_runs(
        [experiment_id], f"tags.sweep_id = '{sid}'", max_results=5000
    ):
        key = (r.data.tags.get("sweep_point"), r.data.tags.get("sweep_seed"))
        if r.data.tags.get("sweep_role") == "child" and (
            key not in runs or r.info.status == "FINISHED"
        ):  # a finished attempt wins
            runs[key] = r
    outcomes = []
    for point in points:
        for seed in seeds:
            run = runs.get((point.label, str(seed)))
            if run is not None and run.info.status == "FINISHED":
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
                outcomes.append(sw.Outcome(point, seed, "failed", error="no finished run"))
    rows = sw.summarise(outcomes, study.report if study else None)
    best = sw.best_point(rows)
    notes = sw.summary_notes(
        p["study"],
        p["preset"],
        study,
        len(points),
        seeds,
        epoch_scale,
        data_scale,
        parent.info.run_id,
        sid,
        scale_notes,
    )
    (out / f"{name}.md").write_text(
        sw.to_markdown(f"sweep-cifar: {p['study']}", rows, best, notes)
        + "\n(Summary rebuilt from the child runs by "
        "`export_sweep.py --resummarise`.)\n"
    )
    (out / f"{name}.csv").write_text(sw.to_csv(rows))
    plot_sweep(rows, list(grid), out / f"{name}.png")
    (out / f"{name}-runs.json").write_text(
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
        + "\n"
    )


def main() -> None:
    """Find the sweep's parent run and copy its summary files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--name", required=True, help="file name stem under benchmarks/results")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else the project's mlflow.db",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--note", default="", help="how it ran (threads, load), for the record")
    parser.add_argument(
        "--resummarise",
        action="store_true",
        help="rebuild table and plot from the child runs with this checkout's code",
    )
    parser.add_argument(
        "--sweep-id",
        default=None,
        help="this sweep, whatever its parent's state (an interrupted sweep whose "
        "children were finished later; needs --resummarise)",
    )
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = args.tracking_uri or tracking.tracking_uri(ROOT)
    store = tracking.Store(uri, "")
    exp = store.client.get_experiment_by_name(tracking.EXPERIMENT)
    if exp is None:
        raise SystemExit(f"no experiment {tracking.EXPERIMENT!r} in {uri}")
    which = (
        f"tags.sweep_id = '{args.sweep_id}'" if args.sweep_id else "attributes.status = 'FINISHED'"
    )
    if args.sweep_id and not args.resummarise:
        raise SystemExit("--sweep-id needs --resummarise (its parent may have no summary)")
    runs = store.client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.sweep_role = 'parent' and tags.study = '{args.study}' and {which}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"no finished sweep of {args.study!r} in {uri}")
    parent = runs[0]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.resummarise:
        resummarise(store, exp.experiment_id, parent, args.out, args.name)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for artifact, suffix in FILES.items():
                local = store.client.download_artifacts(parent.info.run_id, artifact, tmp)
                shutil.copyfile(local, args.out / f"{args.name}{suffix}")
    for suffix in FILES.values():
        print(f"wrote {args.out / (args.name + suffix)}")
    md = args.out / f"{args.name}.md"
    children = store.client.search_runs(
        [exp.experiment_id], f"tags.sweep_id = '{parent.data.tags['sweep_id']}'", max_results=5000
    )
    end = max([parent.info.end_time or 0, *(c.info.end_time or 0 for c in children)])
    minutes = (end - parent.info.start_time) / 60000
    md.write_text(
        md.read_text() + f"\nRan on {cpu_model()} ({os.cpu_count()} cores), "
        f"{minutes:.0f} minutes for the whole sweep; MLflow parent run "
        f"`{parent.info.run_id}`; exported by `python benchmarks/export_sweep.py "
        f"--study {args.study} --name {args.name}"
        f"{' --resummarise' if args.resummarise else ''}"
        f"{' --sweep-id ' + args.sweep_id if args.sweep_id else ''}`."
        f"{' ' + args.note if args.note else ''}\n"
    )


if __name__ == "__main__":
    main()
