"""The train-cifar flow under Prefect's test harness, with a real SQLite MLflow store per test."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect.client.orchestration import get_client
from prefect.exceptions import ParameterTypeError

from cifarlab.export import ParityError
from flows.train_flow import train_cifar
from registry import hosts
from registry.tracking import REGISTERED_MODEL, TrackingUnavailable, bool_tag


@pytest.fixture(autouse=True)
def harness(prefect_api):
    yield


@pytest.fixture
def data(synthetic_cifar):
    folder, sums = synthetic_cifar
    return {"source": str(folder), "checksums": sums, "train_size": 240, "val_size": 60}


FAST_TRAIN = {"epochs": 2, "device": "cpu"}


def _client(root) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _bento_store():
    from registry.import_champion import bentoml_home
    from tests.conftest import bento_model_store as model_store

    return model_store(bentoml_home())


def _runs(root):
    client = _client(root)
    exp = client.get_experiment_by_name("train-cifar")
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"train": {"lr": -1.0}}, "lr"),
        ({"data": {"train_size": 0}}, "train_size"),
        ({"preset": "no-such-preset"}, "preset"),
        ({"train": {"optimizer": "rmsprop"}}, "optimizer"),
        ({"model": {"name": "vgg"}}, "name"),
        ({"int8": "sometimes"}, "int8"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(kwargs, field, tmp_path):
    with pytest.raises(ParameterTypeError, match=field):
        train_cifar(root=str(tmp_path), **kwargs)
    assert not (tmp_path / "mlflow.db").exists()  # rejected before anything ran


@pytest.mark.parametrize(
    "options,message",
    [
        ({"kernel_size": 4}, "model.options.kernel_size: must be odd, got 4"),
        ({"kernal_size": 3}, "no option kernal_size"),
    ],
)
def test_bad_model_options_fail_before_anything_runs(options, message, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        train_cifar(preset="seed-baseline", model={"options": options}, root=str(tmp_path))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_run_tracks_exports_and_registers_champion(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_SYSTEM_METRICS_INTERVAL_S", "1")  # a short run still gets samples
    result = train_cifar(preset="seed-baseline", data=data, train=FAST_TRAIN, root=str(tmp_path))
    assert result["alias"] == "champion" and result["parity"]["passed"]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0004" and run.data.params["preset"] == "seed-baseline"
    client = _client(tmp_path)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    val_seconds = client.get_metric_history(run.info.run_id, "val_seconds")
    assert [m.step for m in val_seconds] == [1, 2] and all(m.value > 0 for m in val_seconds)
    for tag in (
        "prefect.flow_run_id",
        "code_version",
        "split_sha256",
        "data_fingerprint",
        "device",
    ):
        assert run.data.tags[tag]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "learning_curves.png",
        "confusion_matrix.png",
        "resolved_config.json",
        "weights.pt",
    } <= artifacts
    assert run.data.metrics["onnx_max_abs_diff"] <= 1e-4
    assert run.data.metrics["onnx_latency_ms_batch256"] > 0
    _assert_val_accuracy_is_the_served_files(client, run, f"sqlite:///{tmp_path / 'mlflow.db'}")
    _assert_mlflow_ui_sees_a_model_training_run(client, run, result)
    # The champion is in the BentoML store, with what the service reports about it.
    bento_model = _bento_store().get(result["bento_tag"])
    meta = bento_model.info.metadata
    assert meta["mlflow_run_id"] == run.info.run_id
    assert meta["mlflow_version"] == str(result["registered_version"])
    assert meta["val_accuracy"] == pytest.approx(result["val_accuracy"], abs=1e-6)
    assert meta["class_names"][3] == "cat" and len(meta["mean"]) == 3
    assert Path(bento_model.path_of("model.onnx")).stat().st_size > 0
    # The int8 twin: evaluated beside fp32, logged, on the version's tags, in the store.
    assert 0 < run.data.metrics["int8_val_accuracy"] <= 1
    assert run.data.metrics["int8_latency_ms_batch1"] > 0
    assert "int8/model_int8.onnx" in {
        a.path for a in client.list_artifacts(run.info.run_id, "int8")
    }
    mv = client.get_model_version(REGISTERED_MODEL, str(result["registered_version"]))
    assert mv.tags["int8_servable"] == run.data.tags["int8_servable"]
    assert float(mv.tags["int8_val_accuracy"]) == pytest.approx(
        run.data.metrics["int8_val_accuracy"], abs=1e-6
    )
    assert meta["int8_file"] == "model_int8.onnx"
    assert meta["int8_servable"] == (mv.tags["int8_servable"] == "true")
    # Where the twin was judged: a CPU with or without int8 dot products (this one's).
    from cifarlab.cpu import has_int8_dot_product

    here = has_int8_dot_product()
    assert mv.tags["int8_judged_with_dot_product"] == bool_tag(here)
    assert meta.get("int8_judged_with_dot_product") is here  # (absent where it cannot tell)
    assert run.data.tags["int8_weight_bits"] == ("8" if here else "7")  # 7: no saturation
    assert Path(bento_model.path_of("model_int8.onnx")).stat().st_size > 0
    # The out-of-distribution reference: fitted on this run, carried by the version and its
    # model card, and in the store beside the model it scores for.
    from cifarlab.ood import OodReference

    assert "ood/ood_reference.json" in {
        a.path for a in client.list_artifacts(run.info.run_id, "ood")
    }
    ref = OodReference.from_json(Path(bento_model.path_of("ood_reference.json")).read_text())
    assert mv.tags["ood_threshold"] == run.data.tags["ood_threshold"] == f"{ref.threshold:.6f}"
    assert meta["ood_threshold"] == ref.threshold and 0.93 <= ref.kept <= 0.97
    assert f"{ref.threshold:.3f}" in mv.description
    # What its answers will be compared with: its validation answers (cifarlab/drift.py).
    with np.load(
        client.download_artifacts(run.info.run_id, "monitoring/reference.npz", str(tmp_path))
    ) as z:
        assert z["probabilities"].shape == (int(run.data.params["data.val_size"]), 10)
        assert z["image_mean"].shape[1] == 3 and float(z["ood_threshold"]) == pytest.approx(
            ref.threshold
        )


def _assert_val_accuracy_is_the_served_files(client, run, uri):
    """The validation accuracy on the run is what onnxruntime gets from the registered file."""
    import tempfile

    from cifarlab.arrays import load_cifar10
    from cifarlab.export import evaluate_onnx
    from cifarlab.split import stratified_split
    from registry.tracking import Store
    from registry.versions import download_onnx, version_uri

    p = run.data.params
    data = load_cifar10(Path(p["data.source"]))
    split = stratified_split(
        data.train_labels.numpy(),
        int(p["data.train_size"]),
        int(p["data.val_size"]),
        int(p["data.split_seed"]),
    )
    mv = client.get_model_version(REGISTERED_MODEL, run.data.tags["registry.version"])
    store = Store(uri, "")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = download_onnx(store, version_uri(store, mv), Path(tmp))
        served = evaluate_onnx(
            onnx_file, data.train_images[split.val_idx], data.train_labels[split.val_idx]
        )
        # The run's record of those classes (what a later champion comparison reads) is this
        # file's, on these images.
        from registry.predictions import recorded_predictions

        recorded = recorded_predictions(store, run.info.run_id, onnx_file)
    assert recorded is not None
    np.testing.assert_array_equal(recorded[0], split.val_idx)
    np.testing.assert_array_equal(recorded[1], served.predictions)
    assert run.data.metrics["final_val_accuracy"] == pytest.approx(served.accuracy, abs=1e-9)
    assert float(mv.tags["val_accuracy"]) == pytest.approx(served.accuracy, abs=1e-6)


def _assert_mlflow_ui_sees_a_model_training_run(client, run, result):
    """What the MLflow UI reads: experiment kind, logged model, datasets, source, system
    metrics, and the model card as the version's description."""
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (model_output,) = run.outputs.model_outputs
    logged = client.get_logged_model(model_output.model_id)
    assert logged.status == "READY" and logged.source_run_id == run.info.run_id
    assert {m.key for m in logged.metrics} >= {"final_val_accuracy", "test_accuracy"}
    mv = client.get_model_version(REGISTERED_MODEL, result["registered_version"])
    assert mv.source == f"models:/{logged.model_id}"
    contexts = {
        {t.key: t.value for t in d.tags}["mlflow.data.context"]: d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert set(contexts) == {"training", "validation"}
    assert contexts["training"].name == "cifar10-training-240" and contexts["training"].digest
    assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.source.type"] == "JOB"
    assert run.data.tags["mlflow.source.git.commit"] and run.data.tags["mlflow.user"]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert "Intended use and limits" in mv.description and "out of domain" in mv.description
    assert "model_card.md" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_worse_model_does_not_take_the_alias(data, tmp_path):
    first = train_cifar(preset="seed-baseline", data=data, train=FAST_TRAIN, root=str(tmp_path))
    # A learning rate this small leaves the net near chance: worse on validation. Both share
    # the 60 validation images (the same split), enough here with min_shared_images=50.
    worse = train_cifar(
        preset="seed-baseline",
        data=data,
        root=str(tmp_path),
        train={**FAST_TRAIN, "lr": 1e-7, "seed": 1},
        min_shared_images=50,
    )
    assert worse["val_accuracy"] < first["val_accuracy"]
    assert worse["alias"] == "challenger"
    assert worse["promotion_reason"].startswith("not better than champion v1: ")
    assert "on 60 shared validation images" in worse["promotion_reason"]
    client = _client(tmp_path)
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert str(champion.version) == str(first["registered_version"])
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, "challenger").version) == str(
        worse["registered_version"]
    )
    mv = client.get_model_version(REGISTERED_MODEL, worse["registered_version"])
    assert mv.tags["shared_images"] == "60" and "mcnemar_p" in mv.tags
    report = {a.path for a in client.list_artifacts(worse["mlflow_run_id"], "champion_comparison")}
    assert {
        "champion_comparison/report.md",
        "champion_comparison/confusion_diff.png",
        "champion_comparison/disagreements.png",
    } <= report
    # Only a champion gets an int8 twin by default: none for the challenger, on its run or
    # its version.
    worse_run = client.get_run(worse["mlflow_run_id"])
    assert "int8_val_accuracy" not in worse_run.data.metrics
    assert "int8_servable" not in worse_run.data.tags and "int8_servable" not in mv.tags
    assert not client.list_artifacts(worse["mlflow_run_id"], "int8")
    # With the default minimum (2,000 shared images) 60 images are no evidence: no verdict.
    # int8=always: a twin for this challenger too, on its run and its version.
    third = train_cifar(
        preset="seed-baseline",
        data=data,
        root=str(tmp_path),
        train={**FAST_TRAIN, "seed": 2},
        int8="always",
    )
    assert (
        third["alias"] == "challenger" and "only 60 validation images" in third["promotion_reason"]
    )
    third_run = client.get_run(third["mlflow_run_id"])
    third_mv = client.get_model_version(REGISTERED_MODEL, third["registered_version"])
    assert third_mv.tags["int8_servable"] == third_run.data.tags["int8_servable"]
    assert float(third_mv.tags["int8_val_accuracy"]) == pytest.approx(
        third_run.data.metrics["int8_val_accuracy"], abs=1e-6
    )
    # The challenger did not replace the champion in the BentoML store.
    assert worse["bento_tag"] == first["bento_tag"]
    assert (
        _bento_store().get("cifar10-classifier:latest").tag
        == _bento_store().get(first["bento_tag"]).tag
    )


