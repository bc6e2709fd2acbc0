"""Warm starts for flow runs: a process per host that has imported the heavy libraries once
(torch, MLflow, ONNX, matplotlib, Prefect's engine) and forks a child for each flow run, so a
run starts working in a fraction of a second instead of after 5-8 s of imports.

    python -m flows.forkserver serve --socket PATH   # the stacks start one beside their workers
    cifar-flow-run                                   # the job command of our deployments

Prefect's process worker starts `cifar-flow-run` (prefect.yaml's `job_variables.command`)
where it would start `python -m prefect.engine`. The client hands the server its
environment, working directory and standard streams over the Unix socket named by
$CIFAR_FORK_SERVER; the server forks a child that takes them over and runs
`prefect.engine` as `python -m` would, its output going to the worker as usual. The signals
the worker sends the client (a cancellation) reach the child, the child's exit status becomes
the client's, and a client that dies takes its child with it. Where no server answers
($CIFAR_FORK_SERVER unset, nothing listening), the client becomes `python -m prefect.engine`
itself: a warm start saves time, it is never needed.

Only third-party modules are kept from the server: the project's own (flows, cifarlab, models,
serving) are dropped in each child and imported by the run from its checkout, so an edited
checkout takes effect on the next run. (The server reads the CIFAR-10 arrays once with the
project's loader; a run's own loader takes them if it is the same code and the files are
unchanged.) A package upgraded in the environment takes effect when the stack (or worker)
restarts.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "CIFAR_FORK_SERVER"
ENGINE = "prefect.engine"  # what a flow-run process runs
PROCESS_NAME = "cifar-flow-run"  # a forked child's name (/proc/PID/comm)
# What a flow run imports or first uses that costs time: imported once, in the server.
WARM_MODULES = (
    "numpy", "torch", "torch._dynamo", "torch.onnx", "torchvision", "onnx", "matplotlib.pyplot",
    "mlflow", "mlflow.onnx", "mlflow.pytorch", "prefect.engine", "prefect.flow_engine",
    "prefect.deployments.steps", "psutil", "PIL.Image",
    # Imported when a run opens its MLflow store (SQLAlchemy, alembic: 1.3 s measured in a
    # warm child's profile) and when it fills the BentoML store (0.3 s). The store URI and
    # BentoML's home are passed explicitly; BentoML's configuration files are read at import
    # (READ_AT_IMPORT).
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.pyfunc", "bentoml.models", "bentoml._internal.models",
)
# Never imported ahead: their import starts a native thread that a forked child lacks, and the
# child then hangs on it (onnxruntime: in its exit handlers). Cheap to import in the run.
FORK_UNSAFE = ("onnxruntime",)
# The signals a worker (or a person) sends a flow-run process, passed on to the child.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
SERVER_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# Read by a library when it is imported: a run whose environment sets them otherwise than the
# server's would not get what it asked for, so it starts cold.
READ_AT_IMPORT = ("PYTHONPATH", "PYTHONHASHSEED", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                  "OPENBLAS_NUM_THREADS", "MPLBACKEND", "BENTOML_CONFIG",
                  "BENTOML_CONFIG_OPTIONS", "BENTOML_CONFIG_OVERRIDES")
MAX_REQUEST = 1 << 20
STOP_GRACE_S = 30.0  # as long as Prefect's own graceful kill of a flow run
HANDSHAKE_TIMEOUT_S = 120.0  # then the run starts cold (the server stuck in its imports)
# The project's packages: imported by each run from its checkout, never kept from the server.
PROJECT_PACKAGES = ("cifarlab", "flows", "models", "serving")


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

def warm_up(modules=WARM_MODULES) -> list[str]:
    """Import `modules` (those that fail to import are skipped and named)."""
    import importlib

    missing = []
    for name in modules:
        if name.split(".")[0] in FORK_UNSAFE:
            raise ValueError(f"{name} cannot be imported ahead of a fork")
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optional package; the run imports it cold
            missing.append(f"{name} ({type(exc).__name__})")
    return missing


def warm_caches() -> list[str]:
    """Fill the per-process caches that every run would fill again at the same cost: MLflow's
    package map (below), the CIFAR-10 arrays (`warm_data`), matplotlib's first figure
    (`warm_plots`); returns what was not filled (the runs then fill it themselves, as cold).

    - MLflow's map of installed packages: logging a model checks its pip requirements against
      this environment, and building the map reads every installed package's file list (1.6 s
      measured on its own with a warm page cache, 3.7 s in a profile with a cold one; once per
      process). Filled by checking MLflow's own requirement, whose version MLflow reads from the
      module already imported: asking for our model's requirements could import onnxruntime
      (where its package metadata goes by another name), which must never happen here.
    """
    failed = []
    try:
        from mlflow.utils import requirements_utils

        # (it logs, rather than raises, what goes wrong inside: the map is checked below)
        requirements_utils.warn_dependency_requirement_mismatches(["mlflow"])
        if getattr(requirements_utils, "_MODULES_TO_PACKAGES", None) is None:
            failed.append("MLflow's package map (not built; see the warning above)")
    except Exception as exc:  # noqa: BLE001 - only time is at stake
        failed.append(f"MLflow's package map ({type(exc).__name__}: {exc})")
    failed += warm_data()
    failed += warm_plots()
    return failed


def data_folder_to_warm(env: Mapping[str, str] = os.environ) -> Path | None:
    """The CIFAR-10 folder a run of this host reads (`cifarlab.data.data_folder` under the run
    root: $CIFAR_ROOT, else the project, as `flows.train_flow.project_root`), if it is on disk
    when the server starts."""
    from cifarlab.data import OFFICIAL_URL, SOURCE_ENV, TEST_FILE, data_folder

    root = env.get("CIFAR_ROOT") or Path(__file__).resolve().parents[1]
    folder = data_folder(Path(root) / "data", env.get(SOURCE_ENV) or OFFICIAL_URL)
    return folder if (folder / TEST_FILE).is_file() else None


def warm_data() -> list[str]:
    """Read the CIFAR-10 arrays once, here: every forked run then shares them (copy on write;
    nothing writes into them) instead of reading 180 MB again, about a second per run.

    Nothing is trusted by this: each run still verifies the folder first (its stamps), and its
    `cifarlab.data.load_cifar10` takes these arrays (left under `HANDOVER_MODULE` in
    sys.modules) only while every file keeps the size, inode and times it had when read here
    and its loader is the code that read them; otherwise it reads the files itself. The read
    goes through the project's own loader (its restricted unpickler); the project modules that
    imports are dropped again in each child (`drop_project_modules`)."""
    import types

    try:
        from cifarlab import data

        folder = data_folder_to_warm()
        if folder is None:
            return []
        data.load_cifar10(folder)
        held = data.loaded_arrays()
        if held is None:
            return [f"CIFAR-10 arrays of {folder} (its files changed while being read or "
                    "within a second before)"]
        handover = types.ModuleType(data.HANDOVER_MODULE)
        handover.held = held
        sys.modules[data.HANDOVER_MODULE] = handover
    except Exception as exc:  # noqa: BLE001 - a bad folder is for the run to report
        return [f"CIFAR-10 arrays ({type(exc).__name__}: {exc})"]
    return []


def drop_project_modules() -> None:
    """In a child: forget every project module the server holds (`flows` itself, which
    `python -m flows.forkserver` imported, and what `warm_data` imported), so that the run
    imports its checkout's, wherever Prefect's pull step puts it on sys.path."""
    import importlib

    for name in [n for n in sys.modules if n.partition(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    importlib.invalidate_caches()  # the checkout's folders may have changed since the server


def warm_plots() -> list[str]:
    """Draw one small figure with text: matplotlib's first drawing in a process imports its
    backend and fills its font lookup cache (a forked child opens the font file again)."""
    try:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(2, 2))
        ax.imshow([[0.0, 1.0], [1.0, 0.0]], cmap="Blues")
        ax.set(title="warm-up", xlabel="x")
        ax.text(0, 0, "0", fontsize=7)
        fig.tight_layout()
        fig.savefig(io.BytesIO(), format="png", dpi=100)
        plt.close(fig)
    except Exception as exc:  # noqa: BLE001 - only time is at stake
        return [f"matplotlib's first figure ({type(exc).__name__}: {exc})"]
    return []


def native_threads() -> int:
    """Threads of this process, native ones included."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


