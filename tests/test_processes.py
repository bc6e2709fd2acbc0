"""How the stacks start and stop their processes (stacks/): nothing they started may
outlive them, and a child that dies is reported, not waited on for ever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from stacks.processes import Services, signals_deferred, stop_process, wait_for_signal

# A parent that starts a child in a session of its own (as Prefect's process worker starts a
# flow run), prints the child's pid and waits; the child ignores SIGTERM, as a flow run busy
# shutting down may.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _child_pid(services: Services, name: str) -> int:
    log = services.logs / f"{name}.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text().strip() if log.is_file() else ""
        if text:
            return int(text.splitlines()[0])
        time.sleep(0.1)
    raise TimeoutError("the parent never printed its child's pid")


def test_stop_reaches_children_in_sessions_of_their_own(tmp_path):
    services = Services(tmp_path / "logs", dict(os.environ))
    services.spawn("parent", [sys.executable, "-c", PARENT])
    child = psutil.Process(_child_pid(services, "parent"))
    assert os.getsid(child.pid) != os.getsid(services.procs["parent"].pid)  # not in its group
    started = time.monotonic()
    services.stop("parent", grace=2)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() - started < 30


def test_a_stopped_service_whose_pid_was_reused_takes_nobody_with_it(tmp_path):
    """The service died and was reaped; its pid now names another process (here: this test's
    own process, parent of a bystander). Stopping the service must not touch that process's
    children."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    services = Services(tmp_path / "logs", dict(os.environ))
    try:
        proc = services.spawn("gone", [sys.executable, "-c", "pass"])
        proc.wait()
        proc.pid = os.getpid()  # as if the pid had been handed to a new process
        stop_process(proc, grace=1, whole_group=False)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_child_that_dies_is_reported_with_its_exit_code(tmp_path):
    services = Services(tmp_path / "logs", dict(os.environ))
    services.spawn("steady", [sys.executable, "-c", "import time; time.sleep(600)"])
    services.spawn("crashy", [sys.executable, "-c", "import sys; sys.exit(3)"])
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        dead = wait_for_signal(services.dead)
        assert dead.startswith("crashy (exit code 3")
        # It returns with the stop signals ignored: the caller is about to stop everything.
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in saved)
    finally:
        services.stop_all()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_service_that_may_die_is_not_reported(tmp_path):
    services = Services(tmp_path / "logs", dict(os.environ))
    services.spawn("helper", [sys.executable, "-c", "pass"], essential=False)
    services.procs["helper"].wait()
    assert services.dead() is None


def test_signals_are_ignored_while_stopping():
    """A second Ctrl-C during a stop must not cut it short (PostgreSQL would be left)."""

    # Known handlers first: a test run started in the background has SIGINT ignored already.
    def on_hup(*_):
        raise AssertionError("SIGHUP got through")

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
        # and the handlers from before the stop are back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGHUP) is on_hup
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_start_that_fails_at_a_step_stops_what_the_earlier_steps_started(tmp_path):
    """LocalStack.start: the step that fails is named, and what earlier steps started is
    stopped before the error reaches the caller (no server needed: the steps are replaced)."""
    import pytest

    from stacks.local import LocalStack
    from stacks.processes import StackError

    stack = LocalStack(root=tmp_path, prefect_home=tmp_path / "home")
    started = []

    def server() -> None:
        started.append(
            stack.services.spawn("server", [sys.executable, "-c", "import time; time.sleep(600)"])
        )

    def pools() -> None:
        raise ValueError("Invalid control character at: line 4 column 65")

    stack.start_steps = lambda: [
        ("Prefect server", server),
        ("work pools", pools),
        ("never reached", lambda: started.append("no")),
    ]
    with pytest.raises(StackError, match=r"step 'work pools': ValueError: Invalid control"):
        stack.start()
    (proc,) = started
    assert proc.poll() is not None and stack.procs == {}


def test_deployment_parameters_are_read_as_prefect_reads_them():
    """KEY=VALUE with JSON values, else plain strings, as `prefect deployment run --param`."""
    import pytest
    from prefect.cli._utilities import load_json_key_values

    from stacks.prefect_api import parse_params
    from stacks.processes import StackError

    # The values Prefect's CLI accepts come out as it reads them (its own function, compared).
    accepted = ["preset=seed-baseline", 'train={"epochs": 2}', "seeds=3", "x=a b", "flag=true",
                "t=a\\tb", "n=12abc", "e=", "lr=0.0004"]  # fmt: skip
    assert parse_params(accepted) == load_json_key_values(accepted, "parameter")
    # What it refuses is refused here too, naming the parameter.
    for broken in ("x={a:1}", "x=[1,2", 'x="open'):
        with pytest.raises(StackError, match="parameter x: .* is not valid JSON"):
            parse_params([broken])

    assert parse_params(
        ["preset=seed-baseline", 'train={"epochs": 2}', "seeds=3", "x=a b", "flag=true"]
    ) == {"preset": "seed-baseline", "train": {"epochs": 2}, "seeds": 3, "x": "a b", "flag": True}
    with pytest.raises(StackError, match="parameter 'seeds'"):
        parse_params(["seeds"])
    with pytest.raises(StackError, match=r"parameter train: .* is not valid JSON"):
        parse_params(['train={"epochs": 2'])


def test_the_zombie_automation_is_a_valid_prefect_automation_with_a_long_description():
    from prefect.events.schemas.automations import AutomationCore

    from stacks.local import zombie_automation

    text = "x" * 200
    automation = AutomationCore.model_validate(zombie_automation(90, text))
    assert automation.description == text and automation.trigger.within.total_seconds() == 90
