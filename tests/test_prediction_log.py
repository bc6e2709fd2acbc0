"""Request ids, the prediction log and feedback: the writer and its files, the SQLite index, and
the service's routes called in-process (Starlette's test client) on a real ONNX model."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.constants import CLASS_NAMES
from serving.feedback import Ledger, Row
from serving.logfiles import closed_files, read_records, recover_orphans
from serving.records import Answer, LogSettings, PredictionLog, give_feedback


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class _Img:
    format, width, height, mode = "PNG", 32, 32, "RGB"


def _answer(rid: str, n: int = 1, t: float | None = None) -> Answer:
    rng = np.random.default_rng(len(rid))
    probs = rng.dirichlet(np.ones(10), n)
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return Answer(
        time.time() if t is None else t,
        rid,
        n > 1,
        {"version": "3", "bento_tag": "cifar10-classifier:abc", "precision": "fp32"},
        probs,
        pixels,
        [_Img()] * n,
        [(0.5, True)] * n,
        0.0015,
    )


@pytest.fixture
def plog(tmp_path):
    log = PredictionLog(LogSettings(tmp_path / "log"), CLASS_NAMES).start()
    yield log
    log.close()


def test_records_carry_what_was_answered(plog):
    a = _answer("req1", n=3)
    plog.add(a)
    plog.flush()
    records = list(read_records(plog.folder))
    assert [r["request_id"] for r in records] == ["req1.0", "req1.1", "req1.2"]
    r = records[1]
    assert r["kind"] == "prediction" and r["request"] == "req1" and r["index"] == 1
    assert r["model_version"] == "3" and r["precision"] == "fp32"
    assert r["probabilities"] == pytest.approx(a.probs[1].tolist(), abs=1e-6)
    assert r["label"] == CLASS_NAMES[int(a.probs[1].argmax())]
    px = a.pixels[1].reshape(-1, 3).astype(np.float64)
    assert r["image"]["mean"] == pytest.approx(px.mean(0), abs=0.01)
    assert r["image"]["std"] == pytest.approx(px.std(0), abs=0.01)
    assert r["ood_score"] == 0.5 and r["in_distribution"] is True
    assert r["latency_ms"] == 1.5
    assert "pixels" not in r and not (plog.folder / "images").exists()  # no image bytes kept


def test_files_are_closed_at_their_size_and_at_their_age(tmp_path):
    settings = LogSettings(tmp_path, file_bytes=2000, file_seconds=3600)
    log = PredictionLog(settings, CLASS_NAMES).start()
    try:
        for i in range(13):
            log.add(_answer(f"r{i}"))
            log.flush()
        closed = closed_files(tmp_path)
        assert len(closed) >= 2 and all(p.stat().st_size >= 2000 for p in closed)
        assert len(list(read_records(tmp_path))) == 13
        assert len(list(read_records(tmp_path, include_open=False))) < 13
    finally:
        log.close()
    assert not list(tmp_path.glob("*.part")), "closing the service closes its file"
    aged = PredictionLog(LogSettings(tmp_path / "aged", file_seconds=0.6), CLASS_NAMES).start()
    try:
        aged.add(_answer("old"))
        deadline = time.monotonic() + 10
        while not closed_files(aged.folder) and time.monotonic() < deadline:
            time.sleep(0.1)  # the writer's own thread closes an idle file once it is old
        assert [r["request_id"] for r in read_records(aged.folder, include_open=False)] == ["old"]
    finally:
        aged.close()


def test_retention_and_size_cap_delete_the_oldest_closed_files(tmp_path):
    settings = LogSettings(tmp_path, file_bytes=1, retention_seconds=7 * 86400, max_bytes=10**9)
    log = PredictionLog(settings, CLASS_NAMES).start()
    try:
        now = time.time()
        for i, age_days in enumerate([40, 20, 2, 0]):
            log.add(_answer(f"r{i}", t=now - age_days * 86400))
            log.flush()  # file_bytes=1: every flush closes its file
        files = closed_files(tmp_path)
        assert len(files) == 4
        for path, age_days in zip(files, [40, 20, 2, 0]):
            os.utime(path, (now - age_days * 86400, now - age_days * 86400))
        gone = log.prune(now)
        assert gone == files[:2]  # past the 7-day retention
        assert log.ledger.give("r0", "cat").status == "unknown"  # expired with its file
        assert log.ledger.give("r3", "cat").status == "stored"
        capped = LogSettings(
            tmp_path, retention_seconds=100 * 86400, max_bytes=files[3].stat().st_size
        )
        from serving.logfiles import prune

        assert prune(tmp_path, capped, now, None) == [files[2]]
        assert closed_files(tmp_path) == [files[3]]
    finally:
        log.close()


def test_a_dead_workers_open_file_is_closed_by_the_next_start(tmp_path):
    """An open file nobody holds the lock of is a dead writer's (whatever its process id, which
    a restarted container hands out again); a locked one is a live writer's and stays open."""
    from serving.logfiles import lock_open_file

    dead = tmp_path / f"predictions-20260101T000000-host-{os.getpid()}-1.jsonl.part"
    alive = tmp_path / "predictions-20260101T000001-host-1-1.jsonl.part"
    dead.write_text('{"kind": "prediction", "request_id": "a"}\n{"kind": "predic')
    with open(alive, "a") as writer:
        lock_open_file(writer)
        assert recover_orphans(tmp_path) == [dead]
        assert alive.exists()
    assert [p.name for p in closed_files(tmp_path)] == [dead.name.removesuffix(".part")]
    assert [r["request_id"] for r in read_records(tmp_path)] == ["a"]  # the cut line skipped


