"""End to end through the real path: `prefect server` on 127.0.0.1, the work pools, workers,
`prefect deploy` from prefect.yaml and deployment runs started through Prefect's client, then
the MLflow store.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from registry.tracking import REGISTERED_MODEL
from stacks.local import ZOMBIE_AUTOMATION, LocalStack
from stacks.processes import free_port

pytestmark = pytest.mark.e2e


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


# Longer than the 80 columns a CLI without a terminal wraps its output at (a second start once
# failed on such a description, split by a raw newline in what `prefect automation inspect` printed).
LONG_DESCRIPTION = (
    "Crash flow runs whose host stopped sending heartbeats: a description much "
    "longer than eighty columns, on purpose, {n}"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The local stack, started, stopped and started again in the same folder (as a user's
    second `make run` does); every test of this module runs through the second start."""
    root = tmp_path_factory.mktemp("stack-root")
    home = root / ".prefect-home"
    port = free_port()

    def make(n: int) -> LocalStack:
        return LocalStack(
            root=root,
            port=port,
            prefect_home=home,
            extra_env={
                "PREFECT_UI_ENABLED": "false",
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                "CIFAR_ZOMBIE_DESCRIPTION": LONG_DESCRIPTION.format(n=n),
                # Where this machine's service would write its records (the monitor reads it).
                "CIFAR_PREDICTION_LOG_DIR": str(root / "prediction-log"),
            },
        )

    with make(1).running():
        pass
    assert _processes_with(str(home)) == [], "the first stack left processes behind"
    with make(2).running() as s:
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


def _progress(stack: LocalStack, flow_run_id: str) -> list[float]:
    """The progress artifacts of a flow run, as the Prefect UI shows them (percent)."""
    return [
        a["data"]
        for a in stack.api(
            "/artifacts/filter",
            {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["progress"]}}},
        )
    ]


def test_deployment_run_trains_tracks_and_registers(stack, params, tmp_path):
    import io

    # As `make run` shows it: the run's log lines as they come, epochs with the time left, and
    # a closing summary saying how well, where to look and how to serve it.
    out = io.StringIO()
    ended = stack.follow_deployment("seed-baseline", [*params, 'train={"epochs": 2}'], out=out)
    text = out.getvalue()
    assert ended.ok and ended.state == "Completed", text
    assert "epoch 1/2:" in text and "epoch 2/2:" in text and "of training left" in text, text
    assert "validation" in text and "MLflow run: http://127.0.0.1:5000/#/experiments/" in text
    assert "is champion" in text and "serve it: make serve" in text, text
    # Two pools: training on `gpu`, sweeps on `control`.
    with stack.client() as prefect:
        pools = {p.name for p in prefect.read_work_pools()}
        # Flow runs whose host falls silent are crashed by an automation (stacks/local.py).
        (automation,) = prefect.read_automations_by_name(ZOMBIE_AUTOMATION)
    assert {"gpu", "control"} <= pools
    # The second start found the first's automation and brought its description up to date.
    assert automation.description == LONG_DESCRIPTION.format(n=2)
    assert automation.trigger.within.total_seconds() == 300

    client = _client(stack.root)
    exp = client.get_experiment_by_name("train-cifar")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["preset"] == "seed-baseline" and run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert _progress(stack, run.data.tags["prefect.flow_run_id"]) == [100.0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "learning_curves.png",
        "confusion_matrix.png",
        "model_card.md",
        "weights.pt",
    } <= artifacts

    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert champion.run_id == run.info.run_id
    # The registered ONNX model (a LoggedModel of the run) loads in onnxruntime and predicts a
    # batch of any size.
    import onnxruntime as ort

    from registry.tracking import Store
    from registry.versions import download_onnx, version_uri

    assert champion.source == f"models:/{run.data.tags['onnx_model_id']}"
    store = Store(f"sqlite:///{stack.root / 'mlflow.db'}", "")
    onnx_file = download_onnx(store, version_uri(store, champion), tmp_path)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": np.zeros((7, 3, 32, 32), np.float32)})[0]
    assert logits.shape == (7, 10)