def test_a_sweep_builds_the_int8_twin_of_the_run_it_promotes(data, synthetic_cifar, tmp_path):
    """A sweep's runs build no twin (int8=never); the one it promotes gets it at registration,
    on the run's own split: logged to that run, its figures as version tags. Data on which the
    run's split does not rebuild gets none."""
    import dataclasses

    from prefect import flow

    from cifarlab.arrays import load_cifar10
    from flows.sweep_registration import build_int8_twin
    from registry import tracking, versions

    result = train_cifar(
        preset="seed-baseline",
        data=data,
        train=FAST_TRAIN,
        root=str(tmp_path),
        skip_registry=True,
        int8="never",
    )
    client = _client(tmp_path)
    run = client.get_run(result["mlflow_run_id"])
    assert "int8_val_accuracy" not in run.data.metrics

    @flow
    def register_side(other_labels: bool) -> dict:
        store = tracking.open_store(tmp_path)
        folder = tmp_path / f"twin-{other_labels}"
        folder.mkdir()
        onnx_path = versions.download_onnx(store, run.data.tags["onnx_model_uri"], folder)
        cifar = load_cifar10(synthetic_cifar[0])
        if other_labels:  # other data: the run's split does not rebuild on it
            cifar = dataclasses.replace(cifar, train_labels=cifar.train_labels.flip(0))
        return build_int8_twin(store, run, onnx_path, cifar, folder)

    assert register_side(True) == {}
    assert "int8_val_accuracy" not in client.get_run(run.info.run_id).data.metrics
    tags = register_side(False)
    after = client.get_run(run.info.run_id)
    assert tags["int8_servable"] == after.data.tags["int8_servable"]
    assert float(tags["int8_val_accuracy"]) == pytest.approx(
        after.data.metrics["int8_val_accuracy"], abs=1e-6
    )
    assert after.data.metrics["int8_latency_ms_batch1"] > 0
    assert "int8/model_int8.onnx" in {
        a.path for a in client.list_artifacts(run.info.run_id, "int8")
    }


