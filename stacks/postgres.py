"""A real PostgreSQL server for the team stack, from the machine's PostgreSQL installation.

The Prefect server and the MLflow tracking server keep their state in it (one database each,
plus one for MLflow's user accounts). It listens on 127.0.0.1 (or the address it is given) with
password authentication (scram-sha-256), its files in one folder. The server binaries come from
the PostgreSQL the system provides (Debian's `postgresql` and `postgresql-contrib`: Prefect's
schema needs the `pg_trgm` extension, which PostgreSQL-in-a-wheel packages such as `pgserver`
do not ship). PostgreSQL refuses to run as root: as root, the server runs as the system user
`postgres` that the Debian package creates.

A team with its own PostgreSQL passes its URL to the stack instead (`--database-url`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

DATABASES = {
    "prefect": "cifar_prefect",
    "mlflow": "cifar_mlflow",
    "mlflow_auth": "cifar_mlflow_auth",
}
SUPERUSER = "cifar"


class PostgresError(RuntimeError):
    """PostgreSQL cannot be found, started or reached."""


def find_bindir() -> Path:
    """The folder with `initdb` and `postgres`: $CIFAR_PG_BINDIR, else the newest
    /usr/lib/postgresql/<version>/bin, else the one on PATH."""
    candidates = []
    if os.environ.get("CIFAR_PG_BINDIR"):
        candidates.append(Path(os.environ["CIFAR_PG_BINDIR"]))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += versions
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise PostgresError(
        "no PostgreSQL server found (initdb, postgres): install Debian's "
        "`postgresql postgresql-contrib`, set CIFAR_PG_BINDIR, or give the "
        "stack a server's URL with --database-url"
    )


@dataclass
class Connection:
    """Where a PostgreSQL server is and how to log in."""

    host: str
    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "") -> str:
        """`postgresql[+driver]://user:password@host:port/database` (password URL-quoted)."""
        scheme = "postgresql" + (f"+{driver}" if driver else "")
        pw = urllib.parse.quote(self.password, safe="")
        return f"{scheme}://{urllib.parse.quote(self.user)}:{pw}@{self.host}:{self.port}/{database}"

    @classmethod
    def from_url(cls, url: str) -> Connection:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.split("+")[0] not in ("postgresql", "postgres") or not parts.hostname:
            raise PostgresError(
                f"--database-url must be postgresql://USER:PASSWORD@HOST:PORT, "
                f"got scheme {parts.scheme!r}"
            )
        return cls(
            parts.hostname,
            parts.port or 5432,
            urllib.parse.unquote(parts.username or ""),
            urllib.parse.unquote(parts.password or ""),
        )

    def create_databases(
        self,
        names: tuple[str, ...] = tuple(DATABASES.values()),  # noqa: B008 - a constant tuple
        timeout: float = 60,
    ) -> None:
        """Create each database unless it exists (waits for the server to accept logins)."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = psycopg.connect(
                    host=self.host,
                    port=self.port,
                    user=self.user,
                    password=self.password,
                    dbname="postgres",
                    autocommit=True,
                    connect_timeout=5,
                )
                break
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresError(
                        f"PostgreSQL on {self.host}:{self.port} does not accept "
                        f"logins: {str(exc).splitlines()[0]}"
                    ) from None
                time.sleep(0.5)
        with conn:
            have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            for name in names:
                if name not in have:
                    conn.execute(f'CREATE DATABASE "{name}"')


class LocalPostgres:
    """A PostgreSQL server whose data lives in `folder/data`, run as a child process group."""

    def __init__(
        self,
        folder: Path,
        port: int,
        password: str,
        host: str = "127.0.0.1",
        log: Path | None = None,
    ):
        self.folder = Path(folder).resolve()
        self.data = self.folder / "data"
        self.port, self.host = port, host
        self.connection = Connection(
            "127.0.0.1" if host in ("0.0.0.0", "*") else host, port, SUPERUSER, password
        )
        self.log = log or self.folder / "postgres.log"
        self.bindir = find_bindir()
        self.proc: subprocess.Popen | None = None
        # PostgreSQL will not run as root: then it runs as the `postgres` system user.
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresError(
                    "running as root, PostgreSQL needs a system user "
                    "`postgres` (Debian's package creates it)"
                ) from None

    def _owned(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def init(self) -> None:
        """initdb, once: superuser `cifar` with the password, scram-sha-256 for every login."""
        if (self.data / "PG_VERSION").is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user is not None:  # the server's user must reach its folder
            for parent in [self.folder, *self.folder.parents]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        self._owned(self.folder)
        with tempfile.NamedTemporaryFile("w", dir=self.folder, delete=False) as fh:
            fh.write(self.connection.password + "\n")
            pwfile = Path(fh.name)
        self._owned(pwfile)
        try:
            subprocess.run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                check=True,
                capture_output=True,
                text=True,
                user=self.user.pw_uid if self.user else None,
                group=self.user.pw_gid if self.user else None,
                timeout=120,
            )
        except subprocess.CalledProcessError as exc:
            raise PostgresError(f"initdb failed: {exc.stderr.strip()[-2000:]}") from None
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        """Start the server and create the stack's databases."""
        self.init()
        sockets = self.folder / "socket"
        sockets.mkdir(exist_ok=True)
        self._owned(sockets)
        log = open(self.log, "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-k",
                str(sockets),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=self.user.pw_uid if self.user else None,
            group=self.user.pw_gid if self.user else None,
        )
        try:
            self.connection.create_databases()
        except PostgresError:
            if self.proc.poll() is not None:
                raise PostgresError(
                    f"PostgreSQL exited ({self.proc.returncode}); see {self.log}"
                ) from None
            raise

    def stop(self, grace: float = 30) -> None:
        """Fast shutdown (SIGINT to the postmaster: roll back open transactions, write a
        checkpoint, stop its children, exit)."""
        from stacks.processes import stop_process

        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, signal.SIGINT, grace, whole_group=False)