def test_drift_found_by_the_monitor_deployment_starts_a_retraining(
    stack, synthetic_cifar, tmp_path
):
    """monitor-cifar/hourly run through the stack on brighter answers of the champion, found
    in this host's prediction log as the hourly runs find them: drift,
    its event, and the trigger of prefect.yaml creating one train-cifar/default run (the gpu pool
    is paused meanwhile, so that the run is looked at and deleted, not trained)."""
    from uuid import UUID

    from prefect.client.schemas.actions import WorkPoolUpdate

    from tests.test_monitor import champion_engine, serve_brighter

    version, engine, val = champion_engine(_client(stack.root), tmp_path / "dl", synthetic_cifar[0])
    serve_brighter(stack.root / "prediction-log", engine, version, val)  # as `make serve` would
    with stack.client() as prefect:
        prefect.update_work_pool("gpu", WorkPoolUpdate(is_paused=True))
    try:
        ended = stack.follow_deployment(
            "monitor-cifar/hourly",
            ["min_images=100"],  # the last hour of this host's log, as every hour
        )
        assert ended.ok and ended.state == "Completed"
        deadline, runs = time.monotonic() + 30, []
        while not runs and time.monotonic() < deadline:
            time.sleep(1)
            runs = [r for r in stack.api("/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["train"]}}})
                    if r["created_by"] and r["created_by"]["type"] == "AUTOMATION"]  # fmt: skip
        assert len(runs) == 1 and runs[0]["parameters"]["feedback_images"] == "auto"
        assert runs[0]["parameters"]["mlflow_tags"]["cifar.drift_model_version"] == version
        with stack.client() as prefect:
            prefect.delete_flow_run(UUID(runs[0]["id"]))
    finally:
        with stack.client() as prefect:
            prefect.update_work_pool("gpu", WorkPoolUpdate(is_paused=False))
    monitoring = _client(stack.root).get_experiment_by_name("cifar10-monitoring")
    (check,) = _client(stack.root).search_runs([monitoring.experiment_id], "tags.drift = 'true'")
    assert check.data.tags["model_version"] == version


def _flow_run_processes(marker: str) -> list[int]:
    pids = []
    for pid in _processes_with(marker):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"prefect.engine" in cmd:  # how Prefect's process worker starts a flow run
            pids.append(pid)
    return pids


def _flow_run_state(stack: LocalStack, flow_run_id: str) -> str:
    return stack.api(f"/flow_runs/{flow_run_id}")["state"]["type"]


def test_killed_training_is_resumed_by_the_next_run(stack, params):
    run_params = [*params, 'train={"epochs": 25, "seed": 7}']
    stack.start_deployment("seed-baseline", run_params)

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
    runs = [
        r for r in client.search_runs([exp.experiment_id]) if r.data.params.get("train.seed") == "7"
    ]
    (killed,) = runs
    assert killed.info.status == "RUNNING" and killed.data.tags["registered"] == "false"

    # The worker reports the crash: wait for that state, not a fixed time.
    flow_run_id = killed.data.tags["prefect.flow_run_id"]
    deadline = time.monotonic() + 60
    while (
        _flow_run_state(stack, flow_run_id) not in ("CRASHED", "FAILED")
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert _flow_run_state(stack, flow_run_id) in ("CRASHED", "FAILED")
    result = stack.run_deployment("seed-baseline", run_params, timeout=600)
    assert result.ok, result.log_text()
    runs = [
        r for r in client.search_runs([exp.experiment_id]) if r.data.params.get("train.seed") == "7"
    ]
    (resumed,) = runs  # resumed, not duplicated
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(set(steps)) == list(range(1, 26))
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert [v.run_id for v in versions].count(resumed.info.run_id) == 1


def test_sweep_runs_points_through_the_deployment(stack, synthetic_cifar):
    """2 values x 2 seeds through sweep-cifar/default -> train-cifar/default on the worker.

    train_size=240 fits the synthetic data; 1000 passes validation but fails in the split task,
    so that point is retried once and reported, and the sweep carries on."""
    folder, sums = synthetic_cifar
    client = _client(stack.root)
    before = {v.version for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")}
    try:
        old_champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
        old_val = float(old_champion.tags["val_accuracy"])
    except Exception:
        old_val = None
    params = [
        "preset=seed-baseline",
        'grid={"data.train_size": [240, 1000]}',
        "seeds=2",
        f"data={json.dumps({'source': str(folder), 'checksums': sums, 'val_size': 60})}",
        'train={"epochs": 1}',
        "retries=1",
        "retry_delay_s=1",
        "min_shared_images=50",
        "max_parallel=2",
    ]
    result = stack.run_deployment("sweep-cifar/default", params, timeout=900)
    assert result.ok, result.log_text()

    exp = client.get_experiment_by_name("train-cifar")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep_role = 'parent'")
    sid = parent.data.tags["sweep_id"]
    children = client.search_runs(
        [exp.experiment_id], f"tags.sweep_role = 'child' and tags.sweep_id = '{sid}'"
    )
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 2  # train_size=240, seeds 0 and 1
    assert {c.data.params["train.seed"] for c in finished} == {"0", "1"}
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    # The sweep's progress in the Prefect UI: every one of its 4 runs ended (2 failed).
    assert _progress(stack, parent.data.tags["prefect.flow_run_id"]) == [100.0]
    assert all(c.data.params["data.train_size"] == "240" for c in finished)
    # One host, one device: its worker (`--limit 1`) never trains two runs at once, although
    # the sweep asked for two in parallel.
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    # The summary: a CSV/markdown table and the plot on the parent run.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "sweep_summary.csv",
        "sweep_summary.md",
        "sweep_runs.json",
        "sweep_accuracy.png",
    } <= artifacts
    local = client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(stack.root))
    rows = {r["data.train_size"]: r for r in csv.DictReader(open(local))}
    good, bad = rows["240"], rows["1000"]
    assert good["seeds_ok"] == "2" and good["seeds_failed"] == "0"
    vals = [c.data.metrics["final_val_accuracy"] for c in finished]
    assert float(good["val_acc_mean"]) == pytest.approx(np.mean(vals), abs=1e-9)
    assert float(good["val_acc_std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-9)
    assert bad["seeds_ok"] == "0" and bad["seeds_failed"] == "2"
    assert "exceeds the 300 training images" in bad["errors"]
    # The failed point was retried: two attempts of each of its two seeds.
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with stack.client() as prefect:
        flow_runs = prefect.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["train-cifar"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED]))
            ),
            limit=50,
        )
    assert sum('"train_size": 1000' in json.dumps(f.parameters) for f in flow_runs) == 4
    # The best point went through the champion rule.
    assert parent.data.tags["best_point"] == "data.train_size=240"
    candidate = parent.data.tags["candidate_run_id"]
    assert candidate in {c.info.run_id for c in finished}
    assert client.get_run(candidate).data.metrics["final_val_accuracy"] == max(vals)
    new = [
        v
        for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
        if v.version not in before
    ]
    (version,) = new
    assert version.run_id == candidate
    alias = parent.data.tags["registry.alias"]
    if old_val is None:
        assert alias == "champion"
    else:  # judged against the champion on the 60 validation images both runs share
        shared = float(version.tags["shared_accuracy"])
        assert version.tags["shared_images"] == "60"
        assert alias == (
            "champion" if shared > float(version.tags["champion_shared_accuracy"]) else "challenger"
        ), version.tags["promotion_reason"]
    # The sweep's runs build no int8 twin; the version it promotes gets one (on its run).
    others = [c for c in finished if c.info.run_id != candidate]
    assert all("int8_val_accuracy" not in c.data.metrics for c in others)
    has_twin = "int8_val_accuracy" in client.get_run(candidate).data.metrics
    assert has_twin == (alias == "champion") == ("int8_servable" in version.tags)
    # The registry version carries the point's statistics, not just its best seed's.
    assert float(version.tags["sweep_point_val_mean"]) == pytest.approx(np.mean(vals), abs=1e-6)
    assert float(version.tags["sweep_point_val_sd"]) == pytest.approx(
        np.std(vals, ddof=1), abs=1e-6
    )
    assert "mean ± sd over 2 seeds" in version.description


