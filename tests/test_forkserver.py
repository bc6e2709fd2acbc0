"""The fork server (flows/forkserver.py) on its own: a real server with the default imports on a
Unix socket in a temporary folder, and real clients, as Prefect's worker starts them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows import forkserver

# A flow run's stand-in: reports what it was given, uses the libraries a run uses (onnxruntime
# included: imported ahead, it hung a forked child at exit), then exits as told.
PROBE = '''
import os, signal, sys, time
import numpy as np, onnx, onnxruntime as ort, torch
from onnx import TensorProto, helper
print("pid", os.getpid(), "cwd", os.getcwd(), "X", os.environ.get("X"), "argv", sys.argv[1:],
      flush=True)
print("stdin", sys.stdin.readline().strip(), flush=True)
from prefect.settings import get_current_settings
print("prefect api", get_current_settings().api.url, flush=True)
from mlflow.utils import requirements_utils  # filled ahead by the server (warm_caches)
print("mlflow package map", requirements_utils._MODULES_TO_PACKAGES is not None, flush=True)
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
y = session.run(None, {"x": np.array([[-1, 2]], np.float32)})[0]
print("relu", y.tolist(), "mm", float(torch.ones(64, 64).mm(torch.ones(64, 64)).sum()),
      flush=True)
if sys.argv[1] == "wait":
    signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(7)))
    signal.signal(signal.SIGINT, lambda *_: (print("got SIGINT", flush=True), sys.exit(8)))
    print("waiting", flush=True)
    time.sleep(120)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(sys.argv[1]))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory, synthetic_cifar):
    folder = tmp_path_factory.mktemp("fs")
    path = Path(f"/tmp/cifar-test-{os.getpid()}.sock")  # socket paths are short
    # The data the server reads ahead for its runs: a copy of our own (a test touches it).
    data = folder / "cifar-10-batches-py"
    shutil.copytree(synthetic_cifar[0], data)
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.forkserver", "serve", "--socket",
                             str(path)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "CIFAR10_SOURCE": str(data)})
    try:
        assert forkserver.wait_ready(path, 180), (folder / "server.log").read_text()
        yield proc, path, folder
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        path.unlink(missing_ok=True)


@pytest.fixture
def probe_dir(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


def _client(path, probe_dir, arg, **kw):
    env = {**os.environ, forkserver.ENV_VAR: str(path), "X": "from-the-client",
           # the server imported Prefect without it: the child must see the client's
           "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    return subprocess.Popen([sys.executable, "-m", "flows.forkserver", "run", "probe", arg],
                            cwd=probe_dir, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _read_until(proc, word: str, timeout: float = 60) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(word):
            return lines
    raise AssertionError(f"no {word!r} line: {lines}")


def test_a_child_runs_with_the_clients_streams_environment_folder_and_exit_status(
        server, probe_dir):
    _, path, _ = server
    proc = _client(path, probe_dir, "3")
    out, err = proc.communicate("hello\n", timeout=60)
    assert proc.returncode == 3, err
    pid = int(out.split()[1])
    assert pid != proc.pid  # forked by the server, not the client's own interpreter
    assert f"cwd {probe_dir} X from-the-client argv ['3']" in out
    assert "stdin hello" in out and "relu [[0.0, 2.0]] mm 262144.0" in out
    assert "prefect api http://127.0.0.1:9/api" in out
    assert "mlflow package map True" in out  # the server's warmed cache came with the fork
    assert "starting cold" not in err  # it was forked


# Started in an empty folder, as Prefect's worker starts a run: puts the checkout on sys.path
# (Prefect's pull step does), then loads the data and says where the arrays came from.
DATA_PROBE = '''
import sys
sys.path.insert(0, sys.argv[1])
import cifarlab, cifarlab.data as data
print("cifarlab from", cifarlab.__file__, flush=True)
d = data.load_cifar10(sys.argv[2])
print("handed over", bool(getattr(data, "_FROM_HANDOVER", None)),
      "class", type(d) is data.Cifar10, "images", tuple(d.train_images.shape), flush=True)
'''


def _run_module(path, cwd, module: str, *args: str) -> str:
    env = {**os.environ, forkserver.ENV_VAR: str(path)}
    done = subprocess.run([sys.executable, "-m", "flows.forkserver", "run", module, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and "starting cold" not in done.stderr, done.stderr
    return done.stdout


def test_a_child_takes_the_servers_data_arrays_while_the_files_are_unchanged(server, tmp_path):
    _, path, folder = server
    data = folder / "cifar-10-batches-py"
    (tmp_path / "data_probe.py").write_text(DATA_PROBE)
    checkout = Path(forkserver.__file__).resolve().parents[1]
    out = _run_module(path, tmp_path, "data_probe", str(checkout), str(data))
    assert f"cifarlab from {checkout / 'cifarlab' / '__init__.py'}" in out
    # read by the server, taken by the child's own loader as its own class
    assert "handed over True class True images (300, 3, 32, 32)" in out
    os.utime(data / "test_batch")  # a file changed since the server read it: read again
    out = _run_module(path, tmp_path, "data_probe", str(checkout), str(data))
    assert "handed over False class True images (300, 3, 32, 32)" in out


def test_a_child_imports_the_project_from_its_checkout_not_the_servers_copy(server, tmp_path):
    """The server imported cifarlab (and flows) from its own folder; a run that puts another
    checkout on sys.path, as Prefect's pull step does, must get that checkout's code."""
    _, path, folder = server
    (tmp_path / "data_probe.py").write_text(DATA_PROBE)
    checkout = tmp_path / "checkout"
    (checkout / "cifarlab").mkdir(parents=True)
    (checkout / "cifarlab" / "__init__.py").write_text("")
    (checkout / "cifarlab" / "data.py").write_text(  # a loader that differs from the server's
        "import sys\n"
        "_FROM_HANDOVER = set()\n"
        "class Cifar10:\n"
        "    def __init__(self, **fields): self.__dict__.update(fields)\n"
        "def load_cifar10(folder):\n"
        "    held = sys.modules['_cifar10_arrays_handed_over'].held\n"
        "    return Cifar10(**held['fields'])\n")
    (checkout / "flows").mkdir()
    (checkout / "flows" / "__init__.py").write_text("CHECKOUT = True\n")
    (tmp_path / "flows_probe.py").write_text(
        f"import sys\nsys.path.insert(0, {str(checkout)!r})\nimport flows\n"
        "print('flows from', flows.__file__, flush=True)\n")
    out = _run_module(path, tmp_path, "data_probe", str(checkout), "unused")
    assert f"cifarlab from {checkout / 'cifarlab' / '__init__.py'}" in out
    assert "class True images (300, 3, 32, 32)" in out  # the server's arrays, this loader
    out = _run_module(path, tmp_path, "flows_probe")
    assert f"flows from {checkout / 'flows' / '__init__.py'}" in out


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 7), (signal.SIGINT, 8)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_client_reaches_the_child(server, probe_dir, sig, code):
    _, path, _ = server
    proc = _client(path, probe_dir, "wait")
    proc.stdin.write("\n")
    proc.stdin.flush()
    _read_until(proc, "waiting")
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == code
    assert f"got {sig.name}" in proc.stdout.read()
    assert "starting cold" not in proc.stderr.read()  # it went through the server


def test_a_child_killed_by_a_signal_ends_its_client_the_same_way(server, probe_dir):
    _, path, _ = server
    proc = _client(path, probe_dir, "kill")
    out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert int(out.split()[1]) != proc.pid and "starting cold" not in err


def test_a_killed_client_takes_its_child_with_it(server, probe_dir):
    _, path, _ = server
    proc = _client(path, probe_dir, "wait")
    proc.stdin.write("\n")
    proc.stdin.flush()
    child = int(_read_until(proc, "pid")[-1].split()[1])
    _read_until(proc, "waiting")
    assert Path(f"/proc/{child}/comm").read_text().strip() == forkserver.PROCESS_NAME
    proc.kill()  # as a worker's SIGKILL after its grace
    proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(child) or \
        psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_without_a_server_the_client_starts_cold(probe_dir):
    env = {**os.environ, forkserver.ENV_VAR: str(probe_dir / "nobody.sock"), "X": "cold"}
    proc = subprocess.run([sys.executable, "-m", "flows.forkserver", "run", "probe", "4"],
                          cwd=probe_dir, env=env, input="hi\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "no fork server at" in proc.stderr and "starting cold" in proc.stderr
    assert "X cold" in proc.stdout and "stdin hi" in proc.stdout
    assert "mlflow package map False" in proc.stdout  # a new process fills it when it logs


def test_a_run_whose_thread_settings_differ_from_the_servers_starts_cold(server, probe_dir):
    _, path, _ = server
    env = {**os.environ, forkserver.ENV_VAR: str(path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "flows.forkserver", "run", "probe", "5"],
                          cwd=probe_dir, env=env, input="\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 5, proc.stderr
    assert "OMP_NUM_THREADS differ" in proc.stderr and "starting cold" in proc.stderr


def test_a_request_without_streams_gets_an_error_not_a_child(server):
    import json
    import socket

    _, path, _ = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(str(path))
        conn.send(json.dumps({"module": "probe", "argv": [], "cwd": "/", "env": {}}).encode())
        assert "error" in json.loads(conn.recv(4096))


def test_stopping_the_server_stops_its_children_and_removes_the_socket(server, probe_dir):
    proc_server, path, folder = server
    proc = _client(path, probe_dir, "wait")
    proc.stdin.write("\n")
    proc.stdin.flush()
    _read_until(proc, "waiting")
    proc_server.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7  # the child was told, and its end reported
    assert proc_server.wait(timeout=30) == 0
    assert not path.exists()
    assert "forkserver: stopped" in (folder / "server.log").read_text()