def test_workers_starting_together_close_each_orphan_once(tmp_path):
    for i in range(40):
        (tmp_path / f"predictions-20260101T0000{i:02d}-h-1-1.jsonl.part").write_text("{}\n")
    closed: list[list[Path]] = [[], []]
    errors: list[BaseException] = []

    def start(k: int) -> None:
        try:
            closed[k] = recover_orphans(tmp_path)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(closed[0]) + len(closed[1]) == 40
    assert len(closed_files(tmp_path)) == 40 and not list(tmp_path.glob("*.part"))


def test_the_recorded_label_is_the_answered_one_even_in_a_near_tie(plog):
    a = _answer("tie")
    a.probs = np.full((1, 10), 0.09999993)
    a.probs[0, 0], a.probs[0, 3] = 0.1000002, 0.1000004  # equal after rounding to 6 digits
    plog.add(a)
    plog.flush()
    (record,) = read_records(plog.folder)
    assert record["label"] == CLASS_NAMES[3]
    assert plog.ledger.give("tie", "cat").predicted == CLASS_NAMES[3]


def test_ledger_keeps_the_first_label_and_knows_no_unknown_ids(tmp_path):
    ledger = Ledger(tmp_path / "requests.sqlite")
    ledger.add([Row("a", time.time(), "2", "cat"), Row("b.0", time.time(), "2", "dog")])
    assert ledger.give("zzz", "cat").status == "unknown"
    first = ledger.give("a", "dog")
    assert (first.status, first.label, first.predicted, first.model_version) == (
        "stored",
        "dog",
        "cat",
        "2",
    )
    again = ledger.give("a", "cat")
    assert (again.status, again.label) == ("duplicate", "dog")
    # an answer older than `since` has expired: unknown, even with its row still there
    ledger.add([Row("old", time.time() - 100, "2", "cat", b"x" * 3072)])
    assert not ledger.knows("old", since=time.time() - 50) and ledger.knows("old")
    assert ledger.give("old", "dog", since=time.time() - 50).status == "unknown"
    ledger.expire(before=0, pixels_before=time.time() - 50)  # its kept input is dropped
    assert ledger.give("old", "dog").pixels is None
    # a second connection (another worker) sees the same
    other = Ledger(tmp_path / "requests.sqlite")
    assert other.give("a", "bird").label == "dog"
    assert other.give("b.0", "bird").status == "stored"