def test_sigterm_to_a_stack_run_leaves_nothing_behind(tmp_path, synthetic_cifar):
    """`python -m stacks run` killed by a timeout (SIGTERM) mid-training stops the
    workers, the flow run they started and the server: no process of its root is left."""
    import subprocess
    import sys

    folder, sums = synthetic_cifar
    root = tmp_path / "root"
    data = {"source": str(folder), "checksums": sums, "train_size": 240, "val_size": 60}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stacks",
            "run",
            "--root",
            str(root),
            "--port",
            str(free_port()),
            "--deployment",
            "seed-baseline",
            "-p",
            f"data={json.dumps(data)}",
            "-p",
            'train={"epochs": 500}',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PREFECT_UI_ENABLED": "false"},
    )
    seen = []
    try:
        for line in proc.stdout:  # training has started once an epoch is reported
            seen.append(line)
            if "epoch 1/500" in line:
                break
        assert any("epoch 1/500" in line for line in seen), "".join(seen)
        assert _processes_with(str(root)), "no flow-run process found"
        proc.send_signal(signal.SIGTERM)
        # Each worker may take Prefect's 30 s kill grace (+5), then the server its 15 s.
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "the stack is down" in rest, rest
    assert _processes_with(str(root)) == [], "the stack left processes behind"


def test_a_start_that_fails_half_way_stops_what_it_started(tmp_path):
    """`python -m stacks up` whose deploy step fails (an entrypoint that does not exist)
    exits non-zero naming the step, after the Prefect server had started and its pools were made:
    no process of its root is left and its port is free again."""
    import socket
    import subprocess
    import sys

    project = Path(__file__).resolve().parents[1]
    bad = tmp_path / "prefect.yaml"
    bad.write_text(
        (project / "prefect.yaml")
        .read_text()
        .replace("flows/train_flow.py:train_cifar", "flows/no_such_flow.py:train_cifar", 1)
    )
    root, port = tmp_path / "root", free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stacks",
            "up",
            "--root",
            str(root),
            "--port",
            str(port),
            "--prefect-file",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=project,
        env={**os.environ, "PREFECT_UI_ENABLED": "false"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "step 'deployments'" in errors[0] and "no_such_flow.py" in errors[0], done.stderr
    assert (root / ".prefect" / "logs" / "server.log").is_file()  # the server had started
    left = _processes_with(str(root))
    assert left == [], f"the failed start left processes behind: {left}; {done.stderr}"
    with socket.socket() as free:
        # SO_REUSEADDR as servers set it: connections the stopped server closed may still be in
        # TIME_WAIT on the port (a plain bind then fails, as it did once here), but a bind and
        # listen succeed only where no process listens any more.
        free.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        free.bind(("127.0.0.1", port))
        free.listen()