def test_a_sweep_registers_nothing_trained_on_other_data(data, synthetic_cifar, tmp_path):
    """The sweep's host judges the candidate (and builds its twin) on the images it loaded: a
    run whose data fingerprint is not theirs is refused, naming both, and nothing registered."""
    from prefect import flow

    from cifarlab import sweep as sw
    from cifarlab.arrays import load_cifar10
    from cifarlab.experiment import DataBundle
    from flows.sweep_registration import PointFailed, register_candidate
    from registry import tracking

    result = train_cifar(
        preset="seed-baseline",
        data=data,
        train=FAST_TRAIN,
        root=str(tmp_path),
        skip_registry=True,
        int8="never",
    )
    client = _client(tmp_path)
    run = client.get_run(result["mlflow_run_id"])
    point = sw.Point(0, "p", {}, {})
    outcome = sw.Outcome(
        point,
        0,
        "ok",
        run.info.run_id,
        run.data.metrics["final_val_accuracy"],
        run.data.metrics["test_accuracy"],
    )
    best = {
        "point": "p",
        "seeds_ok": 1,
        "val_acc_mean": 0.5,
        "val_acc_std": 0.0,
        "test_acc_mean": 0.5,
        "test_acc_std": 0.0,
    }

    @flow
    def register_on(fingerprint: str) -> None:
        bundle = DataBundle(synthetic_cifar[0], load_cifar10(synthetic_cifar[0]), fingerprint)
        register_candidate(tracking.open_store(tmp_path), best, [outcome], "s1", bundle, 1, None)

    with pytest.raises(
        PointFailed,
        match=f"trained on data {run.data.tags['data_fingerprint']}"
        ", but this host loaded data 0123456789abcdef",
    ):
        register_on("0123456789abcdef")
    with pytest.raises(MlflowException):
        client.get_registered_model(REGISTERED_MODEL)
    register_on(run.data.tags["data_fingerprint"])  # its own data: judged and registered
    (version,) = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert version.run_id == run.info.run_id


