"""Artifacts through the tracking server: SeaweedFS (S3) behind it against its local disk, and
the team stack's start time with the object server.

    python benchmarks/objectstore_bench.py [--mb 100] [--repeats 3]

1. Two `mlflow server` processes on 127.0.0.1, on one SQLite file each, with proxied artifacts:
   one with `--artifacts-destination` a local folder, one with `s3://<bucket>/mlartifacts` on a
   SeaweedFS started as the team stack starts it (stacks/objectstore.py). A client logs a file
   of `--mb` MB of random bytes as an artifact (`MlflowClient.log_artifact`, through the server)
   and downloads it again, both ways through the server as the project's clients do (no
   presigned URLs of the object store: registry.tracking.files_through_the_server, checked in
   the server's log); the two servers take turns, `--repeats` times; medians in MB/s, and a
   sha256 check of every download.
2. The team stack (`stacks.team.TeamStack`: PostgreSQL, Prefect, SeaweedFS, MLflow, pools,
   deployments, workers) started and stopped in a temporary folder: seconds per step.
Saves benchmarks/results/objectstore.json with the CPU model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from machine_info import cpu_model  # beside this script

from registry.tracking import files_through_the_server
from stacks.objectstore import LocalSeaweed
from stacks.processes import Services, _exe, free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]


def mlflow_server(services: Services, name: str, folder: Path, destination: str, env: dict) -> str:
    port = free_port()
    args = [_exe("mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", destination, "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]  # fmt: skip
    proc = services.spawn(name, args, env={**os.environ, **env,
                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "TMPDIR": str(folder)})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 120, proc, services.logs / f"{name}.log")
    return url


def one_trip(url: str, path: Path, digest: str, tmp: Path) -> tuple[float, float]:
    """(upload s, download s) of `path` as an artifact of a new run."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("bench") or client.get_experiment(
        client.create_experiment("bench")
    )
    run = client.create_run(exp.experiment_id).info.run_id
    t0 = time.perf_counter()
    client.log_artifact(run, str(path))
    up = time.perf_counter() - t0
    dest = tmp / f"dl-{run}"
    dest.mkdir()
    t0 = time.perf_counter()
    got = Path(client.download_artifacts(run, path.name, str(dest)))
    down = time.perf_counter() - t0
    sha = hashlib.sha256()
    with got.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    assert sha.hexdigest() == digest, "the downloaded file differs from the uploaded one"
    got.unlink()
    return up, down


def throughput(mb: int, repeats: int, base: Path) -> dict:
    base.mkdir(parents=True)
    path = base / "artifact.bin"
    with path.open("wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    services = Services(base / "logs", dict(os.environ))
    keys = {"S3_ACCESS_KEY": "bench", "S3_SECRET_KEY": os.urandom(12).hex(), "S3_FILER_KEY": "k"}
    try:
        t0 = time.perf_counter()
        store = LocalSeaweed(base / "seaweedfs", free_port(), keys).start(
            services, base / "logs" / "seaweedfs.log"
        )
        seaweed_start = time.perf_counter() - t0
        (base / "disk").mkdir()
        (base / "s3").mkdir()
        urls = {
            "local disk": mlflow_server(
                services, "mlflow-disk", base / "disk", str(base / "disk" / "mlartifacts"), {}
            ),  # fmt: skip
            "seaweedfs s3": mlflow_server(
                services, "mlflow-s3", base / "s3", store.destination, store.server_env()
            ),  # fmt: skip
        }
        trips: dict[str, list[tuple[float, float]]] = {k: [] for k in urls}
        files_through_the_server()
        for _ in range(repeats):
            for name, url in urls.items():
                trips[name].append(one_trip(url, path, digest, base))
        log = (base / "logs" / "mlflow-s3.log").read_text()
        assert "/mlflow-artifacts/presigned/" not in log, "a download bypassed the server"
    finally:
        services.stop_all(graces={"seaweedfs": 35})
    out = {"file_mb": mb, "repeats": repeats, "seaweedfs_start_s": round(seaweed_start, 2)}
    for name, values in trips.items():
        up = statistics.median(v[0] for v in values)
        down = statistics.median(v[1] for v in values)
        out[name] = {"upload_s": [round(v[0], 3) for v in values],
                     "download_s": [round(v[1], 3) for v in values],
                     "upload_mb_s_median": round(mb / up, 1),
                     "download_mb_s_median": round(mb / down, 1)}  # fmt: skip
    return out


def stack_start(base: Path) -> dict:
    from stacks.team import TeamStack

    stack = TeamStack(base / "server", prefect_port=free_port(), mlflow_port=free_port(),
                      pg_port=free_port(), s3_port=free_port(),
                      extra_env={"PREFECT_UI_ENABLED": "false"})  # fmt: skip
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for name, step in stack.start_steps():
            t = time.perf_counter()
            step()
            steps[name] = round(time.perf_counter() - t, 2)
        total = time.perf_counter() - t0
    finally:
        t = time.perf_counter()
        stack.stop()
        stop_s = time.perf_counter() - t
    return {"start_s": round(total, 2), "steps_s": steps, "stop_s": round(stop_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/objectstore.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="objectstore-bench-") as tmp:
        result = {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count()},
            "artifacts": throughput(args.mb, args.repeats, Path(tmp) / "a"),
            "team_stack": stack_start(Path(tmp) / "b"),
        }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
