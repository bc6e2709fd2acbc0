"""The MLflow store under runs that write at the same moment (several workers, a sweep's
children finishing together), on a real SQLite store.

MLflow creates experiments, experiment tags and datasets by looking, then inserting: two
writers at once both insert and the database refuses the second. These tests line threads up
on a barrier so the writes collide; without the retry in `registry.tracking` most of them fail
with `UNIQUE constraint failed`.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from registry import run_logging, tracking

WRITERS = 6


def _all_at_once(fn, args) -> list[BaseException]:
    """Run fn(arg) for each arg on its own thread, released together; the errors raised."""
    barrier, errors = threading.Barrier(len(args)), []

    def go(arg):
        barrier.wait()
        try:
            fn(arg)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def trained_on_one_split(root):
    """What `run_logging.log_datasets` reads of a TrainedRun: every run of one split."""
    return SimpleNamespace(
        config=SimpleNamespace(data=SimpleNamespace(source=str(root))),
        data=SimpleNamespace(folder=root),
        split=SimpleNamespace(digest="same-split", train_idx=np.arange(40), val_idx=np.arange(10)),
        extra=None,
    )


@pytest.fixture()
def store_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.open_store(tmp_path)  # the schema, once (MLflow migrates a new file)
    return tmp_path


def test_runs_logging_the_same_split_at_once_all_record_it(store_root):
    store = tracking.open_store(store_root)
    runs = [store.client.create_run(store.experiment_id).info.run_id for _ in range(WRITERS)]
    trained = trained_on_one_split(store_root)

    errors = _all_at_once(lambda run_id: run_logging.log_datasets(store, run_id, trained), runs)

    assert not errors, errors
    for run_id in runs:
        inputs = store.client.get_run(run_id).inputs.dataset_inputs
        assert sorted(i.dataset.name for i in inputs) == [
            "cifar10-training-40",
            "cifar10-validation-10",
        ]


def test_hosts_opening_a_new_experiment_at_once_share_one(store_root):
    ids: list[str] = []
    errors = _all_at_once(
        lambda _: ids.append(tracking.open_store(store_root, experiment="new-study").experiment_id),
        range(WRITERS),
    )

    assert not errors, errors
    assert len(ids) == WRITERS and len(set(ids)) == 1


def test_a_lost_race_is_retried_and_other_errors_are_not():
    from mlflow.exceptions import MlflowException

    calls = []

    def lose_once():
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException(
                "(psycopg.errors.UniqueViolation) duplicate key value violates "
                'unique constraint "dataset_pk"',
                error_code="BAD_REQUEST",
            )
        return "logged"

    assert tracking._retry_lost_race(lose_once) == "logged" and len(calls) == 2

    calls.clear()

    def refuse():
        calls.append(1)
        raise MlflowException("FOREIGN KEY constraint failed", error_code="BAD_REQUEST")

    with pytest.raises(MlflowException, match="FOREIGN KEY"):
        tracking._retry_lost_race(refuse)
    assert len(calls) == 1

    calls.clear()

    def always_lose():
        calls.append(1)
        raise MlflowException("UNIQUE constraint failed: datasets.name", error_code="BAD_REQUEST")

    with pytest.raises(MlflowException, match="UNIQUE"):
        tracking._retry_lost_race(always_lose, attempts=3)
    assert len(calls) == 3


def test_has_artifact_finds_files_at_the_root_and_in_folders_only(store_root):
    store = tracking.open_store(store_root)
    run_id = store.client.create_run(store.experiment_id).info.run_id
    tracking.log_json(store, run_id, "top.json", {})
    (store_root / "ref.npz").write_bytes(b"x")
    tracking.log_files(store, run_id, {"ref": store_root / "ref.npz"}, folder="monitoring")
    assert tracking.has_artifact(store, run_id, "top.json")
    assert tracking.has_artifact(store, run_id, "monitoring/ref.npz")
    assert not tracking.has_artifact(store, run_id, "ref.npz")  # not at the root
    assert not tracking.has_artifact(store, run_id, "monitoring")  # a folder, not a file
    assert not tracking.has_artifact(store, run_id, "missing/ref.npz")


def test_clients_send_files_through_the_tracking_server_unless_told_otherwise(monkeypatch):
    for direction in ("UPLOAD", "DOWNLOAD"):  # (set first, so that monkeypatch restores it)
        monkeypatch.setenv(f"MLFLOW_ENABLE_PROXY_MULTIPART_{direction}", "")
        monkeypatch.delenv(f"MLFLOW_ENABLE_PROXY_MULTIPART_{direction}")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")  # a team's direct access
    tracking.Store("http://127.0.0.1:1", "0")
    from mlflow.environment_variables import (
        MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD,
        MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD,
    )

    assert MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD.get() is False
    assert MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD.get() is True


def test_a_version_without_a_reference_is_told_so(store_root):
    from registry.monitoring import NoReference, load_reference

    store = tracking.open_store(store_root)
    run_id = store.client.create_run(store.experiment_id).info.run_id
    with pytest.raises(NoReference, match="v3 .* has no monitoring/reference.npz"):
        load_reference(store, SimpleNamespace(run_id=run_id, version="3"))


def test_a_tracking_server_error_is_not_read_as_a_missing_reference(store_root, monkeypatch):
    from mlflow.exceptions import MlflowException

    from registry.monitoring import load_reference

    store = tracking.open_store(store_root)
    run_id = store.client.create_run(store.experiment_id).info.run_id

    def failing(*_args, **_kwargs):
        raise MlflowException("API request failed: too many 500 error responses")

    monkeypatch.setattr("mlflow.MlflowClient.list_artifacts", failing)
    with pytest.raises(MlflowException, match="too many 500"):
        load_reference(store, SimpleNamespace(run_id=run_id, version="3"))