def test_broken_export_fails_the_run_and_registers_nothing(data, tmp_path, monkeypatch):
    import cifarlab.experiment as experiment

    real_export = experiment.export_onnx

    def export_another_model(model, path, tta="none"):
        other = type(model)()  # same architecture, untrained weights: a wrong export
        return real_export(other, path, tta)

    monkeypatch.setattr(experiment, "export_onnx", export_another_model)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        train_cifar(preset="seed-baseline", data=data, train=FAST_TRAIN, root=str(tmp_path))
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED" and "ParityError" in run.data.tags["failure"]
    with pytest.raises(MlflowException):
        _client(tmp_path).get_registered_model(REGISTERED_MODEL)


def test_unreachable_tracking_server_fails_before_training(data, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        train_cifar(preset="seed-baseline", data=data, train=FAST_TRAIN, root=str(tmp_path))
    assert not (tmp_path / "runs").exists()


def test_unwritable_tracking_store_fails_before_training(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/no/such/folder/mlflow.db")
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        train_cifar(preset="seed-baseline", data=data, train=FAST_TRAIN, root=str(tmp_path))
    assert not (tmp_path / "runs").exists()


def _count_calls(monkeypatch, module, name: str) -> list:
    calls: list = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_data_is_verified_and_read_once_per_run_and_a_changed_file_is_caught(
    synthetic_cifar, tmp_path, monkeypatch, data_clock
):
    import os
    import shutil

    from cifarlab import arrays
    from cifarlab import data as cdata

    _, sums = synthetic_cifar
    mirror = tmp_path / "mirror"  # a mirror of our own: this test changes a file's mtime
    shutil.copytree(synthetic_cifar[0], mirror)
    data_clock.advance(1.1)  # files changed within the last second are never stamped (data.py)
    data = {"source": str(mirror), "checksums": sums, "train_size": 240, "val_size": 60}
    hashed = _count_calls(monkeypatch, cdata, "md5_of")
    read = _count_calls(monkeypatch, arrays, "_read_batch")
    arrays._LOADED.clear()

    def run():
        before = len(hashed), len(read)
        train_cifar(
            preset="seed-baseline",
            data=data,
            train={**FAST_TRAIN, "epochs": 1},
            root=str(tmp_path / "root"),
            skip_registry=True,
        )
        return len(hashed) - before[0], len(read) - before[1]

    assert run() == (len(sums), 6)  # first run: every file hashed once, read once
    assert run() == (0, 0)  # same process, unchanged files: stat only, arrays held
    arrays._LOADED.clear()  # a new process...
    assert run() == (0, 0)  # ...maps the root's cached arrays, hashes nothing
    shutil.rmtree(tmp_path / "root" / "data" / ".arrays")
    arrays._LOADED.clear()  # a new process without the cache reads the files once
    assert run() == (0, 6)
    # A file rewritten since it verified is hashed again: its bytes are caught.
    victim = mirror / "test_batch"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    with pytest.raises(cdata.DataError, match="test_batch has md5"):
        run()


def test_a_fetched_folder_deleted_between_runs_is_fetched_again(
    synthetic_archive, synthetic_cifar, tmp_path
):
    import shutil

    _, sums = synthetic_cifar
    data = {"source": str(synthetic_archive), "checksums": sums, "train_size": 240, "val_size": 60}
    kwargs = dict(
        preset="seed-baseline",
        train={**FAST_TRAIN, "epochs": 1},
        root=str(tmp_path),
        skip_registry=True,
    )
    train_cifar(data=data, **kwargs)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    shutil.rmtree(folder)  # the fetch's folder is gone: a miss, not FileNotFoundError
    result = train_cifar(data=data, **kwargs)
    assert result["val_accuracy"] is not None and (folder / "test_batch").is_file()
    (_, second) = sorted(_runs(tmp_path), key=lambda r: r.info.start_time)
    assert second.data.tags["data_folder"] == str(folder)
    # The fetch step ran again (no cached result naming the deleted folder was used).
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[second.data.tags["prefect.flow_run_id"]])
            )
        )
    assert {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}["fetch_data"] == "Completed"