class _Run:
    def __init__(self, conn: socket.socket, pid: int):
        self.conn, self.pid = conn, pid


class ForkServer:
    """Accepts flow-run requests on a Unix socket and forks a child for each. `serve()`
    returns only in a child, with the request it is to run; the server itself never returns
    until it is told to stop and its children are gone."""

    def __init__(self, path: Path, stop_grace: float = STOP_GRACE_S):
        self.path = Path(path)
        self.stop_grace = stop_grace
        self.runs: dict[int, _Run] = {}          # pid -> run
        self.by_conn: dict[socket.socket, _Run | None] = {}
        self.stopping_since: float | None = None
        self.killed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def listen(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():  # left by a server that was killed
            self.path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket runs code as us: ours alone
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)

    def _stop(self, *_):
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self._signal_all(signal.SIGTERM)

    def serve(self) -> dict | None:
        """The server's loop. Returns in a forked child (the request to run), or None in the
        server once it has stopped."""
        while self.stopping_since is None or self.runs:
            if self.stopping_since is not None and not self.killed and \
                    time.monotonic() - self.stopping_since > self.stop_grace:
                self._signal_all(signal.SIGKILL)
                self.killed = True
            for key, _ in self.selector.select(timeout=1.0):
                try:
                    job = self._on_event(key.fileobj)
                except Exception as exc:  # noqa: BLE001 - one bad event must not end the runs
                    print(f"forkserver: error: {type(exc).__name__}: {exc}", file=sys.stderr,
                          flush=True)
                    continue
                if job is not None:
                    return job  # in the child
            self._reap()
        self.close()
        return None

    def _on_event(self, fileobj) -> dict | None:
        if fileobj is self.listener:
            conn, _ = self.listener.accept()
            if self.stopping_since is not None:  # stopping: take no more runs
                conn.close()
                return None
            self.by_conn[conn] = None
            self.selector.register(conn, selectors.EVENT_READ)
        elif fileobj == self.wake_r:
            while True:
                try:
                    if not os.read(self.wake_r, 512):
                        break
                except BlockingIOError:
                    break
        else:
            return self._on_message(fileobj)
        return None

    def close(self) -> None:
        for conn in list(self.by_conn):
            conn.close()
        self.selector.close()
        self.listener.close()
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        if self.path.is_socket():
            self.path.unlink()

    # -- requests -------------------------------------------------------------------------------

    def _on_message(self, conn: socket.socket) -> dict | None:
        run = self.by_conn.get(conn)
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
        except OSError:
            data, fds = b"", []
        if not data:  # the client is gone: so must its flow run be
            if run is not None and run.pid in self.runs:
                self._signal(run, signal.SIGKILL)
            self._drop(conn)
            return None
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if run is None and message == {"ping": True}:  # answered once the imports are done
            self._reply(conn, {"ready": os.getpid()})
            self._drop(conn)
            return None
        if run is None:
            error = self._refusal(message, fds)
            if error:
                self._reply(conn, {"error": error})
                for fd in fds:
                    os.close(fd)
                self._drop(conn)
                return None
            try:
                return self._fork(conn, message, fds)
            except OSError as exc:  # no memory or processes left: the client starts cold
                self._reply(conn, {"error": f"fork failed: {exc}"})
                for fd in fds:
                    os.close(fd)
                self._drop(conn)
                return None
        for fd in fds:
            os.close(fd)
        if isinstance(message, dict) and message.get("signal") in {int(s) for s in FORWARDED}:
            self._signal(run, message["signal"])
        return None

    def _refusal(self, message, fds: list[int]) -> str | None:
        """Why a request cannot be run warm (the client then starts cold), or None."""
        if not isinstance(message, dict) or len(fds) != 3 or \
                not {"module", "argv", "cwd", "env"} <= message.keys():
            return "a request needs module, argv, cwd, env and 3 file descriptors"
        if self.stopping_since is not None:
            return "the fork server is stopping"
        differ = [k for k in READ_AT_IMPORT if message["env"].get(k) != os.environ.get(k)]
        if differ:
            return f"{', '.join(differ)} differ from the fork server's, which read them at import"
        return None

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> dict | None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # No signal handler of the server may run in the child before it has its own.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, SERVER_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            raise
        if pid == 0:
            self._become_child(conn, fds)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            return {**request, "fds": fds}
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for fd in fds:
            os.close(fd)
        run = _Run(conn, pid)
        self.runs[pid] = run
        self.by_conn[conn] = run
        self._reply(conn, {"pid": pid})
        print(f"forkserver: flow run {request['env'].get('PREFECT__FLOW_RUN_ID', '?')} "
              f"in process {pid}", flush=True)
        return None

    def _become_child(self, conn: socket.socket, fds: list[int]) -> None:
        """Drop everything of the server in the forked child."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a new interpreter
        self.selector.close()
        self.listener.close()
        for other in self.by_conn:
            other.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.setsid()  # its own group: a signal reaches what it starts, too
        server = os.getppid()
        _as_flow_run_process()
        if os.getppid() != server:  # the server died before that took effect
            os._exit(1)

    def _reap(self) -> None:
        while self.runs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.runs.pop(pid, None)
            if run is not None and run.conn is not None:
                self._reply(run.conn, {"status": status})
                self._drop(run.conn)
                print(f"forkserver: process {pid} ended ({describe(status)})", flush=True)

    def _signal(self, run: _Run, sig: int) -> None:
        try:
            os.killpg(run.pid, sig)
        except ProcessLookupError:  # not yet in its own group, or already gone
            try:
                os.kill(run.pid, sig)
            except ProcessLookupError:
                pass

    def _signal_all(self, sig: int) -> None:
        for run in list(self.runs.values()):
            self._signal(run, sig)

    def _reply(self, conn: socket.socket, message: dict) -> None:
        try:
            conn.send(json.dumps(message).encode())
        except OSError:
            pass

    def _drop(self, conn: socket.socket) -> None:
        run = self.by_conn.pop(conn, None)
        if run is not None and run.pid in self.runs:
            run.conn = None
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


def _as_flow_run_process() -> None:
    """Linux: name this process `cifar-flow-run` (what `ps -o comm`, `top` and /proc/PID/comm
    show; its command line stays the server's), and SIGTERM it when the server dies, since
    nobody would report its end then."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME.encode()), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
        except ValueError:
            return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def run_child(job: dict) -> None:
    """In the forked child: take over the client's streams, environment and folder, then run
    Prefect's engine as `python -m prefect.engine` would."""
    import random
    import runpy

    for target, fd in enumerate(job["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = [sys.argv[0], *job["argv"]]
    sys.path[0] = job["cwd"]  # as for `python -m`: the folder it started in
    drop_project_modules()
    # A fork copies the random generators: reseed them as a new process would start.
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    # Prefect read its settings (API URL, logging, heartbeats) from the server's environment.
    import prefect.context

    import prefect.logging.configuration

    prefect.context.refresh_global_settings_context()
    prefect.logging.configuration.setup_logging(incremental=False)
    # runpy warns that the engine's module is already imported (the server imported it ahead):
    # that is the point of a warm start, not a problem for the run.
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r".*found in sys\.modules after import of package.*")
    runpy.run_module(job.get("module", ENGINE), run_name="__main__", alter_sys=True)


def serve(path: Path) -> int:
    # Listen first: a run that asks while the imports are under way waits for them.
    server = ForkServer(path)
    server.listen()
    print(f"forkserver: listening on {path}", flush=True)
    started = time.perf_counter()
    missing = warm_up() + warm_caches()
    import threading

    print(f"forkserver: imported and warmed in {time.perf_counter() - started:.1f} s, "
          f"{native_threads()} native threads (OpenBLAS, jemalloc: they re-create theirs in "
          "a forked child)" + (f"; not warmed: {', '.join(missing)}" if missing else ""),
          flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print("forkserver: error: CUDA got initialised by the imports; a forked child cannot "
              "use it, so runs start cold", file=sys.stderr, flush=True)
        return 1
    loaded = [name for name in FORK_UNSAFE if name in sys.modules]
    if loaded:
        print(f"forkserver: error: {', '.join(loaded)} got imported ahead; a forked child could "
              "hang on it, so runs start cold", file=sys.stderr, flush=True)
        return 1
    if threading.active_count() != 1:  # a fork copies one thread: a Python one's work is lost
        print(f"forkserver: error: Python threads after the imports: {threading.enumerate()}; "
              "runs start cold", file=sys.stderr, flush=True)
        return 1
    print("forkserver: ready", flush=True)
    job = server.serve()
    if job is None:
        print("forkserver: stopped", flush=True)
        return 0
    run_child(job)
    return 0


def spawn(services, env: dict[str, str]) -> dict[str, str]:
    """Start a fork server among a stack's `services` (flows.processes.Services) with the
    environment its workers get; returns what to add to that environment so that their flow
    runs start in it. With $CIFAR_WARM_START=0 no server: every run starts cold."""
    # `cifar-flow-run`, the job command, is a script of this environment: on the PATH.
    out = {"PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                    env.get("PATH") or os.defpath])}
    if env.get("CIFAR_WARM_START", "1") == "0":
        return out
    # A short private folder: a socket path has at most 107 bytes, and only we may connect.
    folder = Path(tempfile.mkdtemp(prefix="cifar-forkserver-"))
    atexit.register(shutil.rmtree, folder, True)
    out[ENV_VAR] = str(folder / "sock")
    services.spawn("forkserver", [sys.executable, "-m", "flows.forkserver", "serve",
                                  "--socket", out[ENV_VAR]], env=env, essential=False)
    return out


def wait_ready(path: str | Path, timeout: float = 120) -> bool:
    """Whether the fork server at `path` is ready (its imports done) within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                conn.connect(str(path))
                conn.send(json.dumps({"ping": True}).encode())
                if "ready" in json.loads(conn.recv(MAX_REQUEST) or b"{}"):
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------------------------------
# The client: the flow run's process as the worker sees it
# ---------------------------------------------------------------------------------------------

def _cold_start(module: str, argv: list[str], reason: str | None) -> None:
    if reason:
        print(f"cifar-flow-run: {reason}; starting cold", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def client_main() -> None:
    """`cifar-flow-run`: a flow run's engine, warm where a fork server answers."""
    run_warm(ENGINE, sys.argv[1:])


def run_warm(module: str, argv: list[str]) -> None:
    """Run `python -m module argv` in a child of the fork server named by $CIFAR_FORK_SERVER
    (cold where none answers); exits as that child exits."""
    # A session of its own, as Prefect gives a flow run: a signal to the worker's group does
    # not reach it before the worker's own cancellation does.
    if os.getsid(0) != os.getpid():
        os.setsid()
    path = os.environ.get(ENV_VAR)
    if not path:
        _cold_start(module, argv, None)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(HANDSHAKE_TIMEOUT_S)  # a server still importing answers within it
    try:
        conn.connect(path)
        request = json.dumps({"module": module, "argv": argv, "cwd": os.getcwd(),
                              "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [request], [0, 1, 2])
        reply = json.loads(conn.recv(MAX_REQUEST) or b"{}")
    except (OSError, ValueError) as exc:
        conn.close()
        _cold_start(module, argv, f"no fork server at {path} ({exc})")
    conn.settimeout(None)
    if "pid" not in reply:
        conn.close()
        _cold_start(module, argv,
                    f"the fork server at {path} refused: {reply.get('error', 'no answer')}")

    def forward(sig, _frame):
        try:
            conn.send(json.dumps({"signal": int(sig)}).encode())
        except OSError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        data = conn.recv(MAX_REQUEST)
        if not data:
            print(f"cifar-flow-run: the fork server at {path} went away while running "
                  f"process {reply['pid']}", file=sys.stderr, flush=True)
            sys.exit(1)
        message = json.loads(data)
        if "status" in message:
            break
    status = message["status"]
    if os.WIFSIGNALED(status):  # end the way the child ended
        sig = os.WTERMSIG(status)
        if sig in FORWARDED:  # handled above; SIGKILL and others cannot be
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.forkserver",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="import the libraries once and fork a child per flow run")
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    p = sub.add_parser("run", help="run `python -m MODULE ARGS` in a child of the server")
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "run":
        run_warm(args.module, args.args)
    return serve(args.socket)


if __name__ == "__main__":
    sys.exit(main())
