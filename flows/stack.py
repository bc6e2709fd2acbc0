"""The stacks on loopback and on many hosts: Prefect server, work pools, workers, deployments.

    python -m flows.stack up            # the embedded default: Prefect server on SQLite, one
                                        # worker per pool, MLflow on sqlite:///mlflow.db
    python -m flows.stack run [--deployment default] [-p preset=seed-baseline ...]
                                        # start, run one deployment to the end, stop
    python -m flows.stack team          # the team stack: PostgreSQL, Prefect server and MLflow
                                        # tracking server on it (auth on), pools, deployments;
                                        # writes the join file workers and serving hosts need
    python -m flows.stack worker --join team.env [--gpus 1] [--name NAME]
                                        # a GPU host joins: trains what the `gpu` pool hands it
    python -m flows.stack reap [--every 30]
                                        # fail MLflow runs left RUNNING by ended flow runs (the
                                        # team stack runs it; flow runs silent for 5 min are
                                        # crashed by a Prefect automation)

Two work pools. `gpu`: every `train-cifar` run; each host's worker takes at most `--gpus` runs
at a time (`prefect worker start --limit`), so N hosts train N runs at once and no host trains
two on one GPU. `control`: the `sweep-cifar` runs, which only orchestrate (they start
`train-cifar` runs, wait, summarise, register); they never hold a GPU host's slot.

State (Prefect's database, logs) lives under `<root>/.prefect` (`<root>/.team` for the team
stack). Processes are started in their own process groups and stopped as groups, so no worker or
flow run outlives the stack (flows/processes.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.processes import (Services, StackError, _exe, handle_stop_signals,
                             signals_deferred, wait_for_signal, wait_http)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POOL = "gpu"  # train-cifar runs; one worker per GPU host
CONTROL_POOL = "control"  # sweep-cifar runs: orchestration only
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true",
                 "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
# Flow runs started by our workers send a heartbeat every 30 s (Prefect's minimum; its default
# is 180 s). A run silent for 5 min is crashed (zombie_automation): long enough for a plain
# `prefect worker` at the default 180 s too.
HEARTBEAT_SECONDS = "30"
ZOMBIE_AFTER_SECONDS = 300
ZOMBIE_AUTOMATION = "cifar-crash-silent-flow-runs"
REAP_EVERY_SECONDS = 30
# A stopped worker gives its flow runs Prefect's own 30 s of grace (`grace_seconds` of its
# kill) before it kills them: wait that long and a little more before SIGKILL.
WORKER_GRACES = {"worker": 35.0, "control": 35.0}
# What a host needs to join a team stack; the join file holds exactly these.
JOIN_KEYS = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI",
             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def default_gpus() -> int:
    """Trainings one worker runs at once: 1. A run trains on the first visible CUDA device, so
    a host with several GPUs runs one worker per GPU (CUDA_VISIBLE_DEVICES=i, distinct --name)."""
    return 1


def zombie_automation(after_s: int, description: str | None = None) -> dict:
    """A Prefect automation: a flow run that sent heartbeats and then fell silent for `after_s`
    seconds without ending (its host lost power, its container was evicted) becomes Crashed.
    The reaper (`python -m flows.stack reap`) then fails its MLflow run."""
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": description or
        f"Crash flow runs with no heartbeat for {after_s} s (flows/stack.py)",
        "enabled": True,
        "trigger": {
            "type": "event", "posture": "Proactive", "threshold": 1, "within": after_s,
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "for_each": ["prefect.resource.id"],
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                       "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                       "prefect.flow-run.Crashed"],
        },
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"no heartbeat for {after_s} s: its host or process is gone"}],
    }


class LocalStack:
    """Prefect server + one worker per pool for one project root, all on 127.0.0.1; MLflow is
    the SQLite file of the root (or $MLFLOW_TRACKING_URI)."""

    def __init__(self, root: Path = PROJECT_ROOT, port: int = 4200, pool: str = POOL,
                 prefect_home: Path | None = None, extra_env: dict[str, str] | None = None,
                 gpus: int | None = None, prefect_file: Path | None = None):
        self.root = Path(root).resolve()
        # The deployments: prefect.yaml of this checkout (their entrypoints are relative to it).
        self.prefect_file = Path(prefect_file or PROJECT_ROOT / "prefect.yaml").resolve()
        self.port = port
        self.pool = pool
        self.gpus = gpus or default_gpus()
        self.home = Path(prefect_home or self.root / ".prefect")
        self.logs = self.home / "logs"
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.env = {
            **os.environ,
            **TELEMETRY_OFF,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
            # Poll every second (default 10 s): a run should not sit in the queue. Each poll is
            # one small query per worker (the team tests and benchmark still poll every 2 s).
            "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "1"),
            "CIFAR_ROOT": str(self.root),
            "CIFAR_PROJECT_DIR": str(PROJECT_ROOT),
            "CIFAR_WORK_POOL": pool,
            "CIFAR_CONTROL_POOL": CONTROL_POOL,
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": HEARTBEAT_SECONDS,
            **(extra_env or {}),
        }
        self.services = Services(self.logs, self.env)

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return self.services.procs

    # -- processes ------------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True,
            timeout: float | None = 120) -> subprocess.CompletedProcess:
        """Run `prefect ARGS` against this stack's server."""
        result = subprocess.run([_exe("prefect"), *args], cwd=PROJECT_ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}")
        return result

    def wait_healthy(self, timeout: float = 120) -> None:
        """Poll /health until the Prefect server answers."""
        wait_http(f"{self.api_url}/health", timeout, self.procs.get("server"),
                  self.logs / "server.log", self.env.get("PREFECT_API_AUTH_STRING"))

    def start_prefect_server(self, host: str = "127.0.0.1", env: Mapping[str, str] | None = None):
        self.services.spawn("server", [_exe("prefect"), "server", "start", "--host", host,
                                       "--port", str(self.port)], env={
            **self.env,
            # Lock leases (flows/locks.py) on disk, not in the server's memory: a restarted
            # server still knows them and frees them when they expire.
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE":
                "prefect.server.concurrency.lease_storage.filesystem",
            **(env or {})})
        self.wait_healthy()

    @contextlib.contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """Prefect's own Python client, pointed at this stack's server (and its auth string)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        settings: dict = {PREFECT_API_URL: self.api_url}
        if self.env.get("PREFECT_API_AUTH_STRING"):
            settings[PREFECT_API_AUTH_STRING] = self.env["PREFECT_API_AUTH_STRING"]
        with temporary_settings(updates=settings), get_client(sync_client=True) as client:
            yield client

    def setup_pools(self) -> None:
        """The two work pools, every deployment of prefect.yaml and the automation that ends
        flow runs whose host went silent; each left as it is when it is already right."""
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectNotFound
        from prefect.workers.process import ProcessWorker

        with self.client() as client:
            for pool in (self.pool, CONTROL_POOL):
                try:
                    client.read_work_pool(pool)
                except ObjectNotFound:
                    client.create_work_pool(WorkPoolCreate(
                        name=pool, type="process",
                        base_job_template=ProcessWorker.get_default_base_job_template()))

    def deploy(self) -> None:
        """`prefect deploy --all` from prefect.yaml (Prefect's own reading of the file)."""
        result = self.cli("deploy", "--all", "--no-prompt", "--prefect-file",
                          str(self.prefect_file), check=False, timeout=300)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / "deploy.log"
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            lines = [ln.strip() for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
            raise StackError(f"prefect deploy --all --prefect-file {self.prefect_file} exited "
                             f"with {result.returncode}: {lines[-1] if lines else 'no output'} "
                             f"(see {log})")

    def ensure_automation(self) -> None:
        """Create the zombie automation, or update it where it differs from what we want."""
        from prefect.events.schemas.automations import AutomationCore

        want = AutomationCore.model_validate(zombie_automation(
            int(self.env.get("CIFAR_ZOMBIE_AFTER_S", ZOMBIE_AFTER_SECONDS)),
            self.env.get("CIFAR_ZOMBIE_DESCRIPTION")))
        with self.client() as client:
            found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
            if not found:
                client.create_automation(want)
                return
            for extra in found[1:]:  # one of a name: duplicates from an older stack go
                client.delete_automation(extra.id)
            have = AutomationCore.model_validate(found[0].model_dump(
                include=set(AutomationCore.model_fields)))
            if have.model_dump(mode="json") != want.model_dump(mode="json"):
                client.update_automation(found[0].id, want)

    def start_worker(self, name: str, pool: str, limit: int, env: Mapping[str, str] | None = None):
        self.services.spawn(name, [_exe("prefect"), "worker", "start", "--pool", pool,
                                   "--type", "process", "--limit", str(limit),
                                   "--name", f"{tracking_host()}-{name}"],
                            env={**self.env, "CIFAR_WORKER_NAME": f"{tracking_host()}-{name}",
                                 **(env or {})})

    # -- lifecycle ------------------------------------------------------------------------------

    def start_steps(self) -> list[tuple[str, Callable[[], object]]]:
        """What starting the stack does, step by step, each with the name a failure gives."""
        return [
            ("Prefect server", self.start_prefect_server),
            ("work pools", self.setup_pools),
            ("deployments", self.deploy),
            ("automation", self.ensure_automation),
            ("GPU worker", lambda: self.start_worker("worker", self.pool, self.gpus)),
            ("control worker", lambda: self.start_worker("control", CONTROL_POOL, 8)),
        ]

    def start(self) -> None:
        """Server, pools, deployments, the GPU worker (one run per device) and the control
        worker (sweeps). A step that fails stops whatever the earlier ones started and raises
        StackError naming the step."""
        step = "start"
        try:
            for step, action in self.start_steps():
                action()
        except Exception as exc:
            self.stop()
            detail = str(exc) if isinstance(exc, StackError) else f"{type(exc).__name__}: {exc}"
            raise StackError(f"stack start failed at step '{step}': {detail}; every process "
                             "it had started is stopped") from exc
        except BaseException:  # Ctrl-C or SIGTERM while starting: nothing stays behind
            self.stop()
            raise

    def stop(self) -> None:
        """Workers first (they cancel their flow runs), then the servers."""
        self.services.stop_all(order=("control", "worker"), graces=WORKER_GRACES)

    @contextlib.contextmanager
    def running(self) -> Iterator[LocalStack]:
        """Start the stack for the duration of a `with` block (a start that fails has stopped
        what it started already)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def api(self, path: str, body: object | None = None) -> object:
        """GET (or, with a JSON `body`, POST) `path` of this stack's Prefect REST API."""
        import base64
        import json
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.env.get("PREFECT_API_AUTH_STRING"):
            token = base64.b64encode(self.env["PREFECT_API_AUTH_STRING"].encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.api_url}{path}", data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.load(resp)

    def start_deployment(self, deployment: str, params: Sequence[str] = ()) -> str:
        """Create a flow run of a deployment (params as KEY=VALUE, JSON values, as `prefect
        deployment run --param` takes them); returns its id. A bare deployment name means a
        `train-cifar` one. Unknown parameters and values the flow refuses raise StackError."""
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        name = deployment if "/" in deployment else f"train-cifar/{deployment}"
        parameters = parse_params(params)
        with self.client() as client:
            try:
                found = client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise StackError(f"no deployment {name!r} on {self.api_url} (prefect.yaml "
                                 "declares the deployments)") from None
            known = set((found.parameter_openapi_schema or {}).get("properties", {}))
            unknown = sorted(set(parameters) - known)
            if unknown:
                raise StackError(f"{name} has no parameter {', '.join(map(repr, unknown))}; "
                                 f"it takes {', '.join(sorted(known)) or 'none'}")
            try:
                flow_run = client.create_flow_run_from_deployment(found.id, parameters=parameters)
            except PrefectHTTPStatusError as exc:
                raise StackError(f"{name}: {_http_detail(exc)}") from None
        return str(flow_run.id)

    def flow_run_state(self, flow_run_id: str) -> str:
        """The state's name of a flow run (Completed, Failed, Running, ...)."""
        with self.client() as client:
            state = client.read_flow_run(flow_run_id).state
        return state.name if state is not None else "Pending"

    def flow_run_logs(self, flow_run_id: str, offset: int = 0, limit: int = 200) -> list[Any]:
        """A flow run's log records (its tasks' included), oldest first, from `offset`."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        with self.client() as client:
            return client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    sort=LogSort.TIMESTAMP_ASC, offset=offset, limit=limit)

    def follow_deployment(self, deployment: str, params: Sequence[str] = (),
                          out=sys.stdout, poll_s: float = 1.0) -> str:
        """Start a deployment run and print its log lines (epochs, time left, the closing
        summary) as they arrive, until it ends; returns its final state's name."""
        name = deployment if "/" in deployment else f"train-cifar/{deployment}"
        flow_run_id = self.start_deployment(deployment, params)
        print(f"flow run {flow_run_id} of {name}: Prefect UI "
              f"{self.api_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}", file=out,
              flush=True)
        seen, quiet_polls = 0, 0
        while True:
            state = self.flow_run_state(flow_run_id)
            logs = self.flow_run_logs(flow_run_id, offset=seen)
            for log in logs:
                print(f"{log.timestamp:%H:%M:%S} {log.message}", file=out, flush=True)
            seen += len(logs)
            if state in FINAL_STATES and not logs:
                if quiet_polls >= 2:  # the last lines are shipped a moment after the end
                    print(f"flow run {flow_run_id}: {state}", file=out, flush=True)
                    return state
                quiet_polls += 1
            else:
                quiet_polls = 0
            if not logs:
                time.sleep(poll_s)

    def run_deployment(self, deployment: str, params: Sequence[str] = (),
                       timeout: float | None = 3600) -> DeploymentRun:
        """Start a deployment run and wait for its final state (params as KEY=VALUE); a bare
        deployment name means a `train-cifar` one. Raises TimeoutError after `timeout` s."""
        flow_run_id = self.start_deployment(deployment, params)
        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.flow_run_state(flow_run_id)) not in FINAL_STATES:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} of {deployment} still {state} "
                                   f"after {timeout:.0f} s")
            time.sleep(0.5)
        return DeploymentRun(flow_run_id, state, self)


