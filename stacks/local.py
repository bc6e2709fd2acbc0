"""The embedded default stack on one machine: a Prefect server on SQLite, the work pools, the
deployments of prefect.yaml and one worker per pool, all on 127.0.0.1; MLflow is the root's
SQLite file. Processes are started in their own process groups and stopped as groups, so no
worker or flow run outlives the stack (stacks/processes.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from stacks.prefect_api import PrefectApi
from stacks.processes import PROJECT_ROOT, Services, StackError, _exe, wait_http

POOL = "gpu"  # train-cifar runs; one worker per GPU host
CONTROL_POOL = "control"  # sweep-cifar runs: orchestration only
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
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
JOIN_KEYS = (
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def default_gpus() -> int:
    """Trainings one worker runs at once: 1. A run trains on the first visible CUDA device, so
    a host with several GPUs runs one worker per GPU (CUDA_VISIBLE_DEVICES=i, distinct --name)."""
    return 1


def zombie_automation(after_s: int, description: str | None = None) -> dict:
    """A Prefect automation: a flow run that sent heartbeats and then fell silent for `after_s`
    seconds without ending (its host lost power, its container was evicted) becomes Crashed.
    The reaper (`python -m stacks reap`) then fails its MLflow run."""
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": description
        or f"Crash flow runs with no heartbeat for {after_s} s (stacks/local.py)",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "threshold": 1,
            "within": after_s,
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "for_each": ["prefect.resource.id"],
            "after": ["prefect.flow-run.heartbeat"],
            "expect": [
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            ],
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": f"no heartbeat for {after_s} s: its host or process is gone",
            }
        ],
    }


class LocalStack(PrefectApi):
    """Prefect server + one worker per pool for one project root, all on 127.0.0.1; MLflow is
    the SQLite file of the root (or $MLFLOW_TRACKING_URI)."""

    def __init__(
        self,
        root: Path = PROJECT_ROOT,
        port: int = 4200,
        pool: str = POOL,
        prefect_home: Path | None = None,
        extra_env: dict[str, str] | None = None,
        gpus: int | None = None,
        prefect_file: Path | None = None,
    ):
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
            # The BentoML store (and the prediction log `make serve` writes beside it) that the
            # flows import into and the monitor reads: `make`'s, else the root's.
            "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(self.root / "bentoml")),
            "CIFAR_PROJECT_DIR": str(PROJECT_ROOT),
            "CIFAR_WORK_POOL": pool,
            "CIFAR_CONTROL_POOL": CONTROL_POOL,
            # The retraining trigger's cool-down (prefect.yaml), per registered model.
            "CIFAR_RETRAIN_COOLDOWN_S": os.environ.get("CIFAR_RETRAIN_COOLDOWN_S", "21600"),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": HEARTBEAT_SECONDS,
            **(extra_env or {}),
        }
        self.services = Services(self.logs, self.env)

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return self.services.procs

    # -- processes ------------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float | None = 120
    ) -> subprocess.CompletedProcess:
        """Run `prefect ARGS` against this stack's server."""
        result = subprocess.run(
            [_exe("prefect"), *args],
            cwd=PROJECT_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"prefect {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def wait_healthy(self, timeout: float = 120) -> None:
        """Poll /health until the Prefect server answers."""
        wait_http(
            f"{self.api_url}/health",
            timeout,
            self.procs.get("server"),
            self.logs / "server.log",
            self.env.get("PREFECT_API_AUTH_STRING"),
        )

    def start_prefect_server(self, host: str = "127.0.0.1", env: Mapping[str, str] | None = None):
        self.services.spawn(
            "server",
            [_exe("prefect"), "server", "start", "--host", host, "--port", str(self.port)],
            env={
                **self.env,
                # Lock leases (flows/locks.py) on disk, not in the server's memory: a restarted
                # server still knows them and frees them when they expire.
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
                **(env or {}),
            },
        )
        self.wait_healthy()

    def setup_pools(self) -> None:
        """The two work pools (`gpu` or this stack's pool, and `control`), created unless they
        exist."""
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectNotFound
        from prefect.workers.process import ProcessWorker

        with self.client() as client:
            for pool in (self.pool, CONTROL_POOL):
                try:
                    client.read_work_pool(pool)
                except ObjectNotFound:
                    client.create_work_pool(
                        WorkPoolCreate(
                            name=pool,
                            type="process",
                            base_job_template=ProcessWorker.get_default_base_job_template(),
                        )
                    )

    def deploy(self) -> None:
        """`prefect deploy --all` from prefect.yaml (Prefect's own reading of the file)."""
        result = self.cli(
            "deploy",
            "--all",
            "--no-prompt",
            "--prefect-file",
            str(self.prefect_file),
            check=False,
            timeout=300,
        )
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / "deploy.log"
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            lines = [
                ln.strip() for ln in (result.stdout + result.stderr).splitlines() if ln.strip()
            ]
            raise StackError(
                f"prefect deploy --all --prefect-file {self.prefect_file} exited "
                f"with {result.returncode}: {lines[-1] if lines else 'no output'} "
                f"(see {log})"
            )

    def ensure_automation(self) -> None:
        """Create the zombie automation, or update it where it differs from what we want."""
        from prefect.events.schemas.automations import AutomationCore

        want = AutomationCore.model_validate(
            zombie_automation(
                int(self.env.get("CIFAR_ZOMBIE_AFTER_S", ZOMBIE_AFTER_SECONDS)),
                self.env.get("CIFAR_ZOMBIE_DESCRIPTION"),
            )
        )
        with self.client() as client:
            found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
            if not found:
                client.create_automation(want)
                return
            for extra in found[1:]:  # one of a name: duplicates from an older stack go
                client.delete_automation(extra.id)
            have = AutomationCore.model_validate(
                found[0].model_dump(include=set(AutomationCore.model_fields))
            )
            if have.model_dump(mode="json") != want.model_dump(mode="json"):
                client.update_automation(found[0].id, want)

    def start_worker(self, name: str, pool: str, limit: int, env: Mapping[str, str] | None = None):
        self.services.spawn(
            name,
            [
                _exe("prefect"),
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
                "--limit",
                str(limit),
                "--name",
                f"{tracking_host()}-{name}",
            ],
            env={**self.env, "CIFAR_WORKER_NAME": f"{tracking_host()}-{name}", **(env or {})},
        )

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
            for step, action in self.start_steps():  # noqa: B007 - `step` names the failure below
                action()
        except Exception as exc:
            self.stop()
            detail = str(exc) if isinstance(exc, StackError) else f"{type(exc).__name__}: {exc}"
            raise StackError(
                f"stack start failed at step '{step}': {detail}; every process "
                "it had started is stopped"
            ) from exc
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


def tracking_host() -> str:
    from registry.hosts import host_name

    return host_name()