def test_concurrent_labels_for_one_id_store_exactly_one(tmp_path):
    Ledger(tmp_path / "r.sqlite").add([Row("x", time.time(), "1", "cat")])
    results: list[str] = []

    def give(label: str) -> None:
        results.append(Ledger(tmp_path / "r.sqlite").give("x", label).status)

    threads = [threading.Thread(target=give, args=(CLASS_NAMES[i],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["duplicate"] * 7 + ["stored"]


def test_feedback_is_recorded_with_the_kept_input(tmp_path):
    log = PredictionLog(LogSettings(tmp_path, keep_feedback_images=True), CLASS_NAMES).start()
    try:
        a = _answer("fb", n=2)
        log.add(a)  # still queued: give_feedback writes this worker's queue first
        given = give_feedback(log, "fb.1", "horse", wait_s=0)
        assert given.status == "stored"
        log.flush()
        fb = list(read_records(tmp_path, kind="feedback"))
        assert [(f["request_id"], f["label"], f["model_version"]) for f in fb] == [
            ("fb.1", "horse", "3")
        ]
        assert fb[0]["predicted"] == CLASS_NAMES[int(a.probs[1].argmax())]
        kept = np.asarray(Image.open(tmp_path / "feedback-images" / "horse" / "fb.1.png"))
        np.testing.assert_array_equal(kept, a.pixels[1])
    finally:
        log.close()


def test_settings_from_the_environment_name_a_bad_value(monkeypatch, tmp_path):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    s = LogSettings.from_env()
    assert s is not None and s.folder == tmp_path / "prediction-log"
    monkeypatch.setenv("CIFAR_PREDICTION_LOG_RETENTION_DAYS", "soon")
    with pytest.raises(ValueError, match="CIFAR_PREDICTION_LOG_RETENTION_DAYS='soon'"):
        LogSettings.from_env()
    monkeypatch.delenv("CIFAR_PREDICTION_LOG_RETENTION_DAYS")
    monkeypatch.setenv("CIFAR_KEEP_IMAGES_RATE", "1.5")
    with pytest.raises(ValueError, match="CIFAR_KEEP_IMAGES_RATE"):
        LogSettings.from_env()
    monkeypatch.setenv("CIFAR_PREDICTION_LOG", "false")
    assert LogSettings.from_env() is None


# ---- the routes, in-process -------------------------------------------------------------------


@pytest.fixture
def service(untrained_model, tmp_path):
    """serving/http.py's routes with a prediction log in a temporary folder."""
    from starlette.testclient import TestClient

    from serving.http import Front, Routes, Settings
    from serving.live import LiveModel

    settings = LogSettings(tmp_path / "log", keep_images_rate=0.0)
    log = PredictionLog(settings, untrained_model.engine.class_names).start()
    routes = Routes()
    routes.front = Front(
        LiveModel(untrained_model, lambda: None, lambda _s: untrained_model),
        Settings(2**21, 2**22, 16, 10**6, feedback_wait_s=0.2),
        records=log,
    )
    with TestClient(routes.app) as client:
        yield client, log
    log.close()


def test_answers_carry_a_request_id_and_adopt_a_safe_client_id(service):
    client, log = service
    r = client.post("/classify", files={"image": ("a.png", _png(0), "image/png")})
    assert r.status_code == 200
    rid = r.json()["request_id"]
    assert r.headers["X-Request-Id"] == rid and len(rid) == 32
    for field in ("label", "class_id", "confidence", "top_k", "image", "model"):
        assert field in r.json()  # every field it had before
    ok = client.post(
        "/classify",
        content=_png(1),
        headers={"Content-Type": "image/png", "X-Request-Id": "ab-C_9"},
    )
    assert ok.json()["request_id"] == "ab-C_9" == ok.headers["X-Request-Id"]
    for unsafe in ("a b", "x" * 65, "../etc", "a.1"):
        r = client.post(
            "/classify",
            content=_png(2),
            headers={"Content-Type": "image/png", "X-Request-Id": unsafe},
        )
        assert r.status_code == 200 and r.json()["request_id"] != unsafe
    batch = client.post(
        "/classify_batch",
        files=[("images", (f"{i}.png", _png(i), "image/png")) for i in range(3)],
        headers={"X-Request-Id": "batch7"},
    )
    assert batch.json()["request_id"] == "batch7"
    assert [x["request_id"] for x in batch.json()["results"]] == [
        "batch7.0",
        "batch7.1",
        "batch7.2",
    ]
    log.flush()
    ids = [rec["request_id"] for rec in read_records(log.folder)]
    assert ids[:2] == [rid, "ab-C_9"] and ids[-3:] == ["batch7.0", "batch7.1", "batch7.2"]


def test_refusals_keep_their_bodies_and_carry_the_id(service):
    client, log = service
    bad = client.post(
        "/classify",
        files={"image": ("a.png", b"not an image", "image/png")},
        headers={"X-Request-Id": "bad0"},
    )
    assert bad.status_code == 415 and set(bad.json()) == {"error", "reason"}
    assert bad.headers["X-Request-Id"] == "bad0"
    r = client.post(
        "/classify",
        content=b"not an image",
        headers={"Content-Type": "image/png", "X-Request-Id": "bad1"},
    )
    assert r.status_code == 415 and set(r.json()) == {"error", "reason"}
    assert r.headers["X-Request-Id"] == "bad1"
    log.flush()
    assert list(read_records(log.folder)) == []  # nothing answered, nothing recorded


def test_feedback_over_http(service):
    client, log = service
    rid = client.post("/classify", files={"image": ("a.png", _png(0), "image/png")}).json()[
        "request_id"
    ]
    r = client.post("/feedback", json={"request_id": rid, "label": "cat"})
    assert r.status_code == 200, r.text
    assert r.json()["stored"] is True and r.json()["label"] == "cat"
    dup = client.post("/feedback", json={"request_id": rid, "label": "dog"})
    assert dup.status_code == 409 and dup.json()["label"] == "cat"
    assert dup.json()["reason"] == "feedback_exists"
    unknown = client.post("/feedback", json={"request_id": "nope", "label": "cat"})
    assert unknown.status_code == 404 and unknown.json()["reason"] == "unknown_request_id"
    for body, reason in [
        ({"request_id": rid, "label": "catt"}, "bad_label"),
        ({"request_id": rid, "label": 3}, "bad_label"),
        ({"request_id": "a b", "label": "cat"}, "bad_request_id"),
        ({"label": "cat"}, "bad_request_id"),
        ([rid, "cat"], "bad_json"),
    ]:
        r = client.post("/feedback", json=body)
        assert r.status_code == 400 and r.json()["reason"] == reason, (body, r.text)
    assert client.post("/feedback", content=b"{nope").json()["reason"] == "bad_json"
    assert client.post("/feedback", content=b"x" * 5000).status_code == 413
    log.flush()
    fb = list(read_records(log.folder, kind="feedback"))
    assert [(f["request_id"], f["label"]) for f in fb] == [(rid, "cat")]


# ---- shipping closed files through the tracking server ----------------------------------------


def test_closed_files_are_shipped_to_the_tracking_store_once(tmp_path):
    from registry.serving_host import main as serving_host
    from registry.ship_records import download_records, ship_records
    from registry.tracking import TrackingUnavailable
    from stacks.processes import free_port

    folder = tmp_path / "log"
    log = PredictionLog(LogSettings(folder, file_bytes=1000), CLASS_NAMES).start()
    for i in range(7):
        log.add(_answer(f"s{i}"))
        log.flush()
    closed = closed_files(folder)
    assert len(closed) >= 2 and list(folder.glob("*.part"))
    contents = {p.name: p.read_bytes() for p in closed}

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        ship_records(tmp_path, folder, uri=dead)
    assert closed_files(folder) == closed  # nothing lost, nothing moved

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shipped = ship_records(tmp_path, folder, uri=uri, host="serving-a")
    assert shipped is not None and [p.name for p in shipped.files] == sorted(contents)
    assert closed_files(folder) == [] and ship_records(tmp_path, folder, uri=uri) is None
    assert len(list(read_records(folder))) == 7  # shipped files are still read here

    got = download_records(tmp_path, tmp_path / "monitor", uri=uri)
    assert {p.name: p.read_bytes() for p in got} == contents
    assert all(p.parent.parent.parent.name == "serving-a" for p in got)

    log.close()  # closes the open file: the command ships it
    assert (
        serving_host(
            [
                "--root",
                str(tmp_path),
                "--tracking-uri",
                uri,
                "--records-dir",
                str(folder),
                "--ship-records",
            ]
        )
        == 0
    )
    assert closed_files(folder) == [] and len(list(folder.glob("shipped/*.jsonl"))) == len(got) + 1
    assert (
        serving_host(
            [
                "--root",
                str(tmp_path),
                "--tracking-uri",
                dead,
                "--records-dir",
                str(folder),
                "--ship-records",
            ]
        )
        == 0
    )  # nothing to ship: the server is not asked


def test_a_version_without_a_reference_answers_null_and_says_why(service):
    client, _ = service
    body = client.post("/classify", files={"image": ("a.png", _png(0), "image/png")}).json()
    assert body["ood_score"] is None and body["in_distribution"] is None
    card = client.get("/model").json()
    assert card["ood_threshold"] is None and "in_distribution: null" in card["ood_note"]


def test_uploads_are_kept_as_sent_only_when_asked(untrained_model, tmp_path):
    from starlette.testclient import TestClient

    from serving.http import Front, Routes, Settings
    from serving.live import LiveModel

    log = PredictionLog(
        LogSettings(tmp_path, keep_images_rate=1.0, retention_seconds=1.0),
        untrained_model.engine.class_names,
    ).start()
    routes = Routes()
    routes.front = Front(
        LiveModel(untrained_model, lambda: None, lambda _s: untrained_model),
        Settings(2**21, 2**22, 16, 10**6, feedback_wait_s=0.2),
        records=log,
    )
    try:
        with TestClient(routes.app) as client:
            png = _png(5)
            rid = client.post("/classify", files={"image": ("a.png", png, "image/png")}).json()[
                "request_id"
            ]
            log.flush()
            (kept,) = (tmp_path / "images").rglob("*.png")
            assert kept.name == f"{rid}.png" and kept.read_bytes() == png
            time.sleep(1.1)  # past the (1 s) retention: the id has expired
            late = client.post("/feedback", json={"request_id": rid, "label": "cat"})
            assert late.status_code == 404 and late.json()["reason"] == "unknown_request_id"
    finally:
        log.close()