# The names of the states a flow run ends in (StateType's final ones, as their names say them).
FINAL_STATES = frozenset({"Completed", "Failed", "Crashed", "Cancelled"})


@dataclass(frozen=True)
class DeploymentRun:
    """A flow run of a deployment that has ended: its id and final state's name."""

    flow_run_id: str
    state: str
    stack: LocalStack

    @property
    def ok(self) -> bool:
        return self.state == "Completed"

    def log_text(self, last: int = 60) -> str:
        """Its last `last` log lines, for a failure's message."""
        lines = [f"{r.timestamp:%H:%M:%S} {r.level} {r.message}"
                 for r in self.stack.flow_run_logs(self.flow_run_id, limit=10_000)]
        return f"flow run {self.flow_run_id}: {self.state}\n" + "\n".join(lines[-last:])


def parse_params(params: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings as `prefect deployment run --param` reads them: the value as JSON,
    else as a plain string when it holds no quote; otherwise an error naming it."""
    out: dict[str, Any] = {}
    for spec in params:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise StackError(f"parameter {spec!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            if '"' in value:
                raise StackError(f"parameter {key}: {value!r} is not valid JSON") from None
            out[key] = value
    return out


def _http_detail(exc: Exception) -> str:
    """The server's `detail` of an HTTP error, else the error itself."""
    try:
        return str(exc.response.json().get("detail") or exc)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no JSON body: the error's own text
        return str(exc)


def tracking_host() -> str:
    from flows.tracking import host_name

    return host_name()


# ---------------------------------------------------------------------------------------------
# The team stack
# ---------------------------------------------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped)."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise StackError(f"{path}, line {n}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def write_private(path: Path, values: Mapping[str, str], header: str = "") -> None:
    """A KEY=VALUE file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(header + "".join(f"{k}={v}\n" for k, v in values.items()))
    os.chmod(path, 0o600)


class TeamStack(LocalStack):
    """PostgreSQL, the Prefect server and the MLflow tracking server on it (proxied artifacts,
    basic auth), both pools, the deployments and the control worker. GPU workers join from
    other hosts with the join file (`python -m flows.stack worker --join FILE`)."""

    def __init__(self, root: Path = PROJECT_ROOT, *, bind: str = "127.0.0.1",
                 advertise: str | None = None, prefect_port: int = 4200, mlflow_port: int = 5000,
                 pg_port: int = 5433, database_url: str | None = None, local_gpu_worker: bool = False,
                 extra_env: dict[str, str] | None = None, folder: Path | None = None,
                 prefect_file: Path | None = None):
        self.folder = Path(folder or Path(root).resolve() / ".team")
        self.bind = bind
        host = advertise or (bind if bind not in ("0.0.0.0", "::") else socket.getfqdn())
        self.secrets = self._secrets()
        self.mlflow_url = f"http://{host}:{mlflow_port}"
        self.mlflow_port, self.pg_port = mlflow_port, pg_port
        self.database_url = database_url
        self.local_gpu_worker = local_gpu_worker
        self.join = {
            "PREFECT_API_URL": f"http://{host}:{prefect_port}/api",
            "PREFECT_API_AUTH_STRING": f"admin:{self.secrets['PREFECT_TOKEN']}",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": self.secrets["MLFLOW_ADMIN_PASSWORD"],
        }
        super().__init__(root, port=prefect_port, prefect_home=self.folder / "prefect",
                         prefect_file=prefect_file,
                         extra_env={**self.join,
                                    # the control worker's sweeps leave serving to serving hosts
                                    "CIFAR_PUBLISH_BENTOML": "false", **(extra_env or {})})
        self.api_url = self.join["PREFECT_API_URL"]
        self.join_file = self.folder / "team.env"
        self.postgres = None
        self.db = None
        self.auth_cache_seconds = 60

    def _secrets(self) -> dict[str, str]:
        """Generated once per team folder, kept in `<folder>/secrets.env` (mode 600)."""
        path = self.folder / "secrets.env"
        if path.is_file():
            return read_env_file(path)
        values = {k: secrets.token_urlsafe(24) for k in
                  ("DB_PASSWORD", "PREFECT_TOKEN", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY")}
        write_private(path, values, "# team stack secrets: never commit or share this file\n")
        return values

    def _database(self):
        from flows import postgres

        if self.database_url:
            conn = postgres.Connection.from_url(self.database_url)
            conn.create_databases()
            return conn
        self.postgres = postgres.LocalPostgres(self.folder / "postgres", self.pg_port,
                                               self.secrets["DB_PASSWORD"],
                                               log=self.logs / "postgres.log")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        return self.postgres.connection

    def start_mlflow_server(self, db) -> None:
        from flows.postgres import DATABASES

        auth_ini = self.folder / "mlflow-auth.ini"
        # Password checks (PBKDF2, ~0.2 s each) cached for a minute: without the cache every
        # request of every run pays one. One server worker: password changes through the API
        # take effect at once; changes made in the database directly within the minute.
        write_private(auth_ini, {}, "[mlflow]\ndefault_permission = READ\n"
                      "admin_username = admin\n"
                      f"auth_cache_ttl_seconds = {self.auth_cache_seconds}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      "database_uri = " + db.url(DATABASES["mlflow_auth"]).replace("%", "%%") + "\n")
        args = [_exe("mlflow"), "server", "--app-name", "basic-auth",
                "--artifacts-destination", str(self.folder / "mlartifacts"),
                "--host", self.bind, "--port", str(self.mlflow_port), "--workers", "1"]
        host = self.mlflow_url.split("//")[1].split(":")[0]
        if self.bind not in ("127.0.0.1", "localhost"):
            args += ["--allowed-hosts", f"{host},{host}:{self.mlflow_port},localhost,127.0.0.1"]
        # Secrets go through the environment, never the command line (`ps` shows that).
        self.services.spawn("mlflow", args, env={
            **self.env, "MLFLOW_BACKEND_STORE_URI": db.url(DATABASES["mlflow"]),
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["MLFLOW_ADMIN_PASSWORD"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["MLFLOW_SECRET_KEY"],
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_http(f"http://127.0.0.1:{self.mlflow_port}/health", 120, self.procs["mlflow"],
                  self.logs / "mlflow.log")

    def start_prefect_on_database(self) -> None:
        from flows.postgres import DATABASES

        self.start_prefect_server(self.bind, env={
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.db.url(DATABASES["prefect"], "asyncpg"),
            "PREFECT_SERVER_API_AUTH_STRING": self.join["PREFECT_API_AUTH_STRING"],
            "PREFECT_SERVER_API_HOST": self.bind})

    def write_join_file(self) -> None:
        write_private(self.join_file, self.join,
                      "# join file of a cifar10-mlops team stack: give it to worker and serving "
                      "hosts over a safe channel\n")

    def start_reaper(self) -> None:
        # Fails the MLflow runs of flow runs that ended without them (a host that never came
        # back: the automation crashed its flow run), so none stays RUNNING for ever.
        self.services.spawn("reaper", [sys.executable, "-m", "flows.stack", "reap", "--every",
                                       str(REAP_EVERY_SECONDS), "--root", str(self.root)],
                            essential=False)  # (it survives server errors; see its log)

    def start_steps(self) -> list[tuple[str, Callable[[], object]]]:
        def database() -> None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.db = self._database()

        steps = [("PostgreSQL", database),
                 ("Prefect server", self.start_prefect_on_database),
                 ("MLflow server", lambda: self.start_mlflow_server(self.db)),
                 ("work pools", self.setup_pools), ("deployments", self.deploy),
                 ("automation", self.ensure_automation), ("join file", self.write_join_file),
                 ("control worker", lambda: self.start_worker("control", CONTROL_POOL, 8))]
        if self.local_gpu_worker:
            steps.append(("GPU worker", lambda: self.start_worker("worker", self.pool, self.gpus)))
        return [*steps, ("reaper", self.start_reaper)]

    def stop(self) -> None:
        with signals_deferred():
            try:
                self.services.stop_all(order=("reaper", "control", "worker", "server", "mlflow"),
                                       graces=WORKER_GRACES)
            finally:
                if self.postgres is not None:
                    self.postgres.stop()


def check_join(env: Mapping[str, str]) -> None:
    """Both servers answer with these credentials; otherwise one line naming the server."""
    from flows.tracking import display_uri

    missing = [k for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI") if not env.get(k)]
    if missing:
        raise StackError(f"join settings lack {', '.join(missing)}")
    wait_http(env["PREFECT_API_URL"].rstrip("/") + "/health", 10,
              auth=env.get("PREFECT_API_AUTH_STRING"))
    mlflow = env["MLFLOW_TRACKING_URI"].rstrip("/")
    auth = (f"{env['MLFLOW_TRACKING_USERNAME']}:{env.get('MLFLOW_TRACKING_PASSWORD', '')}"
            if env.get("MLFLOW_TRACKING_USERNAME") else None)
    try:
        wait_http(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", 10, auth=auth)
    except StackError as exc:
        raise StackError(f"MLflow tracking server {display_uri(mlflow)}: {exc}") from None


def reap(root: Path, host: str) -> list[str]:
    """Fail the MLflow runs nobody runs any more (flows.tracking.fail_stale_runs): those whose
    flow run has ended (a host that never came back; the zombie automation crashed its flow
    run), and those whose process on this host is gone (their flow runs become Crashed).
    Needs the tracking and Prefect settings in the environment."""
    os.environ["CIFAR_HOST"] = host
    from flows import locks, tracking
    from flows.train_flow import crash_flow_run, flow_run_alive

    store = tracking.open_store(root)
    failed = tracking.fail_stale_runs(store, flow_run_alive, crash_flow_run,
                                      claim_lock=lambda h: locks.exclusive("resume", h))
    for run_id in failed:
        print(f"{host}: MLflow run {run_id} was RUNNING with nobody running it: marked FAILED "
              "(the next run of its config on its host resumes it)", flush=True)
    return failed


def run_reaper(root: Path, every: float) -> int:
    """`reap` every `every` seconds until stopped; a server that does not answer is retried."""
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    host = tracking_host()
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            try:
                reap(root, host)
            except Exception as exc:  # noqa: BLE001 - a server restarting: try again later
                print(f"reaper: {type(exc).__name__}: {exc}", flush=True)
            time.sleep(every)
    return 0


def run_worker(join: Mapping[str, str], root: Path, gpus: int, name: str | None,
               serving_host: bool, logs: Path) -> int:
    """Join a team stack as a GPU host: one `prefect worker` on the `gpu` pool taking at most
    `gpus` runs at once; every run records on the team's tracking server. Ctrl-C stops it."""
    check_join(join)
    name = name or tracking_host()
    # What this host left RUNNING when it went down with its worker: those processes are gone.
    os.environ.update(join)
    reap(root, name)
    env = {**os.environ, **TELEMETRY_OFF, **join, "CIFAR_ROOT": str(root),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get(
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_SECONDS),
           "CIFAR_PROJECT_DIR": str(PROJECT_ROOT), "CIFAR_HOST": name, "CIFAR_WORKER_NAME": name,
           # flow runs import this checkout's code, whatever else the environment has installed
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *filter(None, [
               os.environ.get("PYTHONPATH")])]),
           "CIFAR_PUBLISH_BENTOML": "true" if serving_host else "false",
           "PREFECT_HOME": str(root / ".prefect-worker")}
    services = Services(logs, env)
    services.spawn("worker", [_exe("prefect"), "worker", "start", "--pool", POOL,
                              "--type", "process", "--limit", str(gpus), "--name", name],
                   env=env)
    from flows.tracking import display_uri

    print(f"worker {name}: pool '{POOL}', {gpus} run(s) at a time, tracking on "
          f"{display_uri(join['MLFLOW_TRACKING_URI'])}; log {logs / 'worker.log'}", flush=True)
    try:
        dead = wait_for_signal(services.dead)
    finally:
        services.stop_all(graces=WORKER_GRACES)
    if dead:
        print(f"error: worker {name}: {dead} stopped", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line of the stacks."""
    parser = argparse.ArgumentParser(prog="python -m flows.stack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack and keep it running (Ctrl-C stops it)")
    run = sub.add_parser("run", help="start the local stack, run one deployment, stop")
    run.add_argument("--deployment", default="default",
                     help="train-cifar deployment, or FLOW/DEPLOYMENT (e.g. sweep-cifar/default)")
    run.add_argument("-p", "--param", dest="params", action="append", default=[],
                     help="flow parameter KEY=VALUE (JSON values), e.g. preset=seed-baseline")
    team = sub.add_parser("team", help="start the team stack (PostgreSQL, Prefect, MLflow "
                                       "servers) and keep it running")
    team.add_argument("--bind", default="127.0.0.1",
                      help="address the servers listen on (0.0.0.0 to let other hosts in)")
    team.add_argument("--advertise", help="host name other hosts use (default: --bind, or "
                                          "this host's name when binding 0.0.0.0)")
    team.add_argument("--mlflow-port", type=int, default=5000)
    team.add_argument("--pg-port", type=int, default=5433)
    team.add_argument("--database-url", default=os.environ.get("CIFAR_DATABASE_URL"),
                      help="postgresql://USER:PASSWORD@HOST:PORT of your own PostgreSQL "
                           "(default: start one in <root>/.team/postgres)")
    team.add_argument("--with-worker", action="store_true",
                      help="also run a GPU worker on this host")
    reaper = sub.add_parser("reap", help="fail the MLflow runs whose flow runs ended "
                                         "without them (the team stack runs this)")
    reaper.add_argument("--every", type=float, default=0,
                        help="repeat every this many seconds (default: once)")
    worker = sub.add_parser("worker", help="join a team stack as a GPU host")
    worker.add_argument("--join", type=Path, default=os.environ.get("CIFAR_JOIN_FILE"),
                        help="the team stack's join file (team.env); else the PREFECT_* and "
                             "MLFLOW_* variables of the environment")
    worker.add_argument("--name", help="this host's name on runs (default: hostname)")
    worker.add_argument("--gpus", type=int, default=None,
                        help="trainings at once on this worker (default 1; a run trains on the "
                             "first visible GPU: one worker per GPU with CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--serving-host", action="store_true",
                        help="also copy each new champion into this host's BentoML store")
    for p in (up, run, team):
        p.add_argument("--prefect-file", type=Path, default=None,
                       help="the deployments' prefect.yaml (default: this checkout's)")
    for p in (up, run, team, worker, reaper):
        p.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)),
                       help="Prefect server port (up, run, team)")
        p.add_argument("--root", type=Path, default=Path(os.environ.get("CIFAR_ROOT", PROJECT_ROOT)))
    args = parser.parse_args(argv)

    try:
        if args.command == "reap":
            if args.every > 0:
                return run_reaper(args.root.resolve(), args.every)
            reap(args.root.resolve(), tracking_host())
            return 0
        if args.command == "worker":
            join = read_env_file(args.join) if args.join else {
                k: os.environ[k] for k in JOIN_KEYS if os.environ.get(k)}
            root = args.root.resolve()
            return run_worker(join, root, args.gpus or default_gpus(), args.name,
                              args.serving_host, root / ".prefect-worker" / "logs")
        if args.command == "team":
            stack: LocalStack = TeamStack(args.root, bind=args.bind, advertise=args.advertise,
                                          prefect_port=args.port, mlflow_port=args.mlflow_port,
                                          pg_port=args.pg_port, database_url=args.database_url,
                                          local_gpu_worker=args.with_worker,
                                          prefect_file=args.prefect_file)
        else:
            stack = LocalStack(root=args.root, port=args.port, prefect_file=args.prefect_file)
        return _run_stack(stack, args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class _Stopped(KeyboardInterrupt):
    """Ctrl-C, SIGTERM (a timeout, a supervisor) or SIGHUP (a closed terminal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    # Further signals are ignored from here on: the stop that follows must not be cut short
    # (it is bounded: each service gets its grace, then SIGKILL).
    handle_stop_signals(signal.SIG_IGN)
    raise _Stopped(signum)


def _run_stack(stack: LocalStack, args: argparse.Namespace) -> int:
    """Start the stack, do the command's work, stop the stack. Ctrl-C, SIGTERM or SIGHUP stop
    it: workers, their flow runs and the servers go down, nothing stays behind. `run` (a job
    cut short) then exits with 128 + the signal's number; `up` and `team` (servers asked to
    stop) exit 0."""
    handle_stop_signals(_interrupt)
    try:
        with stack.running():
            return _foreground(stack, args)
    except KeyboardInterrupt as stopped:
        # A signal that landed before the stop had switched signals off cut it short: stop
        # again (each service is stopped once; the rest are still to do).
        stack.stop()
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            print(f"stopped by {stopped or 'SIGINT'}; the stack is down", file=sys.stderr,
                  flush=True)
        return 128 + getattr(stopped, "signum", signal.SIGINT)
    finally:
        handle_stop_signals(signal.SIG_IGN)


def _foreground(stack: LocalStack, args: argparse.Namespace) -> int:
    if isinstance(stack, TeamStack):
        from flows.tracking import display_uri

        print(f"team stack up: Prefect {stack.api_url.removesuffix('/api')} (UI; log in with the "
              f"auth string), MLflow {display_uri(stack.mlflow_url)} (user admin), PostgreSQL "
              f"{'on ' + display_uri(stack.database_url) if stack.database_url else 'in ' + str(stack.folder / 'postgres')}; "
              f"logs in {stack.logs}", flush=True)
        print(f"join file (URLs and credentials): {stack.join_file}\n"
              f"  GPU host:     python -m flows.stack worker --join team.env   (or make worker JOIN=team.env)\n"
              f"  serving host: set -a; . ./team.env; set +a; cifar-import-champion && make serve",
              flush=True)
    else:
        print(f"Prefect server {stack.api_url.removesuffix('/api')} (UI), work pools "
              f"'{stack.pool}' and '{CONTROL_POOL}', workers running; logs in {stack.logs}",
              flush=True)
    if args.command in ("up", "team"):
        if args.command == "up":
            print(f"export PREFECT_API_URL={stack.api_url}  # then: prefect deployment run "
                  "train-cifar/default --watch", flush=True)
        dead = wait_for_signal(stack.services.dead)
        if dead:
            print(f"error: {dead} stopped; stopping the stack", file=sys.stderr, flush=True)
            return 1
        return 0
    # No time limit: a full-scale study runs for hours (Ctrl-C stops it and the stack). Its
    # log lines (epochs, time left, the closing summary) are printed as they come.
    state = stack.follow_deployment(args.deployment, args.params)
    return 0 if state == "Completed" else 1


if __name__ == "__main__":
    sys.exit(main())
