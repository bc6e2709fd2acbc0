"""Rolling the champion back (registry/rollback.py, flows/rollback.py) on a real SQLite MLflow
registry: versions made as registration leaves them, the alias moved under a lock."""

from __future__ import annotations

import threading

import pytest

from registry import tracking
from registry.rollback import RollbackRefused, rollback

NAME = tracking.REGISTERED_MODEL


@pytest.fixture
def registry(tmp_path):
    """v1 champion first, v2 promoted over v1, v3 promoted over v2 (champion now), v4 a
    challenger, v5 whose registration never finished."""
    store = tracking.open_store(tmp_path)
    client = store.client
    run = client.create_run(store.experiment_id).info.run_id
    client.create_registered_model(NAME)
    tags = {
        "1": {"promotion": "champion"},
        "2": {"promotion": "champion", "compared_with_version": "1"},
        "3": {"promotion": "champion", "compared_with_version": "2"},
        "4": {"promotion": "not promoted", "compared_with_version": "3"},
        "5": {"promotion": "champion", "compared_with_version": "3"},
    }
    for version, t in tags.items():
        done = "unfinished" if version == "5" else "complete"
        client.create_model_version(NAME, f"runs:/{run}/model", run_id=run,
                                    tags={**t, "registration": done})  # fmt: skip
    client.set_registered_model_alias(NAME, "champion", "3")
    return store


def _champion(store) -> str:
    return str(store.client.get_model_version_by_alias(NAME, "champion").version)


def test_rollback_goes_to_the_champion_replaced_and_records_it_on_both(registry):
    done = rollback(registry, reason="v3 misreads night photos", who="alice", lock=threading.Lock())
    assert (done.from_version, done.to_version) == ("3", "2") and _champion(registry) == "2"
    v2, v3 = (registry.client.get_model_version(NAME, v) for v in ("2", "3"))
    assert v3.tags["rollback.from.by"] == v2.tags["rollback.to.by"] == "alice"
    assert v3.tags["rollback.from.reason"] == v2.tags["rollback.to.reason"] == done.reason
    assert v3.tags["rollback.from.at"] == v2.tags["rollback.to.at"] == done.when
    assert v3.tags["rollback.from.to"] == "2" and v2.tags["rollback.to.from"] == "3"
    # again: the champion v2 replaced
    assert rollback(registry, reason="again", who="bob", lock=threading.Lock()).to_version == "1"
    with pytest.raises(RollbackRefused, match="replaced no earlier champion"):
        rollback(registry, reason="and again", who="bob", lock=threading.Lock())
    assert _champion(registry) == "1"
    # forward again, by name
    assert (
        rollback(registry, reason="fixed", who="c", to="3", lock=threading.Lock()).to_version == "3"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"to": "9"}, "has no version '9'"),
        ({"to": "3"}, "v3 is the champion already"),
        ({"to": "5"}, "never finished its registration"),
        ({"reason": "  "}, "say why"),
    ],
)
def test_a_refused_rollback_changes_nothing(registry, kwargs, message):
    args = {"reason": "because", "who": "alice", "lock": threading.Lock(), **kwargs}
    with pytest.raises(RollbackRefused, match=message):
        rollback(registry, **args)
    assert _champion(registry) == "3"
    assert not any(
        k.startswith("rollback.") for k in registry.client.get_model_version(NAME, "3").tags
    )


def test_the_lock_is_held_while_the_alias_moves(registry):
    held = []

    class Lock:
        def __enter__(self):
            held.append("in")

        def __exit__(self, *exc):
            held.append(("out", _champion(registry)))

    rollback(registry, reason="r", who="w", lock=Lock())
    assert held == ["in", ("out", "2")]  # moved before the lock was let go


def test_the_command_names_the_problem_in_one_line(registry, tmp_path):
    """`cifar-rollback` as a user runs it (a process of its own)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CIFAR_IMPORT_CHAMPION": "false", "PREFECT_API_URL": ""}
    args = [sys.executable, "-m", "flows.rollback", "--root", str(tmp_path),
            "--tracking-uri", registry.uri, "--reason"]  # fmt: skip
    bad = subprocess.run([*args, "x", "--to", "7"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "PREFECT_API_URL" in bad.stderr
    assert bad.stderr.splitlines()[-1] == "error: cifar10-classifier has no version '7'"
    ok = subprocess.run([*args, "bad night"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "champion v3 -> v2" in ok.stdout and _champion(registry) == "2"


def test_the_flow_rolls_back_under_the_prefect_lock(registry, prefect_api, monkeypatch):
    """rollback-cifar as its deployment runs it: the registry lock is the Prefect lease the
    registrations take (flows/locks.py)."""
    from flows.rollback import rollback_cifar

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    monkeypatch.setenv("CIFAR_IMPORT_CHAMPION", "false")
    out = rollback_cifar(reason="flow test", who="flow")
    assert (out["from_version"], out["to_version"]) == ("3", "2") and _champion(registry) == "2"
    assert "imported" not in out