class _ArchiveServer:
    """A local HTTP server answering 503 to the first `failures` requests, then the bytes."""

    def __init__(self, payload: bytes, failures: int) -> None:
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits += 1
                if outer.hits <= failures:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cifar.tar.gz"

    def __enter__(self) -> _ArchiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def train_from(self, root: Path, checksums: dict[str, str], retries: int) -> dict:
        """One train-cifar run whose data source is this server."""
        return train_cifar(
            preset="seed-baseline",
            root=str(root),
            skip_registry=True,
            data={
                "source": self.url,
                "checksums": checksums,
                "train_size": 240,
                "val_size": 60,
                "download_retries": retries,
                "download_backoff_s": 0.01,
            },
            train={**FAST_TRAIN, "epochs": 1},
        )


def test_flaky_download_is_retried_by_the_task_alone(synthetic_archive, synthetic_cifar, tmp_path):
    _, sums = synthetic_cifar
    with _ArchiveServer(synthetic_archive.read_bytes(), failures=2) as server:
        result = server.train_from(tmp_path, sums, retries=2)
    # 1 try + 2 task retries, one request each; the test below tells the one policy from two
    # stacked ones.
    assert server.hits == 3 and result["registered_version"] is None
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").exists()


def test_a_download_that_keeps_failing_is_tried_retries_plus_one_times(
    synthetic_archive, synthetic_cifar, tmp_path
):
    from cifarlab.data import DownloadError

    _, sums = synthetic_cifar
    with (
        _ArchiveServer(synthetic_archive.read_bytes(), failures=10**6) as server,
        pytest.raises(DownloadError, match="503"),
    ):
        server.train_from(tmp_path, sums, retries=2)
    assert server.hits == 3  # not 3 task tries x 3 download attempts
    assert not (tmp_path / "runs").exists()


