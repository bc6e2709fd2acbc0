"""The team stack: PostgreSQL, the Prefect server and the MLflow tracking server on it (basic
auth, proxied artifacts kept in S3: SeaweedFS on 127.0.0.1, or the team's own), both pools, the deployments, the control worker and the reaper; GPU
hosts join it with the join file it writes (`python -m stacks worker --join team.env`).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from stacks.local import (
    CONTROL_POOL,
    HEARTBEAT_SECONDS,
    POOL,
    PROJECT_ROOT,
    REAP_EVERY_SECONDS,
    TELEMETRY_OFF,
    WORKER_GRACES,
    LocalStack,
    tracking_host,
)
from stacks.objectstore import S3_SECRETS, STOP_GRACE_S, LocalSeaweed, S3Store
from stacks.processes import (
    Services,
    StackError,
    _exe,
    signals_deferred,
    wait_for_signal,
    wait_http,
)
from stacks.reaper import reap

if TYPE_CHECKING:
    from stacks.postgres import Connection, LocalPostgres


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
    other hosts with the join file (`python -m stacks worker --join FILE`)."""

    def __init__(
        self,
        root: Path = PROJECT_ROOT,
        *,
        bind: str = "127.0.0.1",
        advertise: str | None = None,
        prefect_port: int = 4200,
        mlflow_port: int = 5000,
        pg_port: int = 5433,
        database_url: str | None = None,
        local_gpu_worker: bool = False,
        extra_env: dict[str, str] | None = None,
        folder: Path | None = None,
        prefect_file: Path | None = None,
        s3_port: int = 8333,
        object_store: S3Store | None = None,
    ):
        self.folder = Path(folder or Path(root).resolve() / ".team")
        self.bind = bind
        host = advertise or (bind if bind not in ("0.0.0.0", "::") else socket.getfqdn())
        self.secrets = self._secrets()
        self.mlflow_url = f"http://{host}:{mlflow_port}"
        self.mlflow_port, self.pg_port = mlflow_port, pg_port
        # The artifacts' bucket: the team's own S3 when given (CIFAR_S3_ENDPOINT ...), else a
        # SeaweedFS of this stack on 127.0.0.1 (stacks/objectstore.py).
        self.object_store = object_store or S3Store.from_env(os.environ)
        self.seaweed = None if self.object_store else LocalSeaweed(
            self.folder / "seaweedfs", s3_port, self.secrets)  # fmt: skip
        self.database_url = database_url
        self.local_gpu_worker = local_gpu_worker
        self.join = {
            "PREFECT_API_URL": f"http://{host}:{prefect_port}/api",
            "PREFECT_API_AUTH_STRING": f"admin:{self.secrets['PREFECT_TOKEN']}",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": self.secrets["MLFLOW_ADMIN_PASSWORD"],
            # files through the tracking server, not presigned URLs of its object store
            "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
            "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        }
        super().__init__(
            root,
            port=prefect_port,
            prefect_home=self.folder / "prefect",
            prefect_file=prefect_file,
            extra_env={
                **self.join,
                # the control worker's sweeps leave serving to serving hosts
                "CIFAR_IMPORT_CHAMPION": "false",
                **(extra_env or {}),
            },
        )
        self.s3_secrets = {k: self.env[k] for k in S3_SECRETS if k in self.env}  # mlflow's only
        self.env = self.services.env = {
            k: v for k, v in self.env.items() if k not in S3_SECRETS}  # fmt: skip
        self.api_url = self.join["PREFECT_API_URL"]
        self.join_file = self.folder / "team.env"
        self.postgres: LocalPostgres | None = None
        self.db: Connection | None = None
        self.auth_cache_seconds = 60

    def _secrets(self) -> dict[str, str]:
        """Generated once per team folder, kept in `<folder>/secrets.env` (mode 600)."""
        path = self.folder / "secrets.env"
        values = read_env_file(path) if path.is_file() else {}
        wanted = ("DB_PASSWORD", "PREFECT_TOKEN", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY",
                  "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_FILER_KEY")  # fmt: skip
        missing = [k for k in wanted if k not in values]  # (a folder from an older version)
        if missing:
            values.update({k: secrets.token_urlsafe(24) for k in missing})
            write_private(path, values, "# team stack secrets: never commit or share this file\n")
        return values

    def _database(self):
        from stacks import postgres

        if self.database_url:
            conn = postgres.Connection.from_url(self.database_url)
            conn.create_databases()
            return conn
        self.postgres = postgres.LocalPostgres(
            self.folder / "postgres",
            self.pg_port,
            self.secrets["DB_PASSWORD"],
            log=self.logs / "postgres.log",
        )
        self.logs.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        return self.postgres.connection

    def start_mlflow_server(self, db) -> None:
        from stacks.postgres import DATABASES

        auth_ini = self.folder / "mlflow-auth.ini"
        # Password checks (PBKDF2, ~0.2 s each) cached for a minute: without the cache every
        # request of every run pays one. One server worker: password changes through the API
        # take effect at once; changes made in the database directly within the minute.
        write_private(
            auth_ini,
            {},
            "[mlflow]\ndefault_permission = READ\n"
            "admin_username = admin\n"
            f"auth_cache_ttl_seconds = {self.auth_cache_seconds}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "database_uri = " + db.url(DATABASES["mlflow_auth"]).replace("%", "%%") + "\n",
        )
        args = [
            _exe("mlflow"),
            "server",
            "--app-name",
            "basic-auth",
            "--artifacts-destination",
            self.object_store.destination
            if self.object_store
            else str(self.folder / "mlartifacts"),
            "--host",
            self.bind,
            "--port",
            str(self.mlflow_port),
            "--workers",
            "1",
        ]
        host = self.mlflow_url.split("//")[1].split(":")[0]
        if self.bind not in ("127.0.0.1", "localhost"):
            args += ["--allowed-hosts", f"{host},{host}:{self.mlflow_port},localhost,127.0.0.1"]
        # Secrets go through the environment, never the command line (`ps` shows that).
        self.services.spawn(
            "mlflow",
            args,
            env={
                **self.env,
                "MLFLOW_BACKEND_STORE_URI": db.url(DATABASES["mlflow"]),
                "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["MLFLOW_ADMIN_PASSWORD"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["MLFLOW_SECRET_KEY"],
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                **self.s3_secrets,  # (a session token too, where the team uses one)
                **(self.object_store.server_env() if self.object_store else {}),
            },
        )
        wait_http(
            f"http://127.0.0.1:{self.mlflow_port}/health",
            120,
            self.procs["mlflow"],
            self.logs / "mlflow.log",
        )

    def start_object_store(self) -> None:
        """SeaweedFS on 127.0.0.1 (only the tracking server talks to it), or a check that the
        team's own bucket answers its credentials: one line naming the store otherwise."""
        if self.seaweed is not None:
            self.object_store = self.seaweed.start(self.services, self.logs / "seaweedfs.log")
        else:
            assert self.object_store is not None
            self.object_store.check()

    def start_prefect_on_database(self) -> None:
        from stacks.postgres import DATABASES

        assert self.db is not None, "the PostgreSQL step comes first"
        self.start_prefect_server(
            self.bind,
            env={
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.db.url(
                    DATABASES["prefect"], "asyncpg"
                ),
                "PREFECT_SERVER_API_AUTH_STRING": self.join["PREFECT_API_AUTH_STRING"],
                "PREFECT_SERVER_API_HOST": self.bind,
            },
        )

    def write_join_file(self) -> None:
        write_private(
            self.join_file,
            self.join,
            "# join file of a cifar10-mlops team stack: give it to worker and serving "
            "hosts over a safe channel\n",
        )

    def start_reaper(self) -> None:
        # Fails the MLflow runs of flow runs that ended without them (a host that never came
        # back: the automation crashed its flow run), so none stays RUNNING for ever.
        self.services.spawn(
            "reaper",
            [
                sys.executable,
                "-m",
                "stacks",
                "reap",
                "--every",
                str(REAP_EVERY_SECONDS),
                "--root",
                str(self.root),
            ],
            essential=False,
        )  # (it survives server errors; see its log)

    def start_steps(self) -> list[tuple[str, Callable[[], object]]]:
        def database() -> None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.db = self._database()

        steps = [
            ("PostgreSQL", database),
            ("Prefect server", self.start_prefect_on_database),
            ("object store", self.start_object_store),
            ("MLflow server", lambda: self.start_mlflow_server(self.db)),
            ("work pools", self.setup_pools),
            ("deployments", self.deploy),
            ("automation", self.ensure_automation),
            ("join file", self.write_join_file),
            ("control worker", lambda: self.start_worker("control", CONTROL_POOL, 8)),
        ]
        if self.local_gpu_worker:
            steps.append(("GPU worker", lambda: self.start_worker("worker", self.pool, self.gpus)))
        return [*steps, ("reaper", self.start_reaper)]

    def stop(self) -> None:
        with signals_deferred():
            try:
                self.services.stop_all(
                    order=("reaper", "control", "worker", "server", "mlflow", "seaweedfs"),
                    graces={**WORKER_GRACES, "seaweedfs": STOP_GRACE_S},
                )
            finally:
                if self.postgres is not None:
                    self.postgres.stop()


def check_join(env: Mapping[str, str]) -> None:
    """Both servers answer with these credentials; otherwise one line naming the server."""
    from registry.tracking import display_uri

    missing = [k for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI") if not env.get(k)]
    if missing:
        raise StackError(f"join settings lack {', '.join(missing)}")
    wait_http(
        env["PREFECT_API_URL"].rstrip("/") + "/health", 10, auth=env.get("PREFECT_API_AUTH_STRING")
    )
    mlflow = env["MLFLOW_TRACKING_URI"].rstrip("/")
    auth = (
        f"{env['MLFLOW_TRACKING_USERNAME']}:{env.get('MLFLOW_TRACKING_PASSWORD', '')}"
        if env.get("MLFLOW_TRACKING_USERNAME")
        else None
    )
    try:
        wait_http(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", 10, auth=auth)
    except StackError as exc:
        raise StackError(f"MLflow tracking server {display_uri(mlflow)}: {exc}") from None


def run_worker(
    join: Mapping[str, str], root: Path, gpus: int, name: str | None, serving_host: bool, logs: Path
) -> int:
    """Join a team stack as a GPU host: one `prefect worker` on the `gpu` pool taking at most
    `gpus` runs at once; every run records on the team's tracking server. Ctrl-C stops it."""
    check_join(join)
    name = name or tracking_host()
    # What this host left RUNNING when it went down with its worker: those processes are gone.
    os.environ.update(join)
    reap(root, name)
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        **join,
        "CIFAR_ROOT": str(root),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get(
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_SECONDS
        ),
        "CIFAR_PROJECT_DIR": str(PROJECT_ROOT),
        "CIFAR_HOST": name,
        "CIFAR_WORKER_NAME": name,
        # flow runs import this checkout's code, whatever else the environment has installed
        "PYTHONPATH": os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "CIFAR_IMPORT_CHAMPION": "true" if serving_host else "false",
        "PREFECT_HOME": str(root / ".prefect-worker"),
    }
    services = Services(logs, env)
    args = ["worker", "start", "--pool", POOL, "--type", "process", "--limit", str(gpus)]
    services.spawn("worker", [_exe("prefect"), *args, "--name", name], env=env)
    from registry.tracking import display_uri

    print(
        f"worker {name}: pool '{POOL}', {gpus} run(s) at a time, tracking on "
        f"{display_uri(join['MLFLOW_TRACKING_URI'])}; log {logs / 'worker.log'}",
        flush=True,
    )
    try:
        dead = wait_for_signal(services.dead)
    finally:
        services.stop_all(graces=WORKER_GRACES)
    if dead:
        print(f"error: worker {name}: {dead} stopped", file=sys.stderr, flush=True)
        return 1
    return 0
