"""`bentoml serve` as a child process on 127.0.0.1, for the tests and the serving benchmark.

    with LocalServer(bentoml_home, log_path, env={"CIFAR_MAX_UPLOAD_BYTES": "2097152"}) as url:
        ...  # url is http://127.0.0.1:<free port>, /readyz already answered 200

The server runs in its own process group (its workers included), which is stopped as a whole on
exit: nothing it started outlives the `with` block. Not part of the Bento.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Mapping

from flows.stack import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class LocalServer:
    """Start `bentoml serve serving.service:CifarClassifier`, wait for /readyz, stop on exit."""

    def __init__(self, bentoml_home: Path, log_path: Path, env: Mapping[str, str] | None = None,
                 ready_timeout: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true",
                    **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("bentoml")), "serve",
             "serving.service:CifarClassifier", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=PROJECT_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited ({self.proc.returncode}):\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"bentoml serve not ready in {self.ready_timeout:.0f} s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:  # workers share the group: make sure none survive
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
