"""End to end through the real path: `prefect server` on 127.0.0.1, the work pool, a worker,
`prefect deploy` from prefect.yaml and `prefect deployment run ... --watch`, then the MLflow store.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from flows.stack import LocalStack, free_port
from flows.tracking import REGISTERED_MODEL


def _processes_with(marker: str) -> list[int]:
    """PIDs whose environment mentions `marker` (our temporary PREFECT_HOME)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack-root")
    home = root / ".prefect-home"
    s = LocalStack(root=root, port=free_port(), prefect_home=home,
                   extra_env={"PREFECT_UI_ENABLED": "false",
                              "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    with s.running():
        yield s
    deadline = time.monotonic() + 10
    while _processes_with(str(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with(str(home)) == [], "the stack left processes behind"


@pytest.fixture(scope="module")
def params(synthetic_cifar):
    folder, sums = synthetic_cifar
    data = {"source": str(folder), "checksums": sums, "train_size": 240, "val_size": 60}
    return [f"data={json.dumps(data)}"]


def _client(root: Path) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_deployment_run_trains_tracks_and_registers(stack, params, tmp_path):
    result = stack.run_deployment("seed-baseline", [*params, 'train={"epochs": 2}'], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Completed" in result.stdout
    # Training held the one slot of the `gpu` tag's concurrency limit.
    assert "concurrency-limit.acquired" in result.stdout and "tag:gpu" in result.stdout
    limit = json.loads(stack.cli("concurrency-limit", "inspect", "gpu", "--output", "json").stdout)
    assert limit["tag"] == "gpu" and limit["concurrency_limit"] == 1

    client = _client(stack.root)
    exp = client.get_experiment_by_name("train-cifar")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["preset"] == "seed-baseline" and run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert run.data.tags["prefect.flow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning_curves.png", "confusion_matrix.png", "onnx-model", "weights.pt"} <= artifacts

    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert champion.run_id == run.info.run_id
    # The registered ONNX model loads in onnxruntime and predicts a batch of any size.
    import onnxruntime as ort

    assert champion.source == f"runs:/{run.info.run_id}/onnx-model"
    local = client.download_artifacts(champion.run_id, "onnx-model", str(tmp_path))
    (onnx_file,) = Path(local).glob("*.onnx")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": np.zeros((7, 3, 32, 32), np.float32)})[0]
    assert logits.shape == (7, 10)


def _flow_run_processes(marker: str) -> list[int]:
    pids = []
    for pid in _processes_with(marker):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"prefect.engine" in cmd or b"flow_run" in cmd:
            pids.append(pid)
    return pids


def test_killed_training_is_resumed_by_the_next_run(stack, params):
    run_params = [*params, 'train={"epochs": 25, "seed": 7}']
    started = stack.cli("deployment", "run", "train-cifar/seed-baseline",
                        *sum((["--param", p] for p in run_params), []))
    assert started.returncode == 0

    # Wait for the first epoch's checkpoint, then kill the flow-run process outright.
    deadline = time.monotonic() + 240
    checkpoint = None
    while time.monotonic() < deadline and checkpoint is None:
        for path in (stack.root / "runs").glob("seed-baseline-*/checkpoint.pt"):
            if "seed-baseline" in path.parent.name and (path.parent / "config.json").exists():
                if json.loads((path.parent / "config.json").read_text())["train"]["seed"] == 7:
                    checkpoint = path
        time.sleep(0.2)
    assert checkpoint is not None, "training never wrote a checkpoint"
    victims = _flow_run_processes(str(stack.home))
    assert victims, "no flow-run process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    client = _client(stack.root)
    exp = client.get_experiment_by_name("train-cifar")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.params.get("train.seed") == "7"]
    (killed,) = runs
    assert killed.info.status == "RUNNING" and killed.data.tags["registered"] == "false"

    time.sleep(3)  # let the worker report the crash
    result = stack.run_deployment("seed-baseline", run_params, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.params.get("train.seed") == "7"]
    (resumed,) = runs  # resumed, not duplicated
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(set(steps)) == list(range(1, 26))
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert [v.run_id for v in versions].count(resumed.info.run_id) == 1
