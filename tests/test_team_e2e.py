"""The team stack end to end, several "hosts" on this machine that share nothing but URLs.

- a server folder: `TeamStack` = a real PostgreSQL, the Prefect server and the MLflow tracking
  server on it (basic auth, proxied artifacts), the pools, the deployments, the control worker;
- two GPU-host folders, each with its own copy of the project, HOME, root folder and data copy,
  joined with `python -m stacks worker --join team.env`;
- a serving folder that imports the champion over HTTP and answers a `curl`.

Then faults: the MLflow server and the database restarted under a training run, and a host
killed with its run. Needs PostgreSQL's server programs (Debian's `postgresql`, which `.ci/run`
installs); skipped where there are none.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from registry.tracking import REGISTERED_MODEL
from stacks import postgres
from stacks.processes import free_port
from stacks.team import TeamStack, read_env_file
from tests.conftest import missing, write_synthetic_cifar

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def _postgres_programs():
    """PostgreSQL's server programs (Debian's `postgresql`, which .ci/run installs)."""
    try:
        postgres.find_bindir()
    except postgres.PostgresError as exc:
        missing("PostgreSQL", str(exc))


def _copy_project(dest: Path) -> Path:
    """The project's files (tracked and new, not ignored) as a separate checkout."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


class Host:
    """A GPU host: its own checkout, HOME, root folder and data, joined by the join file."""

    def __init__(self, base: Path, name: str, join_file: Path, env: dict[str, str]):
        self.name, self.base = name, base
        self.project = _copy_project(base / "project")
        self.root, self.home = base / "root", base / "home"
        self.home.mkdir(parents=True)
        self.data = base / "data" / "cifar-10-batches-py"
        write_synthetic_cifar(self.data)  # the same bytes as every host's: same checksums
        self.join_file = join_file
        self.env = {
            **env,
            "HOME": str(self.home),
            "CIFAR10_SOURCE": str(self.data),
            "BENTOML_HOME": str(self.home / "bentoml"),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        self.proc: subprocess.Popen | None = None
        self.log = base / "worker.out"

    def start(self) -> None:
        worker_log = self.root / ".prefect-worker" / "logs" / "worker.log"
        seen = worker_log.stat().st_size if worker_log.is_file() else 0
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stacks",
                "worker",
                "--join",
                str(self.join_file),
                "--name",
                self.name,
                "--root",
                str(self.root),
                "--gpus",
                "1",
            ],
            cwd=self.project,
            env=self.env,
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if worker_log.is_file() and b"started" in worker_log.read_bytes()[seen:]:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"worker {self.name} did not start; see {self.log}")

    def kill(self) -> None:
        """The host goes down: its worker command, worker and flow runs, without warning."""
        for pid in _descendants(self.proc.pid) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _processes_of(folder: Path) -> list[int]:
    """PIDs whose environment or command line names `folder` (a stack's own processes)."""
    import psutil

    marker, found = str(folder), []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if marker in " ".join(proc.cmdline()) or marker in str(proc.environ()):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    base = tmp_path_factory.mktemp("team")
    server_data = base / "server-data" / "cifar-10-batches-py"
    sums = write_synthetic_cifar(server_data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    ports = {"prefect_port": free_port(), "mlflow_port": free_port(), "pg_port": free_port(),
             "s3_port": free_port()}  # fmt: skip

    def make() -> TeamStack:
        return TeamStack(
            base / "server",
            **ports,
            extra_env={
                "PREFECT_UI_ENABLED": "false",
                "CIFAR10_SOURCE": str(server_data),
                # 3 heartbeats (30 s) missed, not 10
                "CIFAR_ZOMBIE_AFTER_S": "90",
            },
        )

    # Started, stopped and started again in the same folder (its database, secrets and
    # automation already there), as a team's second `make team-stack` does: every test of this
    # module runs through the second start.
    first = make()
    with first.running():
        pass
    assert _processes_of(base / "server") == [], "the first team stack left processes behind"
    stack = make()
    assert stack.secrets == first.secrets
    hosts = []
    try:
        stack.start()
        hosts = [Host(base / name, name, stack.join_file, env) for name in ("host-a", "host-b")]
        for host in hosts:
            host.start()
        yield {
            "stack": stack,
            "hosts": hosts,
            "sums": sums,
            "base": base,
            "join": read_env_file(stack.join_file),
        }
    finally:
        for host in hosts:
            host.stop()
        stack.stop()


def _client(team):
    from mlflow import MlflowClient

    join = team["join"]
    # As a user's script that reads the join file: credentials, files through the server (the
    # tracking URI goes to the client only: later tests' stores must not find it).
    os.environ.update(
        {k: v for k, v in join.items() if k.startswith("MLFLOW_") and k != "MLFLOW_TRACKING_URI"}
    )
    uri = join["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(client, filter_string=""):
    exp = client.get_experiment_by_name("train-cifar")
    return client.search_runs([exp.experiment_id], filter_string, max_results=500) if exp else []


def test_sweep_spreads_over_two_hosts_and_serving_host_imports_the_champion(
    team, tmp_path, monkeypatch
):
    stack, sums = team["stack"], team["sums"]
    data = {"checksums": sums, "train_size": 240, "val_size": 60}
    result = stack.run_deployment(
        "sweep-cifar/default",
        [
            "preset=seed-baseline",
            'grid={"train.lr": [0.0004, 0.0008, 0.0016, 0.0032]}',
            "seeds=1",
            f"data={json.dumps(data)}",
            'train={"epochs": 1}',
            "max_parallel=2",
            "min_shared_images=50",
            "retries=0",
        ],
        timeout=900,
    )
    assert result.ok, result.log_text()

    client = _client(team)
    (parent,) = _runs(client, "tags.sweep_role = 'parent'")
    children = _runs(
        client, f"tags.sweep_id = '{parent.data.tags['sweep_id']}' and tags.sweep_role = 'child'"
    )
    assert len(children) == 4, [c.info.run_id for c in children]
    assert all(c.info.status == "FINISHED" for c in children), [
        (c.info.run_id, c.info.status, c.data.tags.get("failure")) for c in children
    ]
    # Both hosts trained; each ran its own checkout, root and data, one run at a time.
    by_host = {}
    for c in children:
        by_host.setdefault(c.data.tags["worker"], []).append(c)
        assert c.data.tags["host"] == c.data.tags["worker"]
        host = next(h for h in team["hosts"] if h.name == c.data.tags["worker"])
        assert c.data.tags["run_dir"].startswith(str(host.root))
        assert c.data.params["data.source"] == str(host.data)
    assert set(by_host) == {"host-a", "host-b"}
    for runs in by_host.values():
        spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    # Every artifact went through the server's proxy and comes back through it.
    for c in children:
        assert c.info.artifact_uri.startswith("mlflow-artifacts:")
        local = Path(client.download_artifacts(c.info.run_id, "results.json", str(tmp_path)))
        assert json.loads(local.read_text())
        local.unlink()
    # One champion, chosen by the rule among the sweep's runs: the best validation accuracy.
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    best = max(children, key=lambda c: c.data.metrics["final_val_accuracy"])
    assert champion.run_id == parent.data.tags["candidate_run_id"] == best.info.run_id
    assert champion.tags["registration"] == "complete"
    # Every artifact went through the tracking server into the stack's bucket (SeaweedFS on
    # 127.0.0.1), none onto the server's disk; the hosts' join file names no object store.
    objects = _bucket_keys(team["stack"])
    assert any(k.endswith(".onnx") for k in objects) and any(
        k.endswith("weights.pt") for k in objects
    )
    assert not (team["stack"].folder / "mlartifacts").exists()
    assert not any(k.startswith(("AWS_", "MLFLOW_S3", "CIFAR_S3")) for k in team["join"])
    # No worker filled a BentoML store: serving hosts import from the registry themselves.
    for host in team["hosts"]:
        assert not (host.home / "bentoml").exists() and not (host.root / "bentoml").exists()

    # Credentials never land in what is recorded.
    secrets = [
        team["join"]["MLFLOW_TRACKING_PASSWORD"],
        team["join"]["PREFECT_API_AUTH_STRING"].split(":", 1)[1],
        stack.secrets["DB_PASSWORD"],
    ]
    for run in [parent, *children]:
        recorded = json.dumps([run.data.params, run.data.tags])
        assert not any(s in recorded for s in secrets)
    logs = [
        *stack.logs.glob("*.log"),
        *(h.log for h in team["hosts"]),
        *(p for h in team["hosts"] for p in (h.root / ".prefect-worker/logs").glob("*.log")),
    ]
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(s in text for s in secrets), log

    # The serving host: its own folder and store, the champion over HTTP, a real curl.
    serving = tmp_path / "serving-host"
    serving.mkdir()
    env = {
        **os.environ,
        **team["join"],
        "BENTOML_HOME": str(serving / "bentoml"),
        "HOME": str(serving),
    }
    imported = subprocess.run(
        [sys.executable, "-m", "registry.import_champion", "--root", str(serving)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert f"v{champion.version}" in imported.stdout and champion.run_id in imported.stdout
    from cifarlab.arrays import load_cifar10
    from stacks.processes import BentoServer

    cat = load_cifar10(team["hosts"][0].data).test_images[3].permute(1, 2, 0).numpy()
    Image.fromarray(cat).save(serving / "cat.png")
    with BentoServer(
        serving / "bentoml", serving / "serve.log", {"BENTOML_HOME": str(serving / "bentoml")}
    ) as url:
        answer = subprocess.run(
            ["curl", "-s", "-F", f"image=@{serving / 'cat.png'}", f"{url}/classify"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        body = json.loads(answer.stdout)
        feedback = requests.post(
            f"{url}/feedback", json={"request_id": body["request_id"], "label": "cat"}, timeout=30
        )
        assert feedback.status_code == 200, feedback.text
    assert body["label"] in {c["label"] for c in body["top_k"]}
    assert body["model"]["version"] == str(champion.version)

    # Its records reach the monitor's hosts through the tracking server, with the credentials
    # the serving host already has (the join file): no shared disk.
    # As a serving host runs it: `cifar-import-champion --follow`, which ships at every check.
    follower = subprocess.Popen(
        [sys.executable, "-m", "registry.serving_host", "--root", str(serving), "--follow", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        shipped_dir = serving / "bentoml/prediction-log/shipped"
        deadline = time.monotonic() + 120
        while (  # every closed file shipped (the server stopped above closed its files)
            list(shipped_dir.parent.glob("predictions-*.jsonl"))
            or not list(shipped_dir.glob("*.jsonl"))
        ) and time.monotonic() < deadline:
            assert follower.poll() is None, follower.stdout.read() if follower.stdout else ""
            time.sleep(0.5)
    finally:
        os.killpg(follower.pid, signal.SIGTERM)
        output = follower.communicate(timeout=60)[0]
    assert follower.returncode == 0 and "prediction-log files to run" in output, output
    local = {p.name: p.read_bytes() for p in shipped_dir.glob("predictions-*.jsonl")}
    assert local
    from registry.ship_records import download_records

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, team["join"][key])
    got = download_records(tmp_path, tmp_path / "monitor")
    assert {p.name: p.read_bytes() for p in got} == local
    kinds = [json.loads(line)["kind"] for p in got for line in p.read_text().splitlines()]
    assert sorted(kinds) == ["feedback", "prediction"]
    shipped_keys = [k for k in _bucket_keys(team["stack"]) if "/prediction-log/" in k]
    assert shipped_keys and all(k.startswith("mlartifacts/monitoring/") for k in shipped_keys)
    # Every file went through the tracking server: no host asked it for presigned URLs of the
    # object store, whose address (127.0.0.1 of the server's host) other hosts cannot reach.
    assert _object_store_urls_asked(stack) == []


def _object_store_urls_asked(stack) -> list[str]:
    """The tracking server's access-log lines of requests for presigned URLs of its bucket."""
    log = (stack.services.logs / "mlflow.log").read_text(errors="replace")
    return [
        line
        for line in log.splitlines()
        if "/mlflow-artifacts/presigned/" in line or "/mlflow-artifacts/mpu/" in line
    ]


def _bucket_keys(stack) -> list[str]:
    from stacks.objectstore import BUCKET

    pages = stack.object_store.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_hosts_writing_the_same_new_rows_at_once_on_the_team_server(team, monkeypatch, tmp_path):
    """PostgreSQL refuses the second of two inserts of one key (a sweep's children logging
    their shared split, two hosts creating an experiment): the loser retries and finds it.
    Without the retry, this is the child run a sweep once lost to `duplicate key value`."""
    from registry import run_logging, tracking
    from tests.test_tracking import WRITERS, _all_at_once, trained_on_one_split

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, team["join"][key])
    ids: list[str] = []
    errors = _all_at_once(
        lambda _: ids.append(tracking.open_store(tmp_path, experiment="race-study").experiment_id),
        range(WRITERS),
    )
    assert not errors and len(set(ids)) == 1, errors
    store = tracking.open_store(tmp_path, experiment="race-study")
    runs = [store.client.create_run(store.experiment_id).info.run_id for _ in range(WRITERS)]
    trained = trained_on_one_split(tmp_path)
    errors = _all_at_once(lambda run_id: run_logging.log_datasets(store, run_id, trained), runs)
    assert not errors, errors
    assert all(len(store.client.get_run(r).inputs.dataset_inputs) == 2 for r in runs)


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

LONG_TRAIN = 30  # epochs: long enough to stop a server in the middle


def _start_run(team, seed: int) -> str:
    """Start train-cifar/seed-baseline (no waiting); returns the flow run id."""
    data = {"checksums": team["sums"], "train_size": 240, "val_size": 60}
    return team["stack"].start_deployment(
        "seed-baseline",
        [
            f"data={json.dumps(data)}",
            "min_shared_images=50",
            f"train={json.dumps({'epochs': LONG_TRAIN, 'seed': seed})}",
        ],
    )


def _flow_state(team, flow_run_id: str) -> str:
    import base64
    import urllib.request

    req = urllib.request.Request(f"{team['join']['PREFECT_API_URL']}/flow_runs/{flow_run_id}")
    req.add_header(
        "Authorization",
        "Basic " + base64.b64encode(team["join"]["PREFECT_API_AUTH_STRING"].encode()).decode(),
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["state"]["type"]


def _wait_final(team, flow_run_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = _flow_state(team, flow_run_id)
        except OSError:  # the Prefect server itself may be catching up after a fault
            state = None
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} still {state} after {timeout:.0f} s")


def _wait_epochs(client, seed: int, epochs: int, timeout: float = 300):
    """The MLflow run of this seed once it has logged `epochs` epochs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in _runs(
            client, f"params.`train.seed` = '{seed}' and attributes.status = 'RUNNING'"
        ):
            if len(client.get_metric_history(run.info.run_id, "val_loss")) >= epochs:
                return run
        time.sleep(0.5)
    raise TimeoutError(f"no run of seed {seed} reached epoch {epochs}")


def _assert_complete_and_registered_once(client, run_id: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("failure")
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == list(range(1, LONG_TRAIN + 1)), steps  # every epoch, once
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    assert version.tags["registration"] == "complete"


def _rerun_until_resumed(team, client, seed: int, run_id: str, state: str, fault: str) -> None:
    """A run hurt by a fault either completed, or failed naming it and the next run resumes it."""
    print(f"{fault}: the hurt flow run ended {state}")
    if state != "COMPLETED":
        run = client.get_run(run_id)
        assert run.info.status == "FAILED", f"{fault}: MLflow run left {run.info.status}"
        # The checkpoint is on the host that trained it: the re-run must land there.
        others = [h for h in team["hosts"] if h.name != run.data.tags["worker"]]
        for host in others:
            host.stop()
        try:
            state = _wait_final(team, _start_run(team, seed))
        finally:
            for host in others:
                host.start()
        assert state == "COMPLETED"
        (again,) = _runs(client, f"params.`train.seed` = '{seed}'")
        assert again.info.run_id == run_id  # resumed, not started over
    _assert_complete_and_registered_once(client, run_id)


def test_tracking_server_then_database_restarted_while_a_run_trains(team):
    """The MLflow server goes down for 5 s at epoch 3, then PostgreSQL (under both servers)
    at epoch 8: the run ends with every epoch's metrics on the server, registered once (or,
    had it failed, the next run would resume it)."""
    stack, client = team["stack"], _client(team)
    flow_run = _start_run(team, seed=101)
    run = _wait_epochs(client, 101, 3)
    stack.services.stop("mlflow")
    time.sleep(5)
    stack.start_mlflow_server(stack.db)
    _wait_epochs(client, 101, 8)
    stack.postgres.stop()
    time.sleep(5)
    stack.postgres.start()
    state = _wait_final(team, flow_run)
    _rerun_until_resumed(team, client, 101, run.info.run_id, state, "server restarts")


def test_a_host_killed_mid_run_leaves_no_run_running_for_ever(team):
    """The host dies with its run: when its worker is back, the run is marked FAILED and its
    flow run Crashed; the next run of the config on that host resumes it."""
    client = _client(team)
    flow_run = _start_run(team, seed=102)
    run = _wait_epochs(client, 102, 3)
    victim = next(h for h in team["hosts"] if h.name == run.data.tags["worker"])
    other = next(h for h in team["hosts"] if h is not victim)
    victim.kill()
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # nobody knows yet
    victim.start()  # the host is back: its worker reaps what it left behind
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert _flow_state(team, flow_run) == "CRASHED"
    other.stop()  # the re-run must land on the host that holds the checkpoint
    try:
        assert _wait_final(team, _start_run(team, seed=102)) == "COMPLETED"
    finally:
        other.start()
    (again,) = _runs(client, "params.`train.seed` = '102'")
    assert again.info.run_id == run.info.run_id and again.data.tags["worker"] == victim.name
    _assert_complete_and_registered_once(client, run.info.run_id)


def test_a_host_that_never_returns_leaves_no_run_running_for_ever(team):
    """The host dies with its run and stays down: its flow run sends no more heartbeats, the
    stack's automation marks it Crashed, and the stack's reaper then fails its MLflow run."""
    client = _client(team)
    flow_run = _start_run(team, seed=103)
    run = _wait_epochs(client, 103, 2)
    victim = next(h for h in team["hosts"] if h.name == run.data.tags["worker"])
    victim.kill()
    try:
        deadline = time.monotonic() + 300  # 90 s of silence, the reaper's 30 s, some slack
        while time.monotonic() < deadline:
            state = _flow_state(team, flow_run)
            status = client.get_run(run.info.run_id).info.status
            if state == "CRASHED" and status == "FAILED":
                break
            time.sleep(2)
        assert (state, status) == ("CRASHED", "FAILED")
        failed = client.get_run(run.info.run_id)
        assert failed.data.tags["failure"] == "its flow run ended without it"
    finally:
        victim.start()


# ---------------------------------------------------------------------------------------------
# The object store: faults, and a file over 500 MB
# ---------------------------------------------------------------------------------------------


def _uploads_failed(stack) -> int:
    """Uploads the tracking server answered with HTTP 500 (its object store down)."""
    log = (stack.services.logs / "mlflow.log").read_text(errors="replace")
    return sum(
        1 for line in log.splitlines()
        if '"PUT /api/2.0/mlflow-artifacts/artifacts/' in line and '" 500' in line
    )  # fmt: skip


def _kill_object_store(stack) -> None:
    """SIGKILL to SeaweedFS's process group: a crash, nothing finished or flushed."""
    proc = stack.services.procs.pop("seaweedfs")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# What every registered train-cifar run has (flows/train_tasks.py), besides its LoggedModel.
RUN_FILES = {
    "config.json", "resolved_config.json", "learning_curves.png", "confusion_matrix.png",
    "results.json", "val_predictions.npz", "weights.pt", "ood/ood_reference.json",
    "monitoring/reference.npz", "model_card.md",
}  # fmt: skip


def _run_files(client, run_id: str, folder: str | None = None) -> dict[str, int]:
    """Every file of the run (recursively) and its size as listed by the tracking server."""
    files: dict[str, int] = {}
    for f in client.list_artifacts(run_id, folder):
        files.update(_run_files(client, run_id, f.path) if f.is_dir else {f.path: f.file_size})
    return files


def _champion_version(client) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version
    except MlflowException:
        return None


def _wait_tag(client, seed: int, tag: str, timeout: float = 300):
    """The running MLflow run of this seed once it carries `tag`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in _runs(
            client, f"params.`train.seed` = '{seed}' and attributes.status = 'RUNNING'"
        ):
            if tag in run.data.tags:
                return run
        time.sleep(0.05)
    raise TimeoutError(f"no run of seed {seed} got tag {tag}")


def _assert_every_version_whole(team, tmp_path: Path) -> None:
    """Every registry version's files download whole: its model folder (the files MLmodel
    names, the same for every version), an ONNX file that loads and is the very model its run
    evaluated (the digest in the run's predictions file), its run's weights, its int8 twin
    where it has one, and, once its registration completed, its model card."""
    import numpy as np
    import onnx
    import torch
    import yaml
    from mlflow.artifacts import download_artifacts

    from registry.modelcard import CARD_FILE
    from registry.predictions import PREDICTIONS_FILE, model_digest

    client = _client(team)
    layouts = set()
    for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'"):
        dest = tmp_path / f"version-{v.version}"
        model_dir = Path(
            download_artifacts(
                artifact_uri=client.get_model_version_download_uri(v.name, v.version),
                dst_path=str(dest / "model"),
                tracking_uri=team["join"]["MLFLOW_TRACKING_URI"],
            )
        )
        layouts.add(tuple(sorted(p.name for p in model_dir.iterdir())))
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        onnx_file = model_dir / mlmodel["flavors"]["onnx"]["data"]
        onnx.checker.check_model(str(onnx_file))
        with np.load(client.download_artifacts(v.run_id, PREDICTIONS_FILE, str(dest))) as recorded:
            assert str(recorded["onnx_digest"]) == model_digest(onnx_file), v.version
        torch.load(client.download_artifacts(v.run_id, "weights.pt", str(dest)))
        if "int8_val_accuracy" in v.tags:
            onnx.checker.check_model(
                client.download_artifacts(v.run_id, "int8/model_int8.onnx", str(dest))
            )
        if v.tags["registration"] == "complete":
            card = Path(client.download_artifacts(v.run_id, CARD_FILE, str(dest))).read_text()
            assert f"version {v.version};" in card, v.version
    assert len(layouts) == 1, layouts


def test_object_store_down_while_a_run_uploads_its_model(team, tmp_path):
    """SeaweedFS killed two epochs before a run's training ends, and started again once an
    upload has met the dead store (the tracking server answered a PUT with HTTP 500). The MLflow client's retries carry them over the gap,
    or the run fails and the next run of its config resumes it; either way it is registered
    once and every registry version's files download whole."""
    stack, client = team["stack"], _client(team)
    flow_run = _start_run(team, seed=104)
    run = _wait_epochs(client, 104, LONG_TRAIN - 2)
    failed_before = _uploads_failed(stack)
    _kill_object_store(stack)
    deadline = time.monotonic() + 120  # down until an upload has met it (and 3 s at least)
    time.sleep(3)
    while _uploads_failed(stack) == failed_before and time.monotonic() < deadline:
        time.sleep(0.5)
    stack.start_object_store()
    state = _wait_final(team, flow_run)
    assert _uploads_failed(stack) > failed_before  # uploads did meet the dead store
    _rerun_until_resumed(team, client, 104, run.info.run_id, state, "object store down")
    # Every file the run logged is there, and downloads at its listed size.
    files = _run_files(client, run.info.run_id)
    assert RUN_FILES <= set(files), RUN_FILES - set(files)
    for name, size in files.items():
        local = Path(client.download_artifacts(run.info.run_id, name, str(tmp_path / "run")))
        assert local.stat().st_size == size > 0, name
    _assert_every_version_whole(team, tmp_path)


def test_object_store_gone_when_a_version_is_registered_leaves_the_alias(team, tmp_path):
    """SeaweedFS killed once a run's model is uploaded (the run's `onnx_model_id` tag) and kept
    down: the registration finds the tracking server's artifact store silent and stops before
    creating a version (checked first, and again under the registry lock, had the kill come
    after the first check: MLflow's retries are brief meanwhile), the run fails naming it, and
    the `champion` alias stays where it was. Back up, the next run of the config resumes and
    registers once; every version's files download whole."""
    stack, client = team["stack"], _client(team)
    before = _champion_version(client)
    flow_run = _start_run(team, seed=105)
    run = _wait_tag(client, 105, "onnx_model_id")
    _kill_object_store(stack)
    try:
        state = _wait_final(team, flow_run, timeout=300)
        assert state == "FAILED"
        failed = client.get_run(run.info.run_id)
        assert failed.info.status == "FAILED"
        assert "its artifact store does not answer" in failed.data.tags["failure"]
        assert "nothing registered, no alias moved" in failed.data.tags["failure"]
        assert _champion_version(client) == before
        assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []
    finally:
        stack.start_object_store()
    _rerun_until_resumed(team, client, 105, run.info.run_id, state, "object store gone")
    _assert_every_version_whole(team, tmp_path)


def test_a_file_over_500_mb_goes_through_the_tracking_server_in_parts(team, tmp_path):
    """520 MB logged as a client on any host logs it: through the tracking server (no presigned
    URL of the object store), into the bucket in parts by the server's own S3 client, and back
    byte for byte."""
    import hashlib

    from stacks.objectstore import BUCKET, PREFIX

    stack, client = team["stack"], _client(team)
    exp = client.get_experiment_by_name("big-files")
    exp_id = exp.experiment_id if exp else client.create_experiment("big-files")
    run = client.create_run(exp_id)
    path, sent = tmp_path / "big.bin", hashlib.sha256()
    with open(path, "wb") as fh:
        for _ in range(520):
            block = os.urandom(1 << 20)
            sent.update(block)
            fh.write(block)
    key = f"{PREFIX}/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}/big.bin"
    s3 = stack.object_store.client()
    try:
        client.log_artifact(run.info.run_id, str(path))
        path.unlink()
        head = s3.head_object(Bucket=BUCKET, Key=key)
        assert head["ContentLength"] == 520 << 20
        assert head["ETag"].strip('"').endswith(("-65", "-66")), head["ETag"]  # 8 MB parts
        back, got = (
            Path(client.download_artifacts(run.info.run_id, "big.bin", str(tmp_path))),
            hashlib.sha256(),
        )
        with open(back, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                got.update(block)
        assert got.hexdigest() == sent.hexdigest()
        assert _object_store_urls_asked(stack) == []
        # A file the run lacks is known at once: the server on S3 answers the download of a
        # missing file with HTTP 500, which MLflow's client would retry for some 4 minutes.
        from registry.predictions import recorded_predictions
        from registry.tracking import Store

        t0 = time.monotonic()
        store = Store(team["join"]["MLFLOW_TRACKING_URI"], exp_id)
        assert recorded_predictions(store, run.info.run_id, tmp_path / "unused.onnx") is None
        assert time.monotonic() - t0 < 30
    finally:
        for f in tmp_path.glob("*.bin"):
            f.unlink()
        s3.delete_object(Bucket=BUCKET, Key=key)
