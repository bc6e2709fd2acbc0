"""The local stack on loopback: Prefect server, work pool, tag concurrency limit, worker, deploy.

    python -m flows.stack up            # start everything, stay in the foreground; Ctrl-C stops it
    python -m flows.stack run [--deployment default] [-p preset=seed-baseline ...]
                                        # start, run one deployment to the end, stop
State (Prefect's database, logs) lives in `<root>/.prefect`; processes are started in their own
process groups and stopped as groups, so no worker or flow run outlives the stack.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POOL = "gpu"
GPU_TAG = "gpu"  # training tasks carry this tag; the limit of 1 keeps two runs off one device


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalStack:
    """Prefect server + worker for one project root, all on 127.0.0.1."""

    def __init__(self, root: Path = PROJECT_ROOT, port: int = 4200, pool: str = POOL,
                 prefect_home: Path | None = None, extra_env: dict[str, str] | None = None):
        self.root = Path(root).resolve()
        self.port = port
        self.pool = pool
        self.home = Path(prefect_home or self.root / ".prefect")
        self.logs = self.home / "logs"
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
            # Poll every 2 s (default 10 s): a local run should not sit in the queue.
            "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
            # A task waiting for the `gpu` slot asks again after 5 s (default 30 s).
            "PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": os.environ.get(
                "PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS", "5"),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "BENTOML_DO_NOT_TRACK": "true",
            "DO_NOT_TRACK": "true",
            "CIFAR_ROOT": str(self.root),
            "CIFAR_PROJECT_DIR": str(PROJECT_ROOT),
            "CIFAR_WORK_POOL": pool,
            **(extra_env or {}),
        }
        self.procs: dict[str, subprocess.Popen] = {}

    # -- processes ------------------------------------------------------------------------------

    def _prefect(self) -> str:
        exe = Path(sys.executable).with_name("prefect")
        return str(exe) if exe.exists() else shutil.which("prefect") or "prefect"

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (lives as long as the process)
        # A new session: the process and its children form one group we can signal, and SIGINT
        # is not inherited as ignored (a background job's worker ignores the first SIGTERM).
        proc = subprocess.Popen(list(args), cwd=PROJECT_ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def cli(self, *args: str, check: bool = True,
            timeout: float | None = 120) -> subprocess.CompletedProcess:
        """Run `prefect ARGS` against this stack's server."""
        result = subprocess.run([self._prefect(), *args], cwd=PROJECT_ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}")
        return result

    def wait_healthy(self, timeout: float = 90) -> None:
        """Poll /health until the server answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.procs.get("server")
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"prefect server exited ({server.returncode}); see "
                                   f"{self.logs / 'server.log'}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.5)
        raise TimeoutError(f"prefect server on {self.api_url} not healthy after {timeout:.0f} s")

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Server, pool, concurrency limit, deployments, worker."""
        self._spawn("server", [self._prefect(), "server", "start", "--host", "127.0.0.1",
                               "--port", str(self.port)])
        self.wait_healthy()
        if self.cli("work-pool", "inspect", self.pool, check=False).returncode != 0:
            self.cli("work-pool", "create", self.pool, "--type", "process")
        self.cli("concurrency-limit", "create", GPU_TAG, "1")
        self.cli("deploy", "--all", "--no-prompt")
        self._spawn("worker", [self._prefect(), "worker", "start", "--pool", self.pool,
                               "--type", "process", "--limit", "4"])

    def stop(self, grace: float = 15) -> None:
        """SIGTERM each process group (worker first), then SIGKILL what is left."""
        for name in ("worker", "server"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # Children (flow-run processes) share the group; make sure none survive.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    @contextlib.contextmanager
    def running(self) -> Iterator[LocalStack]:
        """Start the stack for the duration of a `with` block."""
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def run_deployment(self, deployment: str, params: Sequence[str] = (),
                       timeout: float | None = 3600) -> subprocess.CompletedProcess:
        """`prefect deployment run <flow>/<deployment> --watch` (params as key=value); a bare
        deployment name means a `train-cifar` one."""
        name = deployment if "/" in deployment else f"train-cifar/{deployment}"
        args = ["deployment", "run", name, "--watch"]
        for p in params:
            args += ["--param", p]
        return self.cli(*args, check=False, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    """Command line of the stack."""
    parser = argparse.ArgumentParser(prog="python -m flows.stack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack and keep it running (Ctrl-C stops it)")
    run = sub.add_parser("run", help="start the stack, run one deployment, stop")
    run.add_argument("--deployment", default="default",
                     help="train-cifar deployment, or FLOW/DEPLOYMENT (e.g. sweep-cifar/default)")
    run.add_argument("-p", "--param", dest="params", action="append", default=[],
                     help="flow parameter KEY=VALUE (JSON values), e.g. preset=seed-baseline")
    for p in (up, run):
        p.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
        p.add_argument("--root", type=Path, default=Path(os.environ.get("CIFAR_ROOT", PROJECT_ROOT)))
    args = parser.parse_args(argv)

    stack = LocalStack(root=args.root, port=args.port)
    with stack.running():
        print(f"Prefect server {stack.api_url.removesuffix('/api')} (UI), work pool '{stack.pool}', "
              f"worker running; logs in {stack.logs}", flush=True)
        if args.command == "up":
            print(f"export PREFECT_API_URL={stack.api_url}  # then: prefect deployment run "
                  "train-cifar/default --watch", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
                while all(p.poll() is None for p in stack.procs.values()):
                    time.sleep(1)
            return 0
        # No time limit: a full-scale study runs for hours (Ctrl-C stops it and the stack).
        result = stack.run_deployment(args.deployment, args.params, timeout=None)
        print(result.stdout, end="")
        print(result.stderr, end="", file=sys.stderr)
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