def test_a_wrong_archive_is_not_retried(synthetic_archive, synthetic_cifar, tmp_path):
    from cifarlab.data import DataError

    _, sums = synthetic_cifar
    wrong = {**sums, "test_batch": "0" * 32}
    with (
        _ArchiveServer(synthetic_archive.read_bytes(), failures=0) as server,
        pytest.raises(DataError, match="test_batch has md5"),
    ):
        server.train_from(tmp_path, wrong, retries=3)
    assert server.hits == 1  # the same bytes would fail the same way: no retry


def test_interrupted_run_is_resumed_not_duplicated(data, tmp_path, monkeypatch):
    from cifarlab import checkpoints

    real_save = checkpoints.save_atomic
    saves = []

    def die_after_first_checkpoint(obj, path):
        real_save(obj, path)
        saves.append(obj["epoch"])
        if len(saves) == 1:
            raise KeyboardInterrupt("killed")  # as if the process died after epoch 1

    monkeypatch.setattr(checkpoints, "save_atomic", die_after_first_checkpoint)
    cfg = dict(
        preset="seed-baseline", data=data, train={**FAST_TRAIN, "epochs": 3}, root=str(tmp_path)
    )
    with pytest.raises(KeyboardInterrupt):
        train_cifar(**cfg)
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED"
    with pytest.raises(MlflowException):
        _client(tmp_path).get_registered_model(REGISTERED_MODEL)

    result = train_cifar(**cfg)
    (again,) = _runs(tmp_path)  # the same MLflow run, resumed
    assert again.info.run_id == run.info.run_id == result["mlflow_run_id"]
    assert again.info.status == "FINISHED" and result["alias"] == "champion"
    steps = [m.step for m in _client(tmp_path).get_metric_history(run.info.run_id, "val_loss")]
    # Each epoch once: 2 and 3 as they ran, 1 (checkpointed just before the kill, not logged
    # then) from the checkpoint's history.
    assert sorted(steps) == [1, 2, 3]
    assert saves == [1, 2, 3]


def test_onnx_model_from_registry_predicts(data, tmp_path, monkeypatch):
    import mlflow.onnx
    import numpy as np

    train_cifar(preset="seed-baseline", data=data, train=FAST_TRAIN, root=str(tmp_path))
    # Through the environment, restored after the test (set_tracking_uri would leak into it).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    batch = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    out = model.predict(batch)
    logits = out["logits"] if isinstance(out, dict) else np.asarray(out)
    assert np.asarray(logits).shape == (5, 10)
    assert torch.isfinite(torch.as_tensor(np.asarray(logits))).all()


