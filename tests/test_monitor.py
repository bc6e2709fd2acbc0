"""The monitor-cifar flow on records the service's own log writer wrote from the registered
champion's own answers (serving.engine on its ONNX file, with its out-of-distribution reference):
what it returns, the MLflow run and the Prefect artifact and event it leaves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from cifarlab.arrays import load_cifar10
from cifarlab.constants import CLASS_NAMES
from cifarlab.ood import OodReference
from cifarlab.split import stratified_split
from flows.monitor import DRIFT_EVENT, main, monitor_cifar
from flows.train_flow import train_cifar
from registry.ship_records import MONITORING_EXPERIMENT
from registry.tracking import REGISTERED_MODEL
from serving.engine import Engine
from serving.preprocess import to_model_input
from serving.records import Answer, LogSettings, PredictionLog, give_feedback


class _Img:
    format, width, height, mode = "PNG", 32, 32, "RGB"


@pytest.fixture(scope="module")
def champion(prefect_api, synthetic_cifar, tmp_path_factory):
    """A champion trained by the flow on the synthetic files; its version, engine, val images."""
    folder, sums = synthetic_cifar
    root = tmp_path_factory.mktemp("monitor-root")
    data = {"source": str(folder), "checksums": sums, "train_size": 240, "val_size": 60}
    result = train_cifar(preset="seed-baseline", data=data, train={"epochs": 1, "device": "cpu"},
                         root=str(root), skip_bentoml=True)  # fmt: skip
    assert result["alias"] == "champion"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return root, *champion_engine(client, root / "dl", folder), client


def champion_engine(client: MlflowClient, tmp: Path, synthetic: Path) -> tuple:
    """The champion's version, its ONNX file run by the service's engine with its
    out-of-distribution reference, and its validation images (uint8 NHWC, split 240/60)."""
    version = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    files = Path(client.download_artifacts(version.run_id, "", str(tmp)))
    ood = OodReference.from_json((files / "ood" / "ood_reference.json").read_text())
    engine = Engine(next(files.rglob("*.onnx")), threads=1, ood=ood)
    arrays = load_cifar10(synthetic)
    split = stratified_split(arrays.train_labels.numpy(), 240, 60, 0)
    val = arrays.train_images[split.val_idx].permute(0, 2, 3, 1).numpy()
    return str(version.version), engine, val


def serve_brighter(folder: Path, engine: Engine, version: str, val: np.ndarray) -> list[str]:
    """Answers to the validation images made 40 % brighter, logged as the service logs them."""
    bright = np.clip(val.astype(np.float32) * 1.4, 0, 255).astype(np.uint8)
    return _serve(folder, engine, version, bright, repeats=4)


def _serve(folder: Path, engine: Engine, version: str, px: np.ndarray, repeats: int) -> list[str]:
    """Answer the images as the service does and log them; the request ids."""
    log = PredictionLog(LogSettings(folder), CLASS_NAMES).start()
    ids = []
    for r in range(repeats):
        out = engine.infer(to_model_input(px))
        probs, scores = out[:, :-1], out[:, -1]
        for i in range(len(px)):
            rid = f"q{r}-{i}"
            inside = bool(scores[i] <= engine.ood.threshold)
            log.add(Answer(time.time(), rid, False, {"version": version}, probs[i : i + 1],
                           px[i : i + 1], [_Img()], [(float(scores[i]), inside)], 0.001))  # fmt: skip
            ids.append(rid)
    log.flush()
    for rid in ids[:20]:  # feedback on 20 answers: 10 say "cat", 10 "ship"
        give_feedback(log, rid, "cat" if int(rid.split("-")[1]) % 2 else "ship", 1.0)
    log.close()
    return ids


def test_what_it_was_registered_on_is_no_drift_and_is_recorded(champion, tmp_path):
    root, version, engine, val, client = champion
    _serve(tmp_path, engine, version, val, repeats=4)
    out = monitor_cifar(records=str(tmp_path), hours=None, min_images=100, root=str(root))
    assert out["drift"] is False and out["fired"] == [] and out["tested"]
    assert out["answers"] == 240 and out["feedback"] == 20 and out["model_version"] == version
    run = client.get_run(out["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == MONITORING_EXPERIMENT
    assert run.data.tags["model_version"] == version and run.data.tags["drift"] == "false"
    assert {"report.html", "series.png", "verdict.json", "series.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    m = run.data.metrics
    assert m["drift"] == 0 and m["images"] == 240 and m["feedback_labelled"] == 20
    # The live accuracy is the share of the 20 labels the answers matched.
    answers = engine.infer(to_model_input(val))[:, :-1].argmax(1)
    right = sum(CLASS_NAMES[answers[i]] == ("cat" if i % 2 else "ship") for i in range(20))
    assert m["live_accuracy"] == pytest.approx(right / 20)
    assert len(client.get_metric_history(run.info.run_id, "bin.confidence")) >= 1
    page = Path(client.download_artifacts(run.info.run_id, "report.html", str(tmp_path)))
    assert "no drift" in page.read_text()


def test_brighter_images_are_drift_with_an_event_naming_the_version(champion, tmp_path):
    root, version, engine, val, client = champion
    serve_brighter(tmp_path, engine, version, val)
    since = time.time()
    out = monitor_cifar(records=str(tmp_path), hours=None, min_images=100, root=str(root))
    assert out["drift"] is True and out["tested"]
    assert {"image_mean.r", "image_mean.g", "image_mean.b"} <= set(out["fired"])
    assert client.get_run(out["mlflow_run_id"]).data.tags["drift"] == "true"
    events = asyncio.run(_events_since(since))
    assert [e.resource.get("cifar.model.version") for e in events] == [version]
    assert events[0].payload["fired"] == out["fired"]


def test_too_few_answers_are_not_tested_and_other_versions_are_left_out(champion, tmp_path):
    root, version, engine, val, _ = champion
    _serve(tmp_path, engine, "999", val, repeats=4)  # another version's answers
    _serve(tmp_path, engine, version, val[:30], repeats=1)
    out = monitor_cifar(records=str(tmp_path), hours=None, min_images=100, root=str(root))
    assert out == {**out, "tested": False, "drift": False, "answers": 30, "mlflow_run_id": None}


def _at(folder: Path, engine: Engine, version: str, px: np.ndarray, ago_s: float) -> None:
    """Answers given `ago_s` seconds ago, logged."""
    log = PredictionLog(LogSettings(folder), CLASS_NAMES).start()
    out = engine.infer(to_model_input(px))
    for i in range(len(px)):
        log.add(Answer(time.time() - ago_s, f"t{ago_s}-{i}", False, {"version": version},
                       out[i : i + 1, :-1], px[i : i + 1], [_Img()], [(float(out[i, -1]), True)],
                       0.001))  # fmt: skip
    log.close()


def test_the_window_is_the_last_hours_ending_lag_minutes_ago(champion, tmp_path):
    root, version, engine, val, _ = champion
    _at(tmp_path, engine, version, val, ago_s=3 * 3600)  # too old
    _at(tmp_path, engine, version, val[:40], ago_s=1800)
    _at(tmp_path, engine, version, val[:20], ago_s=5)
    out = monitor_cifar(records=str(tmp_path), hours=1, min_images=1000, root=str(root))
    assert out["answers"] == 60 and not out["tested"]
    out = monitor_cifar(records=str(tmp_path), hours=1, lag_minutes=10, min_images=1000,
                        root=str(root))  # fmt: skip
    assert out["answers"] == 40


def test_shipped_records_are_read_when_this_host_serves_nothing(champion, tmp_path, monkeypatch):
    from registry.ship_records import ship_records

    root, version, engine, val, _ = champion
    serve_brighter(tmp_path / "log", engine, version, val)
    assert ship_records(root, tmp_path / "log", host="web-1").files
    monkeypatch.setenv("CIFAR_PREDICTION_LOG_DIR", str(tmp_path / "not-here"))
    out = monitor_cifar(hours=1, lag_minutes=0, min_images=100, root=str(root))
    assert out["records"].startswith("shipped to sqlite:") and out["answers"] == 240
    assert out["drift"] and out["champion"]


def test_an_unknown_version_is_named(champion):
    with pytest.raises(ValueError, match="model_version='99': no such version of cifar10"):
        monitor_cifar(model_version="99", root=str(champion[0]))


def test_a_missing_folder_is_named(champion, capsys, monkeypatch):
    with pytest.raises(ValueError, match="records='/nope': no such folder"):
        monitor_cifar(records="/nope", root=str(champion[0]))
    monkeypatch.setenv("CIFAR_ROOT", str(champion[0]))
    assert main(["--records", "/nope"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: records='/nope': no such folder"


def test_before_any_champion_there_is_nothing_to_watch(prefect_api, tmp_path):
    out = monitor_cifar(root=str(tmp_path))
    assert out == {"drift": False, "fired": [], "tested": False, "model_version": None}


async def _events_since(since: float, timeout: float = 20.0) -> list:
    """The drift events the Prefect server stored since `since` (it persists them in batches)."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    flt = EventFilter(
        event=EventNameFilter(name=[DRIFT_EVENT]),
        occurred=EventOccurredFilter(since=datetime.fromtimestamp(since, UTC)),
    )
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            r = await client._client.post(
                "/events/filter", json={"filter": flt.model_dump(mode="json")}
            )
            events = r.json()["events"]
            if events or time.monotonic() > deadline:
                from prefect.events.schemas.events import ReceivedEvent

                return [ReceivedEvent.model_validate(e) for e in events]
            await asyncio.sleep(0.5)
