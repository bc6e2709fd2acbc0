"""Fixed cost of orchestration and tracking around training, measured through the real path.

    python benchmarks/flow_overhead.py [--runs 3] [--epochs 2] [--preset seed-baseline]
    python benchmarks/flow_overhead.py --preset fast-cpu --epochs 10 --runs 1 \
        --out benchmarks/results/default-run-overhead.json   # the whole default run

Starts the local stack (Prefect server, pool, worker) in a temporary root, runs
`prefect deployment run train-cifar/<preset> --watch` on the real data, and reports:
  - wall time of the deployment run, the training time inside it, and their difference; that
    difference less the validation after each epoch (summed over the run's epochs as
    `per_epoch_validation_seconds`; it grows with the epochs) is the fixed cost per run
    (`fixed_cost_seconds`; what else grows with the epochs, a checkpoint and a log line each,
    stays in it);
  - the same difference split by Prefect's flow-run timestamps (queue/start-up vs. in-run);
  - MLflow tracking time per epoch (one `log_batch` of the epoch metrics to SQLite), median.
Saves JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from machine_info import cpu_flags, cpu_model  # beside this script

from registry import tracking
from stacks.local import LocalStack
from stacks.processes import free_port, handle_stop_signals

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "cifar10" / "cifar-10-batches-py"


def tracking_cost_per_epoch(root: Path, epochs: int = 30) -> dict[str, float]:
    """Median seconds of one epoch's metric logging into a SQLite store."""
    root.mkdir(parents=True, exist_ok=True)
    store = tracking.open_store(root)
    run_id = tracking.start_run(store, "overhead-probe", {"probe": "1"}, {"config_hash": "probe"})
    times = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        tracking.log_metrics(
            store,
            run_id,
            {
                k: 0.5
                for k in (  # what the flow logs per epoch
                    "train_loss",
                    "train_accuracy",
                    "val_loss",
                    "val_accuracy",
                    "lr",
                    "epoch_seconds",
                    "images_per_second",
                    "val_images",
                    "val_seconds",
                )
            },
            step=epoch,
        )
        times.append(time.perf_counter() - t0)
    tracking.end_run(store, run_id, "FINISHED")
    return {"median_s": statistics.median(times), "max_s": max(times), "epochs": epochs}


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM or SIGHUP (a timeout, a closed terminal) like Ctrl-C: the stack is stopped."""
    handle_stop_signals(signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    """Run deployments through the local stack and report the overhead."""
    handle_stop_signals(_stop)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed-baseline")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--source", default=os.environ.get("CIFAR10_SOURCE", str(DEFAULT_SOURCE)))
    parser.add_argument(
        "--int8",
        choices=("champion", "always", "never"),
        default="champion",
        help="train-cifar's `int8`: which runs build the int8 twin (always: as "
        "every run did before 2026-12-06)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "flow-overhead.json"
    )
    args = parser.parse_args()

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stack = LocalStack(
            root=root,
            port=free_port(),
            extra_env={"CIFAR10_SOURCE": args.source, "PREFECT_UI_ENABLED": "false"},
        )
        t0 = time.perf_counter()
        with stack.running():
            stack_start = time.perf_counter() - t0
            deployment = args.preset if args.preset in ("seed-baseline", "fast-gpu") else "default"
            # The first run also pays the fresh MLflow database's migrations and writes the
            # root's memory-mapped copy of the arrays (once per root): the median absorbs it.
            measured = [
                measure_run(stack, root, deployment, args.preset, args.epochs, seed, args.int8)
                for seed in range(args.runs)
            ]
            tracking_cost = tracking_cost_per_epoch(root / "probe")
    fixed = [r["fixed_cost_seconds"] for r in measured]
    to_final = [r["fixed_cost_to_final_state_seconds"] for r in measured]
    by_alias = {
        alias: round(
            statistics.median(
                r["fixed_cost_to_final_state_seconds"] for r in measured if r["alias"] == alias
            ),
            2,
        )
        for alias in sorted({r["alias"] for r in measured})
    }
    results = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "started": started,
        "code_version": tracking.code_version(ROOT),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "preset": args.preset,
        "epochs": args.epochs,
        "int8": args.int8,
        "stack_start_seconds": round(stack_start, 2),
        "fixed_cost_seconds_median": round(statistics.median(fixed), 2),
        "fixed_cost_seconds_range": [min(fixed), max(fixed)],
        "fixed_cost_to_final_state_seconds_median": round(statistics.median(to_final), 2),
        "fixed_cost_to_final_state_seconds_range": [min(to_final), max(to_final)],
        # Only a version promoted to champion gets the int8 twin (train-cifar's `int8`).
        "fixed_cost_to_final_state_seconds_median_by_alias": by_alias,
        "stage_medians_seconds": {
            key: round(
                statistics.median(r["stages"][key] for r in measured if key in r["stages"]), 2
            )
            for key in measured[0]["stages"]
        },
        "runs": measured,
        "tracking_seconds_per_epoch": tracking_cost,
    }
    print(
        f"fixed cost per run {results['fixed_cost_seconds_median']} s (median of {len(fixed)}: "
        f"{fixed}); to the run's final state "
        f"{results['fixed_cost_to_final_state_seconds_median']} s ({to_final})",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def stages(stack: LocalStack, flow_run_id: str, train_s: float) -> dict[str, float]:
    """Where a flow run's time went, from Prefect's own timestamps: its states (queue, process
    start-up) and each task run; what no task covers is the flow's own code between them."""
    fr = stack.api(f"/flow_runs/{flow_run_id}")
    states = stack.api(f"/flow_run_states/?flow_run_id={flow_run_id}")
    first = {}
    for st in sorted(states, key=lambda x: x["timestamp"]):
        first.setdefault(st["type"], _at(st["timestamp"]))
    created = _at(fr["created"])
    out = {
        "created_to_pending_s (worker picks it up)": (first["PENDING"] - created).total_seconds(),
        "pending_to_running_s (process start, imports, flow load)": (
            first["RUNNING"] - first["PENDING"]
        ).total_seconds(),
    }
    tasks = stack.api(
        "/task_runs/filter",
        {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
    )
    covered = 0.0
    for t in tasks:
        if not (t.get("start_time") and t.get("end_time")):
            continue
        seconds = (_at(t["end_time"]) - _at(t["start_time"])).total_seconds()
        covered += seconds
        name = t["name"].rsplit("-", 1)[0]
        key = f"task {name}_s"
        out[key] = out.get(key, 0.0) + seconds
    in_run = (_at(fr["end_time"]) - _at(fr["start_time"])).total_seconds()
    out["flow code between tasks_s"] = in_run - covered
    out["train_model task minus training_s"] = out.get("task train_model_s", 0.0) - train_s
    return {k: round(v, 2) for k, v in out.items()}


def measure_run(
    stack: LocalStack,
    root: Path,
    deployment: str,
    preset: str,
    epochs: int,
    seed: int,
    int8: str = "champion",
) -> dict[str, object]:
    """One `prefect deployment run --watch`: wall time against the training time inside it."""
    params = [f"preset={preset}", f'train={{"epochs": {epochs}, "seed": {seed}}}', f"int8={int8}"]
    started_at = datetime.now().astimezone()
    t1 = time.perf_counter()
    # What a user types (the benchmark times it; nothing reads what it prints).
    name = deployment if "/" in deployment else f"train-cifar/{deployment}"
    result = stack.cli(
        "deployment",
        "run",
        name,
        "--watch",
        *[arg for p in params for arg in ("--param", p)],
        check=False,
        timeout=3600,
    )
    wall = time.perf_counter() - t1
    if result.returncode != 0:
        raise SystemExit(f"deployment run failed:\n{result.stdout}\n{result.stderr}")
    store = tracking.open_store(root)
    (run,) = [
        r
        for r in store.client.search_runs([store.experiment_id])
        if r.data.params.get("train.seed") == str(seed)
    ]
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    fr = stack.api(f"/flow_runs/{flow_run_id}")
    in_run = (_at(fr["end_time"]) - _at(fr["start_time"])).total_seconds()
    train_s = run.data.metrics["train_seconds"]
    # Validating after each epoch grows with the epochs: apart from the fixed cost.
    val_s = sum(m.value for m in store.client.get_metric_history(run.info.run_id, "val_seconds"))
    # What the CLI adds around the flow run: its own start-up, submitting, and noticing the end
    # (Prefect's `--watch` waits 3 s after the final state for late logs): wall time minus the
    # flow run's life from creation to its end.
    cli_s = wall - (_at(fr["end_time"]) - _at(fr["created"])).total_seconds()
    # ... of which before the flow run exists (the CLI's start-up and its API call) and after it
    # ended (noticing the end, then the wait for late logs): the run is finished, registered and
    # published before the latter begins.
    submit_s = (_at(fr["created"]) - started_at).total_seconds()
    return {
        "alias": run.data.tags.get("registry.alias", "none"),  # set with the alias
        "val_accuracy": run.data.metrics.get("final_val_accuracy"),
        "test_accuracy": run.data.metrics.get("test_accuracy"),
        "deployment_run_wall_seconds": round(wall, 2),
        "training_seconds": round(train_s, 2),
        "overhead_seconds": round(wall - train_s, 2),
        "overhead_share_of_training": round((wall - train_s) / train_s, 4),
        "per_epoch_validation_seconds": round(val_s, 2),
        "fixed_cost_seconds": round(wall - train_s - val_s, 2),
        # The same without the CLI: from the flow run's creation to its end.
        "fixed_cost_without_cli_seconds": round(wall - train_s - val_s - cli_s, 2),
        "flow_run_seconds_running_to_completed": round(in_run, 2),
        "overhead_inside_flow_run_seconds": round(in_run - train_s, 2),
        "queue_and_startup_seconds": round(wall - in_run, 2),
        # From the command to the finished run: what the run costs before the CLI's wait.
        "fixed_cost_to_final_state_seconds": round(wall - train_s - val_s - (cli_s - submit_s), 2),
        "stages": {
            "cli start-up and --watch_s": round(cli_s, 2),
            "cli start-up to flow run created_s": round(submit_s, 2),
            "cli after the final state (--watch)_s": round(cli_s - submit_s, 2),
            **stages(stack, flow_run_id, train_s),
        },
    }


if __name__ == "__main__":
    main()
