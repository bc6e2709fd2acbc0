"""The team stack under load: one sweep on 1 and on 2 worker hosts; tracking cost per run,
SQLite file against the tracking server (PostgreSQL + proxied artifacts).

    python benchmarks/team_scaling.py [--runs 8] [--epochs 2] [--train-size 4000]

1. Starts the team stack (`stacks.team.TeamStack`) in a temporary folder, joins worker hosts
   with `python -m stacks worker` (separate root folders, same checkout), and runs the
   same sweep (`--runs` learning rates x 1 seed, `seed-baseline`, real data where present)
   with 1 worker and `max_parallel=1`, then with 2 workers and `max_parallel=2`. Wall time of
   each `prefect deployment run sweep-cifar/default --watch`, and of each child run.
2. What one run costs the tracking store, without training: the same tracking calls a
   train-cifar run makes (run + params, epochs of metrics, the artifact files of a real run,
   the ONNX model, a registry version) against `sqlite:///...` and against the server; median
   of `--probes`; bytes the artifact proxy stored and the database grew per run.
Saves JSON under benchmarks/results/ with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import cpu_model  # beside this script

from stacks.processes import free_port
from stacks.team import TeamStack, read_env_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "cifar10" / "cifar-10-batches-py"


def start_worker(join_file: Path, name: str, base: Path, env: dict[str, str]) -> subprocess.Popen:
    root = base / name
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stacks",
            "worker",
            "--join",
            str(join_file),
            "--name",
            name,
            "--root",
            str(root),
            "--gpus",
            "1",
        ],
        cwd=ROOT,
        env={**env, "HOME": str(root)},
        start_new_session=True,
        stdout=open(root / "worker.out", "ab"),
        stderr=subprocess.STDOUT,
    )  # noqa: SIM115
    log = root / ".prefect-worker" / "logs" / "worker.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.is_file() and b"started" in log.read_bytes():
            return proc
        time.sleep(0.5)
    raise TimeoutError(f"worker {name} did not start")


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def run_sweep(
    stack: TeamStack, client, lrs: list[float], data: dict, epochs: int, parallel: int
) -> dict:
    t0 = time.perf_counter()
    result = stack.run_deployment(
        "sweep-cifar/default",
        [
            "preset=seed-baseline",
            f"grid={json.dumps({'train.lr': lrs})}",
            "seeds=1",
            f"data={json.dumps(data)}",
            f"train={json.dumps({'epochs': epochs})}",
            f"max_parallel={parallel}",
            "retries=0",
            "min_shared_images=100",
        ],
        timeout=None,
    )
    wall = time.perf_counter() - t0
    if not result.ok:
        raise RuntimeError(result.log_text())
    exp = client.get_experiment_by_name("train-cifar")
    parent = client.search_runs(
        [exp.experiment_id],
        "tags.sweep_role = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    children = client.search_runs(
        [exp.experiment_id],
        f"tags.sweep_id = '{parent.data.tags['sweep_id']}' and tags.sweep_role = 'child'",
    )
    runs = [
        {
            "worker": c.data.tags.get("worker"),
            "seconds": (c.info.end_time - c.info.start_time) / 1000,
            "train_seconds": c.data.metrics.get("train_seconds"),
            "val_accuracy": c.data.metrics.get("final_val_accuracy"),
        }
        for c in children
    ]
    return {
        "workers": parallel,
        "max_parallel": parallel,
        "runs": len(children),
        "wall_seconds": round(wall, 1),
        "median_mlflow_run_seconds": round(statistics.median(r["seconds"] for r in runs), 1),
        "median_train_seconds": round(statistics.median(r["train_seconds"] for r in runs), 2),
        "runs_per_worker": {
            w: sum(r["worker"] == w for r in runs) for w in sorted({r["worker"] for r in runs})
        },
        "child_runs": runs,
    }


def tracking_probe(uri: str, onnx: Path, files: dict[str, Path], probes: int, epochs: int) -> dict:
    """Seconds per step of the tracking calls one run makes (no training), median of probes."""
    import numpy as np

    from registry import run_logging, tracking, versions

    os.environ["MLFLOW_TRACKING_URI"] = uri
    store = tracking.open_store(Path(tempfile.mkdtemp()), experiment="tracking-probe")
    steps: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    params = {f"section.param_{i}": str(i) for i in range(60)}  # a config has about 60
    example = np.zeros((2, 3, 32, 32), np.float32)
    for n in range(probes):
        run_id = timed(
            "start_run_and_params",
            lambda: tracking.start_run(store, f"probe-{n}", params, {"config_hash": f"probe-{n}"}),
        )
        timed(
            f"metrics_{epochs}_epochs",
            lambda: [
                tracking.log_metrics(
                    store,
                    run_id,
                    {
                        k: 0.5
                        for k in (
                            "train_loss",
                            "train_accuracy",
                            "val_loss",
                            "val_accuracy",
                            "lr",
                            "epoch_seconds",
                            "images_per_second",
                        )
                    },
                    step=e,
                )
                for e in range(1, epochs + 1)
            ],
        )
        timed("artifacts", lambda: tracking.log_files(store, run_id, files))
        logged = timed(
            "onnx_model",
            lambda: run_logging.log_onnx_model(
                store, run_id, onnx, example, metadata={"probe": True}
            ),
        )
        timed(
            "registry_version",
            lambda: versions.create_version(
                store, run_id, logged.model_uri, {}, name="tracking-probe", model_id=logged.model_id
            ),
        )
        timed("end_run", lambda: tracking.end_run(store, run_id, "FINISHED"))
    med = {k: round(statistics.median(v), 4) for k, v in steps.items()}
    return {
        "uri": tracking.display_uri(uri),
        "probes": probes,
        "median_seconds": med,
        "median_total_seconds": round(sum(med.values()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--source", default=os.environ.get("CIFAR10_SOURCE", str(DEFAULT_SOURCE)))
    parser.add_argument(
        "--tracking-only",
        action="store_true",
        help="one run on one worker (for real files), then only the tracking "
        "probes: SQLite, the server, and the server without its auth cache",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: results/team-scaling.json (team-tracking.json with --tracking-only)",
    )
    args = parser.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "team-tracking.json" if args.tracking_only else "team-scaling.json"
    )
    if args.tracking_only:
        args.runs = 1
    os.environ.update(
        {
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "BENTOML_DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    base = Path(tempfile.mkdtemp(prefix="team-scaling-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update({"CIFAR10_SOURCE": args.source, "PREFECT_WORKER_QUERY_SECONDS": "2"})
    stack = TeamStack(
        base / "server",
        prefect_port=free_port(),
        mlflow_port=free_port(),
        pg_port=free_port(),
        s3_port=free_port(),
        extra_env={"PREFECT_UI_ENABLED": "false", "CIFAR10_SOURCE": args.source},
    )
    lrs = [round(4e-4 * 1.25**i, 6) for i in range(args.runs)]
    data = {"train_size": args.train_size, "val_size": args.val_size}
    workers = []
    out: dict = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "sweep": {
            "preset": "seed-baseline",
            "runs": args.runs,
            "epochs": args.epochs,
            **data,
            "source": args.source,
        },
    }
    t0 = time.perf_counter()
    with stack.running():
        out["team_stack_start_seconds"] = round(time.perf_counter() - t0, 1)
        join = read_env_file(stack.join_file)
        os.environ.update(join)
        from mlflow import MlflowClient

        client = MlflowClient(join["MLFLOW_TRACKING_URI"], join["MLFLOW_TRACKING_URI"])
        try:
            workers.append(start_worker(stack.join_file, "host-a", base, env))
            out["one_worker"] = run_sweep(stack, client, lrs, data, args.epochs, 1)
            print(
                json.dumps({k: v for k, v in out["one_worker"].items() if k != "child_runs"}),
                flush=True,
            )
            if not args.tracking_only:
                workers.append(start_worker(stack.join_file, "host-b", base, env))
                out["two_workers"] = run_sweep(stack, client, lrs, data, args.epochs, 2)
                print(
                    json.dumps({k: v for k, v in out["two_workers"].items() if k != "child_runs"}),
                    flush=True,
                )
                out["speedup_two_workers"] = round(
                    out["one_worker"]["wall_seconds"] / out["two_workers"]["wall_seconds"], 2
                )
            # A real run's files for the tracking probe.
            exp = client.get_experiment_by_name("train-cifar")
            sample = client.search_runs(
                [exp.experiment_id], "tags.sweep_role = 'child'", max_results=1
            )[0]
            files_dir = base / "sample-artifacts"
            local = Path(client.download_artifacts(sample.info.run_id, "", str(files_dir)))
            files = {p.name: p for p in local.iterdir() if p.is_file()}
            onnx = next((base / "host-a").rglob("model.onnx"))
            out["artifact_bytes_per_run"] = (
                sum(p.stat().st_size for p in files.values()) + onnx.stat().st_size
            )
            out["artifact_files_per_run"] = sorted(files)
        finally:
            for w in workers:
                stop(w)
        import psycopg

        from stacks.postgres import DATABASES

        def db_bytes():
            with psycopg.connect(stack.db.url(DATABASES["mlflow"])) as conn:
                return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]

        before = db_bytes()
        server = tracking_probe(join["MLFLOW_TRACKING_URI"], onnx, files, args.probes, 30)
        server["database_bytes_per_run"] = (db_bytes() - before) // args.probes
        sqlite_root = base / "sqlite"
        sqlite_root.mkdir()
        db_file = sqlite_root / "mlflow.db"
        tracking_probe(f"sqlite:///{db_file}", onnx, files, 1, 30)  # migrations, warm-up
        size0 = db_file.stat().st_size
        local_probe = tracking_probe(f"sqlite:///{db_file}", onnx, files, args.probes, 30)
        local_probe["database_bytes_per_run"] = (db_file.stat().st_size - size0) // args.probes
        out["tracking_per_run"] = {
            "sqlite": local_probe,
            "server": server,
            "server_auth_cache_seconds": stack.auth_cache_seconds,
            "server_over_sqlite": round(
                server["median_total_seconds"] / local_probe["median_total_seconds"], 2
            ),
        }
        # The same probes with MLflow's auth cache off (its default): every request then
        # checks the password hash.
        stack.services.stop("mlflow")
        stack.auth_cache_seconds = 0
        stack.start_mlflow_server(stack.db)
        no_cache = tracking_probe(join["MLFLOW_TRACKING_URI"], onnx, files, args.probes, 30)
        out["tracking_per_run"]["server_auth_cache_off"] = no_cache
        out["tracking_per_run"]["cache_off_over_on"] = round(
            no_cache["median_total_seconds"] / server["median_total_seconds"], 2
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in out.items() if k not in ("one_worker", "two_workers")}, indent=2
        )
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