def _config_hash(data, train) -> str:
    """The config hash train-cifar gives these settings (its resume key)."""
    from cifarlab.config import preset
    from cifarlab.data import resolve_source
    from cifarlab.experiment import config_hash

    cfg = preset("seed-baseline", data=data, train=train)
    cfg.data.source = resolve_source(cfg.data.source)
    return config_hash(cfg)


def _flow_run(state):
    """A flow run in `state`, as another host's run of train-cifar would be."""
    from prefect import flow

    @flow(name="elsewhere")
    def elsewhere():
        pass

    with get_client(sync_client=True) as client:
        return client.create_flow_run(elsewhere, state=state)


def _foreign_run(tmp_path, chash, flow_run_id, **tags):
    from registry import tracking

    store = tracking.open_store(tmp_path)
    run_id = tracking.start_run(
        store,
        "elsewhere",
        {},
        {"config_hash": chash, "prefect.flow_run_id": str(flow_run_id), **tags},
    )
    return store, run_id


def test_a_live_run_of_the_same_config_is_left_alone(data, tmp_path):
    """Another flow run of this config is still training (its flow run RUNNING, its process
    alive): a new flow run starts its own MLflow run and touches nothing of the other."""
    from prefect.states import Running

    from registry.hosts import process_tags

    train = {**FAST_TRAIN, "epochs": 1}
    other = _flow_run(Running())
    # This very process stands for the other flow run's: alive, with its true start time.
    store, live = _foreign_run(tmp_path, _config_hash(data, train), other.id, **process_tags())
    before = store.client.get_run(live)
    result = train_cifar(
        preset="seed-baseline", data=data, train=train, root=str(tmp_path), skip_registry=True
    )
    assert result["mlflow_run_id"] != live
    after = store.client.get_run(live)
    assert after.info.status == "RUNNING" and after.data.tags == before.data.tags
    assert after.data.metrics == {}
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(other.id).state.is_running()


def test_a_run_whose_process_died_on_this_host_is_ended_and_resumed(data, tmp_path):
    """Its worker was killed with it: Prefect still says RUNNING, but the process is gone.
    The next flow run of the config marks the flow run Crashed and resumes the MLflow run."""
    import subprocess
    import sys

    from prefect.states import Running

    from registry.hosts import host_name

    train = {**FAST_TRAIN, "epochs": 1}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = _flow_run(Running())
    store, orphan = _foreign_run(
        tmp_path,
        _config_hash(data, train),
        other.id,
        host=host_name(),
        pid=str(dead.pid),
        pid_started="1.0",
    )
    result = train_cifar(
        preset="seed-baseline", data=data, train=train, root=str(tmp_path), skip_registry=True
    )
    assert result["mlflow_run_id"] == orphan
    assert store.client.get_run(orphan).info.status == "FINISHED"
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(other.id).state.is_crashed()


def test_an_unfinished_run_of_another_host_is_not_resumed_here(data, tmp_path):
    """Its checkpoint is on the other host's disk: this host starts its own run."""
    from prefect.states import Failed

    train = {**FAST_TRAIN, "epochs": 1}
    other = _flow_run(Failed())
    store, theirs = _foreign_run(
        tmp_path, _config_hash(data, train), other.id, host="gpu-host-b", pid="1"
    )
    store.client.set_terminated(theirs, "FAILED")
    result = train_cifar(
        preset="seed-baseline", data=data, train=train, root=str(tmp_path), skip_registry=True
    )
    assert result["mlflow_run_id"] != theirs
    assert store.client.get_run(theirs).info.status == "FAILED"


def _dead_pid() -> str:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return str(proc.pid)


