"""Child processes for the stacks, the tests and the benchmarks: start them in sessions of
their own, wait until they answer, stop them and everything they started.

    services = Services(logs, env); services.spawn("server", [...])    # one log per service
    wait_http(url, timeout, proc, log)                                  # until it answers 200
    services.stop_all()                                                 # nothing outlives it
    with BentoServer(bentoml_home, log) as url: ...                     # `bentoml serve`
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class StackError(RuntimeError):
    """A service of the stack could not be started or reached."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    """A console script of this environment (prefect, mlflow), else the one on PATH."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else shutil.which(name) or name


def wait_http(
    url: str,
    timeout: float,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    auth: str | None = None,
) -> None:
    """Poll `url` until it answers 200 (with basic auth `user:password` when given)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{url}: the server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(request, timeout=3) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise StackError(
        f"{url} not healthy after {timeout:.0f} s ({last})" + (f"; see {log}" if log else "")
    )


def stop_process(
    proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15, whole_group: bool = True
) -> None:
    """Send `sig` to a process started in its own session (to its whole group, or to it alone
    when it stops its children itself, as PostgreSQL does), wait `grace` seconds, then SIGKILL
    whatever is left: of its group, and of the processes it had started in sessions of their
    own (Prefect's process worker starts each flow run so; it cancels them on SIGTERM, but one
    that does not end in time must not outlive the stack)."""
    import psutil

    tree = []
    if proc.poll() is None:  # once reaped, its pid may be someone else's: leave it alone
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(proc.pid).children(recursive=True)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if whole_group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    survivors = [p for p in tree if _alive(p)]
    for child in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, survivors = psutil.wait_procs(survivors, timeout=min(grace, 10))
    for child in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(survivors, timeout=10)


def _alive(proc) -> bool:
    """Running and not a zombie (is_running also checks that the pid was not reused)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# What stops a stack: Ctrl-C, SIGTERM (a timeout, a supervisor), SIGHUP (a closed terminal).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def handle_stop_signals(handler) -> None:
    """Install `handler` (or signal.SIG_IGN) for every stop signal."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP for a block (a stop in progress): a second Ctrl-C
    must not leave PostgreSQL or a worker running. No-op outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def wait_for_signal(dead) -> str | None:
    """Block until Ctrl-C, SIGTERM or SIGHUP (returns None) or until `dead()` names a child
    that died (returns its name). Returns with those signals ignored: the caller stops
    everything next, and a second Ctrl-C must not cut that short."""

    def stop(*_):
        handle_stop_signals(signal.SIG_IGN)  # a second one: ignored
        raise KeyboardInterrupt

    handle_stop_signals(stop)
    try:
        while True:
            name = dead()
            if name:
                return name
            time.sleep(1)
    except KeyboardInterrupt:
        return None
    finally:
        handle_stop_signals(signal.SIG_IGN)


class Services:
    """Child processes, each in its own process group with its log in one folder."""

    def __init__(self, logs: Path, env: Mapping[str, str]):
        self.logs, self.env = logs, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.optional: set[str] = set()

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path = PROJECT_ROOT,
        essential: bool = True,
    ) -> subprocess.Popen:
        """Start `args` in its own session, output to `<logs>/<name>.log`. A service that is
        not `essential` may die without `dead()` reporting it (the stack goes on)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        # A new session: the process and its children form one group we can signal, and SIGINT
        # is not inherited as ignored (a background job's worker ignores the first SIGTERM).
        with open(self.logs / f"{name}.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                list(args),
                cwd=cwd,
                env=dict(env or self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        if not essential:
            self.optional.add(name)
        return proc

    def stop(self, name: str, grace: float = 15) -> None:
        """SIGTERM the group, SIGKILL what is left after `grace` seconds."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_process(proc, signal.SIGTERM, grace)

    def stop_all(
        self, order: Sequence[str] = (), graces: Mapping[str, float] | None = None
    ) -> None:
        """Stop the services named in `order` first, then the rest, newest first; `graces`
        gives some of them longer than the default 15 s before SIGKILL."""
        with signals_deferred():
            for name in [*order, *reversed(list(self.procs))]:
                self.stop(name, (graces or {}).get(name, 15))

    def dead(self) -> str | None:
        """The name of a child that has exited (with its exit code), or None."""
        for name, proc in self.procs.items():
            if name not in self.optional and proc.poll() is not None:
                return f"{name} (exit code {proc.returncode}; see {self.logs / (name + '.log')})"
        return None


class BentoServer:
    """`bentoml serve serving.service:CifarClassifier` on 127.0.0.1 and a free port, for the
    tests and the serving benchmark: started in its own session, /readyz awaited, stopped with
    everything it started when the `with` block ends.

        with BentoServer(bentoml_home, log_path, env={"CIFAR_MAX_UPLOAD_BYTES": "2097152"}) as url:
            ...  # url is http://127.0.0.1:<port>
    """

    def __init__(
        self,
        bentoml_home: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 120,
        cwd: Path = PROJECT_ROOT,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.ready_timeout = ready_timeout
        self.services = Services(
            self.log_path.parent,
            {
                **os.environ,
                "BENTOML_HOME": str(bentoml_home),
                "BENTOML_DO_NOT_TRACK": "true",
                **(env or {}),
            },
        )
        self.cwd = cwd

    def __enter__(self) -> str:
        name = self.log_path.name.removesuffix(".log")
        proc = self.services.spawn(
            name,
            [
                _exe("bentoml"),
                "serve",
                "serving.service:CifarClassifier",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=self.cwd,
        )
        try:
            wait_http(self.url + "/readyz", self.ready_timeout, proc, self.log_path)
        except BaseException:
            self.services.stop_all()
            raise
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.services.stop_all()
