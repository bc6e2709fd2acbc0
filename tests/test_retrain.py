"""Retraining: the trigger prefect.yaml declares on train-cifar/default, deployed by `prefect
deploy` to a real Prefect server and fed real events; and a run that learns from the images
clients labelled through /feedback (or says that it is a plain retrain)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cifarlab.arrays import load_cifar10
from cifarlab.split import stratified_split
from flows.monitor import DRIFT_EVENT, model_resource
from flows.train_flow import train_cifar

ROOT = Path(__file__).resolve().parents[1]
COOLDOWN_S = 12


def _deploy(api_url: str, tmp: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": api_url, "CIFAR_WORK_POOL": "gpu-test",
           "CIFAR_CONTROL_POOL": "control-test", "CIFAR_PROJECT_DIR": str(ROOT),
           "CIFAR_RETRAIN_COOLDOWN_S": str(COOLDOWN_S), "PREFECT_HOME": str(tmp)}  # fmt: skip
    pool = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "gpu-test",
                           "--type", "process"], env=env, capture_output=True, text=True)  # fmt: skip
    assert pool.returncode == 0 or "already exists" in pool.stdout, pool.stdout + pool.stderr
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "train-cifar/default",
         "--prefect-file", str(ROOT / "prefect.yaml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


async def _retrain_runs(name: str = "train-cifar/default") -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        dep = await client.read_deployment_by_name(name)
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        )
    return [r for r in runs if r.created_by and r.created_by.type == "AUTOMATION"]


def _emit(name: str = "cifar10-classifier", version: str = "3") -> None:
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    emit_event(event=DRIFT_EVENT, resource={**model_resource(name), "cifar.model.version": version},
               payload={"fired": ["class_mix", "confidence"]})  # fmt: skip
    EventsWorker.drain_all(timeout=10)


def _count_after(seconds: float, name: str = "train-cifar/default") -> int:
    time.sleep(seconds)
    return len(asyncio.run(_retrain_runs(name)))


def test_drift_starts_one_retraining_per_cool_down(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    _deploy(PREFECT_API_URL.value(), tmp_path)
    time.sleep(1.5)  # the server loads the new automation
    t0 = time.monotonic()
    _emit()
    assert _count_after(3) == 1  # one event, one run
    (run,) = asyncio.run(_retrain_runs())
    assert run.parameters["feedback_images"] == "auto" and run.parameters["preset"] == "fast"
    assert run.parameters["mlflow_tags"] == {
        "cifar.retrain_reason": DRIFT_EVENT,
        "cifar.drift_model_version": "3",
        "cifar.drift_fired": "class_mix, confidence",
    }
    _emit()
    _emit()
    assert _count_after(3) == 1  # inside the cool-down: none
    _emit(name="another-model")
    assert _count_after(3) == 2  # a cool-down per registered model
    time.sleep(max(0.0, COOLDOWN_S + 1 - (time.monotonic() - t0)))
    _emit()
    assert _count_after(3) == 3  # after it: one again


@pytest.fixture
def data(synthetic_cifar):
    folder, sums = synthetic_cifar
    return {"source": str(folder), "checksums": sums, "train_size": 240, "val_size": 60}


def _kept_images(folder: Path, synthetic: Path) -> None:
    """What a service with CIFAR_KEEP_FEEDBACK_IMAGES=true leaves: <label>/<id>.png. Five new
    images, one that is a validation image (must not be trained on) and one broken file."""
    rng = np.random.default_rng(0)
    for i in range(5):
        (folder / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / "cat" / f"r{i}.png"
        )
    arrays = load_cifar10(synthetic)
    val_idx = stratified_split(arrays.train_labels.numpy(), 240, 60, 0).val_idx
    (folder / "ship").mkdir()
    Image.fromarray(arrays.train_images[val_idx[0]].permute(1, 2, 0).numpy()).save(
        folder / "ship" / "v.png"
    )
    (folder / "ship" / "broken.png").write_bytes(b"not a png")


def test_a_retraining_learns_from_feedback_images(prefect_api, data, synthetic_cifar, tmp_path):
    kept = tmp_path / "kept"
    _kept_images(kept, synthetic_cifar[0])
    out = train_cifar(preset="seed-baseline", data=data, train={"epochs": 1, "device": "cpu"},
                      root=str(tmp_path), skip_bentoml=True, feedback_images=str(kept))  # fmt: skip
    assert out["feedback_images"] == 5  # 6 images read, the validation one dropped
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(out["mlflow_run_id"])
    tags = run.data.tags
    assert tags["feedback_images"] == "5" and tags["feedback_images_dropped"] == "1"
    inputs = {d.dataset.name: [t.value for t in d.tags] for d in run.inputs.dataset_inputs}
    assert inputs["feedback-5"] == ["training"] and inputs["cifar10-training-240"] == ["training"]
    assert (
        "5 images labelled through /feedback added to the training split (6 labelled images "
        "found, 1 files skipped (not a 32x32 image of a class); 1 left out: also a validation "
        "or test image)"
    ) in tags["mlflow.note.content"]
    # The config names the packed file, not a path of this host; the file is on the run.
    packed = run.data.params["data.extra_train"]
    assert packed.startswith("labelled-6-") and "/" not in packed
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "feedback")]
    assert artifacts == [f"feedback/{packed}"]


def test_auto_finds_the_images_serving_hosts_shipped(
    prefect_api, data, synthetic_cifar, tmp_path, monkeypatch
):
    """A training host that serves nothing: the images come through the tracking server, as
    `cifar-import-champion --follow` ships them with the records (registry/ship_records.py)."""
    from registry.ship_records import ship_records

    log = tmp_path / "serving-host-log"
    _kept_images(log / "feedback-images", synthetic_cifar[0])
    shipped = ship_records(tmp_path, log, host="web-1")
    assert shipped is not None and shipped.files == []  # images only: no closed record file
    assert ship_records(tmp_path, log, host="web-1") is None  # each image goes once
    monkeypatch.setenv("CIFAR_PREDICTION_LOG_DIR", str(tmp_path / "not-here"))
    out = train_cifar(preset="seed-baseline", data=data, train={"epochs": 1, "device": "cpu"},
                      root=str(tmp_path), skip_bentoml=True, feedback_images="auto")  # fmt: skip
    assert out["feedback_images"] == 5


def test_a_config_without_extra_images_keeps_its_hash():
    """Runs and checkpoints from before the field existed are still resumed."""
    from cifarlab.config import preset
    from cifarlab.experiment import config_hash

    assert config_hash(preset("fast")) == "92b81e3dc8"
    with_images = preset("fast")
    with_images.data.extra_train = "labelled-5-0123456789abcdef.npz"
    assert config_hash(with_images) != "92b81e3dc8"


def test_without_kept_images_it_is_a_plain_retrain(prefect_api, data, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_PREDICTION_LOG_DIR", str(tmp_path / "no-log"))
    out = train_cifar(preset="seed-baseline", data=data, train={"epochs": 1, "device": "cpu"},
                      root=str(tmp_path), skip_bentoml=True, feedback_images="auto")  # fmt: skip
    assert out["feedback_images"] is None
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(out["mlflow_run_id"])
    assert "a plain retrain" in run.data.tags["mlflow.note.content"]
    assert run.data.params["data.extra_train"] == "None"


def test_a_bad_feedback_folder_is_named(prefect_api, data, tmp_path):
    with pytest.raises(ValueError, match="feedback_images='/nope': expected 'auto' or a folder"):
        train_cifar(preset="seed-baseline", data=data, root=str(tmp_path), feedback_images="/nope")