def test_the_reaper_judges_only_processes_of_this_host(tmp_path):
    """A RUNNING run whose pid is dead *here* but which runs on another host, on a machine that
    shares this host's name, or in another container on this kernel, is someone's live run:
    left alone. The same run of this host (this boot, or an earlier boot of this machine) is
    failed and its flow run told."""
    from registry import tracking

    store = tracking.open_store(tmp_path)
    pid, here = _dead_pid(), hosts.host_identity()
    name = hosts.host_name()
    runs = {
        "other host": {"host": "gpu-host-b", **here},
        "same name, other machine": {
            "host": name,
            **here,
            "host_machine": "m" * 12,
            "host_boot": "b" * 12,
        },
        "same kernel, other container": {"host": name, **here, "host_pidns": "n" * 12},
        "here": {"host": name, **here},
        "here, before a reboot": {"host": name, **here, "host_boot": "b" * 12},
    }
    ids = {
        what: tracking.start_run(
            store,
            what,
            {},
            {
                "prefect.flow_run_id": f"flow-{i}",
                "prefect.flow_run_count": "1",
                "pid": pid,
                "pid_started": "1.0",
                **tags,
            },
        )
        for i, (what, tags) in enumerate(runs.items())
    }
    crashed = []
    failed = tracking.fail_stale_runs(store, lambda _id: True, lambda *args: crashed.append(args))
    expected = ["here", "here, before a reboot"]
    if not here["host_machine"]:  # no /etc/machine-id: an earlier boot cannot be told ours
        expected = ["here"]
    assert sorted(failed) == sorted(ids[w] for w in expected)
    assert sorted(c[0] for c in crashed) == sorted(f"flow-{list(runs).index(w)}" for w in expected)
    assert all(c[2] == "1" for c in crashed)
    for what in set(runs) - set(expected):
        assert store.client.get_run(ids[what]).info.status == "RUNNING", what


def test_a_resume_claim_names_its_new_owner_before_it_says_running(tmp_path, monkeypatch):
    """A reaper that reads the run the moment it turns RUNNING already sees the new owner."""
    from mlflow import MlflowClient

    from registry import tracking

    store = tracking.open_store(tmp_path)
    run_id = tracking.start_run(store, "orphan", {}, {"prefect.flow_run_id": "ended"})
    store.client.set_terminated(run_id, "FAILED")
    seen = []
    real = MlflowClient.update_run

    def update_run(self, rid, status=None, **kwargs):
        seen.append((status, self.get_run(rid).data.tags["prefect.flow_run_id"]))
        return real(self, rid, status=status, **kwargs)

    monkeypatch.setattr(MlflowClient, "update_run", update_run)
    tracking.start_run(
        store,
        "orphan",
        {},
        {"prefect.flow_run_id": "new-owner"},
        resume=store.client.get_run(run_id),
    )
    assert seen == [("RUNNING", "new-owner")]


def test_the_reaper_never_fails_a_run_claimed_while_it_judged(tmp_path):
    """Between the reaper's search and its verdict another flow run resumes the run (it was
    failed by a third party and claimed): the reaper sees the new owner and leaves it."""
    from registry import tracking

    store = tracking.open_store(tmp_path)
    run_id = tracking.start_run(store, "orphan", {}, {"prefect.flow_run_id": "ended"})

    def ended_and_meanwhile_claimed(flow_run_id):
        store.client.set_terminated(run_id, "FAILED")  # another reaper got there first
        tracking.start_run(
            store,
            "orphan",
            {},
            {"prefect.flow_run_id": "new-owner", **hosts.process_tags()},
            resume=store.client.get_run(run_id),
        )
        return flow_run_id != "ended"

    assert tracking.fail_stale_runs(store, ended_and_meanwhile_claimed) == []
    now = store.client.get_run(run_id)
    assert now.info.status == "RUNNING"
    assert now.data.tags["prefect.flow_run_id"] == "new-owner" and "failure" not in now.data.tags


def test_a_flow_run_is_crashed_only_for_the_attempt_that_died():
    """The dead process ran attempt N; a retry (attempt N+1) running elsewhere is left alone."""
    from prefect.states import Running

    from flows.runs import crash_flow_run

    flow_run = _flow_run(Running())
    with get_client(sync_client=True) as client:
        count = client.read_flow_run(flow_run.id).run_count
    crash_flow_run(str(flow_run.id), "its process is gone", str(count + 1))
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.is_running()
    crash_flow_run(str(flow_run.id), "its process is gone", str(count))
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.is_crashed()
