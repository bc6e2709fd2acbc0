"""The BentoML service, through a real `bentoml serve` on 127.0.0.1.

One module fixture trains a small model (real CIFAR-10 when present, else the synthetic files),
logs and registers it in a throw-away MLflow store exactly as the flow does, imports the champion
with the `cifar-import-champion` command into a throw-away BentoML store, and starts the server
in its own process group; requests are real multipart uploads.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from cifarlab.config import preset
from cifarlab.constants import CLASS_NAMES
from cifarlab.experiment import run_experiment
from cifarlab.tensors import normalize
from stacks.processes import BentoServer
from tests.conftest import bento_model_store, missing

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 2 * 1024 * 1024  # the server under test runs with a 2 MiB body limit
INFLIGHT_BUDGET = UPLOAD_LIMIT  # and holds at most that many body bytes at once per worker


def _png(pixels_hwc: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels_hwc).save(buf, format="PNG", **save)
    return buf.getvalue()


class Served:
    def __init__(self, url, model, images, labels, home, root):
        self.url, self.model, self.images, self.home = url, model, images, home
        self.labels, self.root = labels, root

    def post(self, path="/classify", files=None, data=None, **kw):
        return requests.post(self.url + path, files=files, data=data, timeout=60, **kw)

    def classify(self, content: bytes, name="img.png", mime="image/png", **fields):
        return self.post(files={"image": (name, content, mime)}, data=fields)

    def classify_raw(self, content: bytes, mime="image/png", **query):
        return requests.post(
            self.url + "/classify",
            data=content,
            params=query,
            headers={"Content-Type": mime},
            timeout=60,
        )

    def torch_probs(self, images_nchw: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits = self.model(normalize(images_nchw, torch.device("cpu")))
        return torch.softmax(logits.double(), dim=1).numpy()


class InProcess:
    """The service's own routes (serving/http.py: upload parsing, decoding, refusals) called
    in-process through Starlette's test client, on a real model in this session's BentoML store:
    no `bentoml serve`, so the request-validation cases run in the fast tier."""

    def __init__(self, client):
        self.client = client

    def post(self, path="/classify", files=None, data=None, **kw):
        return self.client.post(path, files=files, data=data, **kw)

    def post_body(self, path: str, body: bytes, content_type: str, **query):
        return self.client.post(
            path, content=body, params=query, headers={"Content-Type": content_type}
        )

    def classify(self, content: bytes, name="img.png", mime="image/png", **fields):
        return self.post(files={"image": (name, content, mime)}, data=fields)

    def classify_raw(self, content: bytes, mime="image/png", **query):
        return self.post_body("/classify", content, mime, **query)

    def get(self, path: str):
        return self.client.get(path)


@pytest.fixture(scope="module")
def local(untrained_model):
    """The routes of serving/http.py on an untrained net (what is checked here is the request
    handling, not the answers), with the limits the real server gets below."""
    from starlette.testclient import TestClient

    from serving.http import Front, Routes, Settings
    from serving.live import LiveModel
    from serving.preprocess import DEFAULT_MAX_PIXELS

    routes = Routes()
    routes.front = Front(
        LiveModel(untrained_model, lambda: None, lambda _stored: untrained_model),
        Settings(
            max_upload_bytes=UPLOAD_LIMIT,
            max_inflight_bytes=INFLIGHT_BUDGET,
            max_batch_images=256,
            max_pixels=DEFAULT_MAX_PIXELS,
        ),
    )
    with TestClient(routes.app) as client:
        yield InProcess(client)


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_cifar):
    root = tmp_path_factory.mktemp("serving")
    real = Path(
        os.environ.get("CIFAR10_SOURCE") or ROOT.parent / "shared/cifar10/cifar-10-batches-py"
    )
    if (real / "test_batch").is_file():
        data = {"source": str(real), "train_size": 5000, "val_size": 1000}
    else:  # no real data here: the synthetic files, same format
        folder, sums = synthetic_cifar
        data = {"source": str(folder), "checksums": sums, "train_size": 240, "val_size": 60}
    config = preset("seed-baseline", data=data, train={"epochs": 2, "device": "cpu", "tta": "none"})
    outcome = run_experiment(config, root)  # trains, exports and evaluates the ONNX file
    model = outcome.trained.model.eval().float()
    onnx_path = outcome.exported.path

    # Log and register as train-cifar does (registry.tracking), into this test's own store.
    from cifarlab.constants import MEAN, STD
    from registry import champion, run_logging, tracking

    store = tracking.open_store(root)
    run_id = tracking.start_run(store, "serving-test", {"preset": config.preset}, {})
    example = normalize(outcome.data.data.test_images[:2], torch.device("cpu")).numpy()
    logged = run_logging.log_onnx_model(
        store,
        run_id,
        onnx_path,
        example,
        metadata={
            "class_names": list(outcome.data.data.class_names),
            "mean": list(MEAN),
            "std": list(STD),
            "val_accuracy": outcome.val.accuracy,
            "test_accuracy": outcome.test.accuracy,
        },
    )
    tracking.log_metrics(store, run_id, {"final_val_accuracy": outcome.val.accuracy})
    run_logging.log_ood_reference(store, run_id, outcome.evaluation.ood)
    # The int8 twin, as train-cifar builds and logs it.
    from cifarlab.quantize import build_int8, calibration_set

    d = outcome.data.data
    int8 = build_int8(
        onnx_path,
        outcome.val,
        calibration_set(d.train_images, outcome.split.train_idx),
        outcome.run.val_images,
        outcome.run.val_labels,
        d.test_images,
        d.test_labels,
        root / "model_int8.onnx",
    )
    tracking.log_files(store, run_id, {"model_int8": int8.path}, folder="int8")
    champion.register(
        store,
        run_id,
        logged.model_uri,
        onnx_path,
        outcome.data.data,
        tags={
            "val_accuracy": f"{outcome.val.accuracy:.6f}",
            "served_tta": "none",
            "int8_val_accuracy": f"{int8.val.accuracy:.6f}",
            "int8_test_accuracy": f"{int8.test.accuracy:.6f}",
            "int8_servable": str(int8.servable).lower(),
            "int8_judged_with_dot_product": tracking.bool_tag(int8.judged_with_dot_product),
            **run_logging.ood_tags(store.client.get_run(run_id).data.tags),
        },
        model_id=logged.model_id,
        lock=contextlib.nullcontext(),
    )
    tracking.end_run(store, run_id, "FINISHED")

    home = root / "bentoml"
    env = {
        "CIFAR_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "CIFAR_ACCESS_LOG": "false",
        "CIFAR_MAX_INFLIGHT_BYTES": str(INFLIGHT_BUDGET),
    }
    import_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    imported = subprocess.run(
        [sys.executable, "-m", "registry.import_champion", "--root", str(root)],
        cwd=ROOT,
        env={**import_env, "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr

    d = outcome.data.data
    with BentoServer(home, root / "serve.log", env) as url:
        yield Served(url, model, d.test_images, d.test_labels, home, root)


@pytest.mark.e2e
def test_classify_answers_class_probabilities_and_model_version(served):
    r = served.classify(_png(served.images[0].permute(1, 2, 0).numpy()), top_k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = served.torch_probs(served.images[:1])[0]
    assert (
        body["class_id"] == int(probs.argmax()) and body["label"] == CLASS_NAMES[body["class_id"]]
    )
    assert body["confidence"] == pytest.approx(probs.max(), abs=1e-5)
    assert [c["class_id"] for c in body["top_k"]] == list(np.argsort(-probs)[:5])
    assert (
        body["model"]["registered_model"] == "cifar10-classifier"
        and body["model"]["version"] == "1"
    )
    assert body["model"]["run_id"] and body["model"]["bento_tag"].startswith("cifar10-classifier:")
    assert body["image"] == {"format": "PNG", "width": 32, "height": 32, "mode": "RGB", "frames": 1}


@pytest.mark.e2e
def test_curl_upload_as_in_the_readme(served, tmp_path):
    if shutil.which("curl") is None:
        missing("curl", "the README's command is run as written")
    png = tmp_path / "cat.png"
    png.write_bytes(_png(served.images[3].permute(1, 2, 0).numpy()))
    out = subprocess.run(
        ["curl", "-s", "-F", f"image=@{png}", served.url + "/classify"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["class_id"] == int(
        served.torch_probs(served.images[3:4]).argmax()
    )


@pytest.mark.e2e
def test_endpoint_classes_equal_pytorch_on_300_test_images(served):
    n = 300
    expected = served.torch_probs(served.images[:n])
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4  # a near-tie may flip between runtimes: exempt
    pngs = [_png(img.permute(1, 2, 0).numpy()) for img in served.images[:n]]
    single = [served.classify(p).json()["class_id"] for p in pngs[:150]]
    batch = served.post(
        "/classify_batch",
        files=[("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs[150:])],
    )
    assert batch.status_code == 200, batch.text
    got = np.array(single + [res["class_id"] for res in batch.json()["results"]])
    want = expected.argmax(axis=1)
    assert clear.sum() >= n - 3
    assert (got[clear] == want[clear]).all(), np.flatnonzero((got != want) & clear)


@pytest.mark.e2e
def test_200_concurrent_requests_each_get_their_own_answer(served):
    n = 200
    expected = served.torch_probs(served.images[:n])
    pngs = [_png(img.permute(1, 2, 0).numpy()) for img in served.images[:n]]

    def one(i):
        r = served.classify(pngs[i], top_k=10)
        return i, r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(one, range(n)))
    assert len(answers) == n
    for i, status, body in answers:
        assert status == 200, body
        probs = {c["class_id"]: c["probability"] for c in body["top_k"]}
        # All ten probabilities match this image's own: an answer for another image would not.
        np.testing.assert_allclose([probs[k] for k in range(10)], expected[i], atol=1e-4)
    metrics = requests.get(served.url + "/metrics", timeout=10).text
    sizes = [
        line for line in metrics.splitlines() if line.startswith("cifar_inference_batch_size_count")
    ]
    assert sizes, "batch-size histogram missing from /metrics"
    # Adaptive batching merged concurrent requests: fewer onnxruntime calls than images.
    calls = sum(float(line.split()[-1]) for line in sizes)
    images = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("cifar_inference_batch_size_sum")
    )
    assert images > calls
    # BentoML's request figures by endpoint and status.
    assert any(
        line.startswith("bentoml_service_request_total")
        and 'endpoint="/classify"' in line
        and 'http_response_code="200"' in line
        and float(line.split()[-1]) >= n
        for line in metrics.splitlines()
    )


# --- bad input: 4xx with a JSON message, and the server keeps serving ------------------------


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height 8-bit RGB pixels (30 GB decoded), no data."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _good_png() -> bytes:
    return _png(np.full((32, 32, 3), 120, np.uint8))


BAD_INPUTS = [
    # (case, files, form fields, status, text the JSON message must contain)
    (
        "not an image",
        {"image": ("notes.txt", b"hello, world", "text/plain")},
        {},
        415,
        "not an image",
    ),
    (
        "truncated PNG",
        {"image": ("cut.png", _good_png()[:60], "image/png")},
        {},
        400,
        "truncated or corrupt",
    ),
    ("empty file", {"image": ("empty.png", b"", "image/png")}, {}, 400, "empty"),
    ("missing field", None, {"top_k": "3"}, 400, "no file in field 'image'"),
    (
        "misnamed field",
        {"file": ("cat.png", _good_png(), "image/png")},
        {},
        400,
        "unknown form field(s) 'file'",
    ),
    (
        "text instead of a file",
        None,
        {"image": "http://127.0.0.1:9/cat.png"},
        400,
        "must be a file upload",
    ),
    (
        "two images to /classify",
        [
            ("image", ("a.png", _good_png(), "image/png")),
            ("image", ("b.png", _good_png(), "image/png")),
        ],
        {},
        400,
        "/classify_batch",
    ),
    (
        "bracket bomb in top_k",
        {"image": ("a.png", _good_png(), "image/png")},
        {"top_k": "[" * 100_000},
        400,
        "top_k must be a whole number",
    ),
    (
        "TIFF",
        {"image": ("a.tiff", b"II*\x00" + b"\x00" * 200, "image/tiff")},
        {},
        415,
        "send one of PNG, JPEG, WEBP, BMP, GIF",
    ),
    (
        "decompression bomb",
        {"image": ("bomb.png", _bomb_png(), "image/png")},
        {},
        413,
        "megapixels",
    ),
    (
        "body over the limit",
        {"image": ("big.png", b"\x89PNG" + b"\0" * (UPLOAD_LIMIT + 10), "image/png")},
        {},
        413,
        "over the limit",
    ),
    (
        "top_k out of range",
        {"image": ("a.png", _good_png(), "image/png")},
        {"top_k": "11"},
        400,
        "top_k must be a whole number from 1 to 10",
    ),
]


@pytest.mark.parametrize(
    "case,files,fields,status,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_gets_4xx_json(local, case, files, fields, status, text):
    if files is None and fields:  # a plain form without files: still multipart, as curl -F sends
        files = {k: (None, v) for k, v in fields.items()}
        fields = None
    r = local.post(files=files, data=fields)
    assert r.status_code == status, r.text
    body = r.json()
    assert text in body["error"] and body["reason"]


RAW_BAD_INPUTS = [
    # (case, body, content type, status, text the JSON message must contain)
    ("not an image", b"hello, world", "application/octet-stream", 415, "not an image"),
    ("truncated PNG", _good_png()[:60], "image/png", 400, "truncated or corrupt"),
    ("empty body", b"", "image/png", 400, "empty"),
    ("decompression bomb", _bomb_png(), "image/png", 413, "megapixels"),
    (
        "body over the limit",
        b"\x89PNG" + b"\0" * (UPLOAD_LIMIT + 10),
        "image/png",
        413,
        "over the limit",
    ),
    ("JSON body", b'{"image": "cat.png"}', "application/json", 415, "multipart/form-data"),
    (
        "form-encoded body",
        b"image=cat.png",
        "application/x-www-form-urlencoded",
        415,
        "Content-Type",
    ),
    (
        "multipart boundary over 256 characters",
        b"--" + b"b" * 300 + b"\r\n",
        "multipart/form-data; boundary=" + "b" * 300,
        400,
        "multipart",
    ),
]


@pytest.mark.parametrize(
    "case,content,mime,status,text", RAW_BAD_INPUTS, ids=[b[0] for b in RAW_BAD_INPUTS]
)
def test_bad_raw_body_gets_4xx_json(local, case, content, mime, status, text):
    r = local.classify_raw(content, mime)
    assert r.status_code == status, r.text
    assert text in r.json()["error"]


def test_bad_top_k_in_the_query_gets_400(local):
    for value in ("0", "11", "3.5", "[[[[", "", "²", "7" * 5000):
        r = local.classify_raw(_good_png(), top_k=value)
        assert r.status_code == 400 and "top_k" in r.json()["error"], (value, r.text)
    r = local.classify_raw(_good_png(), colour="red")
    assert r.status_code == 400 and "colour" in r.json()["error"]


def test_a_multipart_body_cut_before_its_closing_boundary_is_a_400(local):
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + _good_png() + b"\r\n--xyz--\r\n"
    )
    for cut in (len(body) - 9, len(body) - 40, 120):
        r = local.post_body("/classify", body[:cut], "multipart/form-data; boundary=xyz")
        assert r.status_code == 400 and r.json()["reason"] in ("bad_multipart", "missing_image"), (
            cut,
            r.text,
        )
    r = local.post_body("/classify", body, "multipart/form-data; boundary=xyz")
    assert r.status_code == 200, r.text


def test_a_png_with_a_huge_text_chunk_is_refused_without_expanding_it(local):
    """A 32x32 PNG whose zTXt chunk would expand to 64 MB: refused (400), quickly."""
    import struct
    import time
    import zlib

    png = _good_png()
    text = b"Comment\0\0" + zlib.compress(b" " * (64 * 1024 * 1024), 9)
    chunk = (
        struct.pack(">I", len(text))
        + b"zTXt"
        + text
        + struct.pack(">I", zlib.crc32(b"zTXt" + text) & 0xFFFFFFFF)
    )
    bomb = png[:33] + chunk + png[33:]  # after IHDR
    started = time.perf_counter()
    r = local.classify_raw(bomb)
    assert r.status_code == 400 and r.json()["reason"] == "corrupt", r.text
    assert time.perf_counter() - started < 2


def test_a_cut_animated_gif_is_a_400_at_every_offset(local):
    """Pillow raises IndexError or struct.error while seeking the frames of some cut-off GIFs:
    each cut must still be a 200 (the frames that are there) or a 4xx, never a 500."""
    frames = [Image.new("RGB", (24, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    gif = buf.getvalue()
    statuses = {}
    for cut in range(1, len(gif)):
        r = local.post_body("/classify", gif[:cut], "image/gif")
        statuses.setdefault(r.status_code, []).append(cut)
        if r.status_code != 200:
            assert r.json()["reason"], r.text
    assert set(statuses) <= {200, 400, 415}, {k: v[:5] for k, v in statuses.items()}
    assert 400 in statuses  # most cuts are corrupt


def test_batch_names_the_bad_image(local):
    files = [
        ("images", ("a.png", _good_png(), "image/png")),
        ("images", ("b.txt", b"not an image", "text/plain")),
    ]
    r = local.post("/classify_batch", files=files)
    assert r.status_code == 415 and r.json()["error"].startswith("image 1 ")


def test_batch_over_the_image_limit_is_413(local):
    png = _good_png()
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(257)]
    r = local.post("/classify_batch", files=files)
    assert r.status_code == 413 and "257 images" in r.json()["error"]


@pytest.mark.e2e
def test_rejections_are_counted_in_metrics(served):
    served.classify(b"definitely not an image", name="x.txt", mime="text/plain")
    metrics = requests.get(served.url + "/metrics", timeout=10).text
    assert any(
        line.startswith('cifar_rejected_uploads_total{reason="not_an_image"}')
        and float(line.split()[-1]) >= 1
        for line in metrics.splitlines()
    )


@pytest.mark.e2e
def test_server_still_healthy_after_bad_input(served):
    for _, files, fields, _, _ in BAD_INPUTS:
        served.post(files=files or {k: (None, v) for k, v in fields.items()}, data=None)
    assert requests.get(served.url + "/readyz", timeout=10).status_code == 200
    r = served.classify(_good_png())
    assert r.status_code == 200 and r.json()["label"]


def test_real_world_images(local):
    """A large JPEG, an animated GIF, a 16-bit PNG, a palette PNG with transparency, CMYK JPEG."""
    rng = np.random.default_rng(0)
    # A smooth 1600x1200 "photo": noise at 40x30, scaled up (compresses like a real photo).
    photo = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.Resampling.BICUBIC
    )
    cases = []
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=85)
    cases.append(("JPEG", buf.getvalue(), 1))
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    cases.append(("GIF", buf.getvalue(), 3))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(buf, "PNG")
    cases.append(("PNG", buf.getvalue(), 1))
    pal = Image.new("P", (32, 32))
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    cases.append(("PNG", buf.getvalue(), 1))
    buf = io.BytesIO()
    photo.convert("CMYK").save(buf, "JPEG")
    cases.append(("JPEG", buf.getvalue(), 1))
    buf = io.BytesIO()
    photo.resize((300, 200)).save(buf, "WEBP")
    cases.append(("WEBP", buf.getvalue(), 1))
    buf = io.BytesIO()
    photo.resize((50, 30)).convert("1").save(buf, "BMP")
    cases.append(("BMP", buf.getvalue(), 1))
    for fmt, content, frames_n in cases:
        r = local.classify(content, name="upload", mime="application/octet-stream")
        assert r.status_code == 200, (fmt, r.text)
        assert r.json()["image"]["format"] == fmt and r.json()["image"]["frames"] == frames_n


def test_openapi_documents_the_endpoints(local):
    spec = local.get("/docs.json").json()
    for path in ("/classify", "/classify_batch"):
        assert "post" in spec["paths"][path]
    text = json.dumps(spec)
    assert "curl -F image=@cat.png" in text and '"cat"' in text  # description and examples


@pytest.mark.e2e
def test_model_card_is_served_and_answers_point_at_it(served):
    import requests

    r = requests.get(served.url + "/model", timeout=30, allow_redirects=False)
    assert r.status_code == 200, (r.status_code, r.headers)
    body = r.json()
    assert body["mlflow_version"] == "1" and body["served_tta"] == "none"
    # Why int8 would or would not be served here: the twin's verdict and the CPU it was judged on.
    from cifarlab.cpu import has_int8_dot_product
    from serving.schemas import ModelCard
    from tests.conftest import bento_model_store as model_store

    meta = model_store(served.home).get("cifar10-classifier:latest").info.metadata
    assert body["int8_servable"] is meta["int8_servable"] and isinstance(
        meta["int8_servable"], bool
    )
    assert body["int8_judged_with_dot_product"] is has_int8_dot_product()
    assert set(body) <= set(ModelCard.model_fields), set(body) - set(ModelCard.model_fields)
    ModelCard.model_validate(body)  # the documented schema (/docs.json) says what is sent
    card = body["model_card_markdown"]
    assert "Intended use and limits" in card and "out of domain" in card
    answer = served.classify(_png(served.images[0].permute(1, 2, 0).numpy())).json()["model"]
    assert answer["model_card"] == "/model" and answer["served_tta"] == "none"
    assert answer["val_accuracy"] == pytest.approx(body["val_accuracy"])


# --- the raw-body path, the version on every answer, the documented schema -----------------


@pytest.mark.e2e
def test_raw_body_answers_as_multipart_does_with_the_version_header(served):
    from serving.schemas import Classification

    png = _png(served.images[5].permute(1, 2, 0).numpy())
    multipart = served.classify(png, top_k=10)
    raw = served.classify_raw(png, top_k=10)
    octet = served.classify_raw(png, mime="application/octet-stream", top_k=10)
    for r in (multipart, raw, octet):
        assert r.status_code == 200, r.text
        Classification.model_validate(r.json())  # what /docs.json documents
        assert r.headers["X-Model-Version"] == r.json()["model"]["version"] == "1"
    bodies = [r.json() for r in (multipart, raw, octet)]
    ids = [b.pop("request_id") for b in bodies]
    assert ids == [r.headers["X-Request-Id"] for r in (multipart, raw, octet)]
    assert len(set(ids)) == 3  # one per request
    assert bodies[0] == bodies[1] == bodies[2]


# --- no stalls, bounded memory ----------------------------------------------------------------


def _one_bit_png(side: int = 6000) -> bytes:
    """A 36-megapixel 1-bit PNG of about 11 KB: tiny to send, a third of a second to decode."""
    buf = io.BytesIO()
    Image.new("1", (side, side), 1).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _until_in_progress(url: str, endpoint: str, n: int, timeout_s: float = 30.0) -> None:
    """Wait until the server counts `n` requests to `endpoint` in progress (BentoML's
    `request_in_progress` gauge at /metrics)."""
    import re
    import time

    pattern = re.compile(
        r'request_in_progress\{[^}]*endpoint="' + re.escape(endpoint) + r'"[^}]*\} (\d+(?:\.\d+)?)'
    )
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(url + "/metrics", timeout=10).text
        if sum(float(v) for v in pattern.findall(text)) >= n:
            return
        assert time.monotonic() < deadline, f"not {n} requests to {endpoint} in progress: " + (
            "\n".join(line for line in text.splitlines() if "in_progress" in line) or text[:500]
        )
        time.sleep(0.05)


@pytest.mark.e2e
def test_heavy_small_files_do_not_stall_other_clients(served, tmp_path):
    """On a one-worker server (so the ordinary client cannot dodge to an idle worker), two
    batches of twelve 36-megapixel 1-bit PNGs (11 KB each) decode while an ordinary client
    asks for one 32x32 image: it is answered within a second, not after the batches."""
    import time

    heavy = _one_bit_png()
    assert len(heavy) < 16 * 1024  # small enough to be judged by its header alone
    files = [("images", (f"{i}.png", heavy, "image/png")) for i in range(12)]
    good = _good_png()
    env = {"CIFAR_SERVE_WORKERS": "1", "CIFAR_ORT_THREADS": "1"}
    with (
        BentoServer(served.home, tmp_path / "one-worker.log", env) as url,
        concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool,
    ):
        batches = [
            pool.submit(requests.post, url + "/classify_batch", files=files, timeout=120)
            for _ in range(2)
        ]
        _until_in_progress(url, "/classify_batch", 2)  # both batches are being decoded now
        waits = []
        for _ in range(3):
            started = time.perf_counter()
            r = requests.post(
                url + "/classify", data=good, timeout=60, headers={"Content-Type": "image/png"}
            )
            waits.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
        assert not all(b.done() for b in batches), "the batches ended too soon to prove anything"
        for b in batches:
            assert b.result().status_code == 200
    assert max(waits) < 1.0, waits


@pytest.mark.e2e
def test_uploads_over_the_budget_get_503_with_retry_after(served):
    """Six clients each send 0.6 of a worker's upload budget and hold back the last bytes:
    each of the two workers can hold one body, the others are refused as soon as their bytes
    would pass the budget (503, Retry-After, JSON); once the held ones finish, the server takes
    uploads again. Clients that only *announce* big bodies hold nothing."""
    import select
    import socket
    import time

    size = int(0.6 * INFLIGHT_BUDGET)
    host, port = served.url.removeprefix("http://").split(":")
    announced = []
    for _ in range(4):  # idle connections announcing the largest allowed body
        c = socket.create_connection((host, int(port)), timeout=30)
        c.sendall(
            f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {UPLOAD_LIMIT}\r\n\r\n".encode()
        )
        announced.append(c)
    conns, answers = [], []
    try:
        assert served.classify_raw(_good_png()).status_code == 200  # announcing holds nothing
        for _ in range(6):
            c = socket.create_connection((host, int(port)), timeout=30)
            c.sendall(
                f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                f"Content-Length: {size}\r\n\r\n".encode()
                + b"\0" * (size - 10)
            )
            conns.append(c)
        # Wait for the refusals (an answer to read) rather than for a fixed time.
        deadline = time.monotonic() + 30
        answered = []
        while len(answered) < 4 and time.monotonic() < deadline:
            answered, _, _ = select.select(conns, [], [], 0.2)
        refused, held = [], []
        for c in conns:
            c.settimeout(0.5)
            try:
                head = c.recv(65536)
            except TimeoutError:
                held.append(c)  # still being read: held in the budget
                continue
            refused.append(head)
        # Two when the kernel gave both workers some of the six connections; one (and five
        # refusals) in the ~3 % of runs where it gave all six to one worker.
        assert len(held) in (1, 2) and len(refused) == 6 - len(held), [r[:60] for r in refused]
        for head in refused:
            assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), head
            assert b'"reason":"busy"' in head.replace(b" ", b""), head
        for c in held:  # the held ones finish sending: a 4xx (not an image), not a hang
            c.settimeout(30)
            c.sendall(b"\0" * 10)
            answers.append(c.recv(65536))
    finally:
        for c in conns + announced:
            c.close()
    assert all(a.startswith(b"HTTP/1.1 415") for a in answers), [a[:40] for a in answers]
    r = served.classify_raw(_good_png())
    assert r.status_code == 200, r.text


# --- the page at /, in a real browser ----------------------------------------------------------


@pytest.mark.e2e
def test_the_page_classifies_a_dropped_image_in_chromium(served, tmp_path):
    """Headless Chromium (Debian's chromium + chromedriver, driven by Selenium) opens /, picks a
    real CIFAR-10 test image in the file input, and the page shows its class (the endpoint's
    answer), the top-3 bars, the model version and a latency; a screenshot is saved."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        missing("chromium and chromedriver", "the page is driven in a real browser")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "test-image-7.png"
    image.write_bytes(
        _png(
            np.asarray(
                Image.fromarray(served.images[7].permute(1, 2, 0).numpy()).resize(
                    (128, 128), Image.Resampling.NEAREST
                )
            )
        )
    )
    expected = served.classify(image.read_bytes()).json()["label"]
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,800",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(served.url + "/")
        assert driver.title == "CIFAR-10 classifier"
        driver.find_element(By.ID, "files").send_keys(str(image))
        card = WebDriverWait(driver, 30).until(
            lambda d: d.find_element(
                By.CSS_SELECTOR,
                "#results .card[data-state='done'], #results .card[data-state='error']",
            )
        )
        assert card.get_attribute("data-state") == "done", card.text
        assert card.find_element(By.CSS_SELECTOR, ".label").text == expected
        assert len(card.find_elements(By.CSS_SELECTOR, ".bar")) == 3
        assert card.get_attribute("data-version") == "1"
        assert "model version 1" in card.text and " ms" in card.text
        WebDriverWait(driver, 10).until(
            lambda d: "version 1" in d.find_element(By.ID, "model").text
        )
        # Something that is no photo at all: the page says so.
        flat = tmp_path / "flat-red.png"
        flat.write_bytes(_png(np.full((64, 64, 3), (210, 40, 40), np.uint8)))
        driver.find_element(By.ID, "files").send_keys(str(flat))
        odd = WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#results .card[data-ood='true']")
        )
        assert "this does not look like a CIFAR-10 image" in odd.text
        assert "flat-red.png" in odd.text and "request " in odd.text
        shot = Path(os.environ.get("CIFAR_SCREENSHOTS") or tmp_path)
        shot.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot / "page-classified.png"))
        # The API docs: Swagger UI renders this service's own OpenAPI document.
        driver.get(served.url + "/docs")
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) >= 3
        )
        paths = {
            e.text.strip().replace("\u200b", "")
            for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        }
        assert {"/classify", "/classify_batch", "/feedback", "/model"} <= paths, paths
        assert driver.save_screenshot(str(shot / "docs.png"))
        print(f"screenshots in {shot}")
    finally:
        driver.quit()


@pytest.mark.e2e
def test_docs_page_and_openapi(served):
    page = requests.get(served.url + "/docs", timeout=10)
    assert page.status_code == 200 and "swagger-ui" in page.text
    spec = requests.get(served.url + "/docs.json", timeout=10).json()
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(
        spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    )


# --- a new champion swapped in while clients keep asking -----------------------------------


@pytest.mark.e2e
def test_a_new_champion_and_a_rollback_are_swapped_in_under_load_without_a_failed_request(
    served, tmp_path, monkeypatch
):
    """A server of its own (a copy of the store, following it every second) answers four
    clients without pause while the registry's champion alias moves to a new version and
    `cifar-import-champion` puts it in the store, then while `cifar-rollback` moves it back
    (importing it, as on one machine), then while a rollback that imports nothing (as on a
    team's control host) is followed by `cifar-import-champion --follow`: no request fails,
    every answer names its version in the header and the body, and each client (one keep-alive
    connection, so one worker) sees version 1, 2, 1, then 2 again."""
    import threading
    import time

    from mlflow import MlflowClient

    home = tmp_path / "bentoml"
    shutil.copytree(served.home, home)
    db = tmp_path / "mlflow.db"
    shutil.copyfile(served.root / "mlflow.db", db)  # artifacts stay where they are (read only)
    uri = f"sqlite:///{db}"
    png = _png(served.images[0].permute(1, 2, 0).numpy())
    stop, seen, failures = threading.Event(), [[] for _ in range(4)], []

    def client(i: int) -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(
                        url + "/classify",
                        data=png,
                        timeout=30,
                        headers={"Content-Type": "image/png"},
                    )
                    if (
                        r.status_code != 200
                        or r.headers["X-Model-Version"] != r.json()["model"]["version"]
                    ):
                        failures.append((r.status_code, r.text[:200]))
                    seen[i].append(r.headers.get("X-Model-Version"))
                except Exception as exc:  # noqa: BLE001 - counted
                    failures.append(repr(exc))

    def until(answered, what: str) -> None:
        deadline = time.monotonic() + 60
        while not all(answered(versions) for versions in seen):
            assert time.monotonic() < deadline, f"the clients never {what}: {seen}"
            time.sleep(0.1)

    env = {"CIFAR_MODEL_POLL_SECONDS": "1", "CIFAR_ACCESS_LOG": "false"}
    with BentoServer(home, tmp_path / "serve.log", env) as url:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            until(lambda versions: versions.count("1") >= 5, "had answers from version 1")
            client_ = MlflowClient(uri, uri)
            old = client_.get_model_version_by_alias("cifar10-classifier", "champion")
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the registry resolves models:/ URIs
            new = client_.create_model_version(
                "cifar10-classifier",
                old.source,
                run_id=old.run_id,
                tags=old.tags,
                description=old.description,
                model_id=old.model_id,
            )
            client_.set_registered_model_alias("cifar10-classifier", "champion", new.version)
            imported = subprocess.run(
                [sys.executable, "-m", "registry.import_champion", "--tracking-uri", uri],
                cwd=ROOT,
                env={**os.environ, "BENTOML_HOME": str(home)},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert imported.returncode == 0, imported.stderr
            # Each client sees the switch, then keeps being answered by version 2.
            until(lambda versions: versions.count("2") >= 5, "had answers from version 2")
            # Rolled back with the command a user runs: the registry moves back to version 1,
            # the command imports it here, and every client is answered by it again.
            rolled = subprocess.run(
                [sys.executable, "-m", "flows.rollback", "--tracking-uri", uri, "--reason",
                 "test: back to v1", "--who", "tester", "--to", "1"],  # (v2: a copy of v1)
                cwd=ROOT,
                env={**os.environ, "BENTOML_HOME": str(home), "PREFECT_API_URL": ""},
                capture_output=True,
                text=True,
                timeout=120,
            )  # fmt: skip
            assert rolled.returncode == 0, rolled.stderr
            assert "champion v2 -> v1" in rolled.stdout, rolled.stdout
            until(lambda versions: versions[-5:] == ["1"] * 5, "went back to version 1")
            # As on a team: the rollback runs where nothing is served (it imports nothing) and
            # the serving host's `cifar-import-champion --follow` brings the new champion.
            follower = subprocess.Popen(
                [sys.executable, "-m", "registry.serving_host", "--tracking-uri", uri,
                 "--follow", "1"], cwd=ROOT, env={**os.environ, "BENTOML_HOME": str(home)},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            try:
                rolled = subprocess.run(
                    [sys.executable, "-m", "flows.rollback", "--tracking-uri", uri, "--reason",
                     "test: the follower brings it", "--who", "team", "--to", "2"], cwd=ROOT,
                    env={**os.environ, "PREFECT_API_URL": "", "CIFAR_IMPORT_CHAMPION": "false",
                         "BENTOML_HOME": str(tmp_path / "not-a-serving-host")},
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                assert rolled.returncode == 0 and "BentoML store" not in rolled.stdout, rolled
                until(lambda versions: versions[-5:] == ["2"] * 5, "followed to version 2")
            finally:
                follower.terminate()
                follower.communicate(timeout=60)
        finally:  # a failed step above must not leave the clients asking for ever
            stop.set()
            for t in threads:
                t.join(timeout=60)
        card = requests.get(url + "/model", timeout=10).json()
    assert failures == [], failures[:5]
    for versions in seen:  # 1 ... 2 ... 1 ... 2: each switch once, no flapping
        runs = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
        assert runs == ["1", "2", "1", "2"], runs
    assert card["mlflow_version"] == "2"
    client_ = MlflowClient(uri, uri)
    assert client_.get_model_version("cifar10-classifier", "2").tags["rollback.from.by"] == "tester"
    back = client_.get_model_version("cifar10-classifier", "1").tags
    assert back["rollback.from.reason"] == "test: the follower brings it"
    assert sum(len(v) for v in seen) > 100  # the clients really kept asking


# --- int8 ---------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_int8_is_served_when_asked_and_agrees_with_fp32(served, tmp_path):
    """CIFAR_PRECISION=int8: the answers come from the imported int8 twin (precision int8) and
    name the same class as the fp32 model on nearly every test image."""
    pngs = [_png(img.permute(1, 2, 0).numpy()) for img in served.images[:200]]
    fp32 = [served.classify_raw(p).json() for p in pngs]
    assert {a["model"]["precision"] for a in fp32} == {"fp32"}
    with BentoServer(served.home, tmp_path / "int8.log", {"CIFAR_PRECISION": "int8"}) as url:
        with requests.Session() as s:
            int8 = [
                s.post(
                    url + "/classify", data=p, headers={"Content-Type": "image/png"}, timeout=30
                ).json()
                for p in pngs
            ]
        card = requests.get(url + "/model", timeout=10).json()
    from tests.conftest import bento_model_store as model_store

    meta = model_store(served.home).get("cifar10-classifier:latest").info.metadata
    if not meta["int8_servable"]:  # this run's twin lost more than 0.5 points: fp32, said so
        assert {a["model"]["precision"] for a in int8} == {"fp32"}
        assert "points behind" in card["precision_note"]
        return
    assert {a["model"]["precision"] for a in int8} == {"int8"}
    assert card["precision"] == "int8" and card["precision_note"] is None
    agree = np.mean([a["class_id"] == b["class_id"] for a, b in zip(fp32, int8)])
    assert agree >= 0.95, agree


def test_int8_further_than_half_a_point_is_not_served():
    from serving.live import choose_file

    meta = {"onnx_file": "model.onnx", "val_accuracy": 0.90}
    assert choose_file(meta, "fp32") == ("model.onnx", "fp32", None)
    file, precision, note = choose_file(meta, "int8")
    assert (file, precision) == ("model.onnx", "fp32") and "no int8 twin" in note
    meta.update(int8_file="model_int8.onnx", int8_val_accuracy=0.893, int8_servable=False)
    file, precision, note = choose_file(meta, "int8")
    assert (file, precision) == ("model.onnx", "fp32") and "0.70 points behind" in note
    meta.update(int8_val_accuracy=0.897, int8_servable=True)
    assert choose_file(meta, "int8") == ("model_int8.onnx", "int8", None)
    # Judged on a CPU with int8 dot products (VNNI): not served where there are none.
    meta.update(int8_judged_with_dot_product=True)
    assert choose_file(meta, "int8", dot_product=True) == ("model_int8.onnx", "int8", None)
    for here in (False, None):  # none here, or this CPU cannot tell
        file, precision, note = choose_file(meta, "int8", dot_product=here)
        assert (file, precision) == ("model.onnx", "fp32") and "dot-product" in note
    meta.update(int8_judged_with_dot_product=False)  # judged without: fine with or without
    for here in (True, False, None):
        assert choose_file(meta, "int8", dot_product=here) == ("model_int8.onnx", "int8", None)


# --- the prediction log and feedback, through the real server ----------------------------------


@pytest.mark.e2e
def test_feedback_over_the_records_gives_the_served_versions_offline_accuracy(served):
    """200 CIFAR-10 test images sent to the server (two workers), singly and in batches, then
    their true labels posted as feedback from 8 clients at once, so labels land on both workers
    whatever worker answered: joined over the prediction log, the accuracy is exactly what the
    served ONNX file gives on those images offline."""
    from serving.engine import Engine
    from serving.logfiles import read_records
    from serving.preprocess import to_model_input

    n = 200
    pixels = served.images[:n].permute(0, 2, 3, 1).numpy()
    labels = [CLASS_NAMES[int(y)] for y in served.labels[:n]]
    pngs = [_png(p) for p in pixels]
    ids = [served.classify(p).json()["request_id"] for p in pngs[:100]]
    for start in range(100, n, 25):
        files = [("images", (f"{i}.png", pngs[i], "image/png")) for i in range(start, start + 25)]
        ids += [
            r["request_id"] for r in served.post("/classify_batch", files=files).json()["results"]
        ]

    def give(i: int) -> int:
        body = {"request_id": ids[i], "label": labels[i]}
        return requests.post(served.url + "/feedback", json=body, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(give, range(n))) == {200}
    assert give(0) == 409

    folder = served.home / "prediction-log"
    answered: dict[str, str] = {}
    truth: dict[str, str] = {}
    deadline = time.monotonic() + 10  # the workers write their queues every 0.5 s
    while len(truth) < n and time.monotonic() < deadline:
        time.sleep(0.5)
        records = list(read_records(folder))
        answered = {r["request_id"]: r["label"] for r in records if r["kind"] == "prediction"}
        truth = {r["request_id"]: r["label"] for r in records if r["kind"] == "feedback"}
    assert set(truth) == set(ids) and set(ids) <= set(answered)
    live = np.mean([answered[i] == truth[i] for i in ids])
    card = requests.get(served.url + "/model", timeout=30).json()
    stored = bento_model_store(served.home).get(card["bento_tag"])
    engine = Engine(Path(stored.path_of("model.onnx")), dict(stored.info.metadata), threads=1)
    offline = np.mean(
        [
            CLASS_NAMES[c] == y
            for c, y in zip(engine.logits(to_model_input(pixels)).argmax(1), labels)
        ]
    )
    assert live == offline, (live, offline)
    writers = {
        p.name.split("-")[-2]
        for p in folder.glob("predictions-*")
        if any(i in p.read_text() for i in ids[:100])
    }
    assert len(writers) == 2, writers  # both workers answered (and recorded) these requests


@pytest.mark.e2e
def test_feedback_survives_a_restart_of_the_service(served, tmp_path):
    env = {"CIFAR_PREDICTION_LOG_DIR": str(tmp_path / "log"), "CIFAR_SERVE_WORKERS": "2"}
    png = _png(served.images[0].permute(1, 2, 0).numpy())
    with BentoServer(served.home, tmp_path / "first.log", env) as url:
        first, second = (
            requests.post(
                url + "/classify", files={"image": ("a.png", png, "image/png")}, timeout=60
            ).json()["request_id"]
            for _ in range(2)
        )
        r = requests.post(url + "/feedback", json={"request_id": first, "label": "cat"}, timeout=60)
        assert r.status_code == 200, r.text
    assert not list((tmp_path / "log").glob("*.part")), "a stopped service closes its file"
    with BentoServer(served.home, tmp_path / "second.log", env) as url:
        again = requests.post(
            url + "/feedback", json={"request_id": first, "label": "dog"}, timeout=60
        )
        assert again.status_code == 409 and again.json()["label"] == "cat"
        later = requests.post(
            url + "/feedback", json={"request_id": second, "label": "dog"}, timeout=60
        )
        assert later.status_code == 200, later.text


@pytest.mark.e2e
def test_answers_say_whether_an_image_looks_like_cifar10(served):
    """The version's out-of-distribution threshold came with it from the registry (fitted at
    registration, keeping 95 % of its validation images in): CIFAR-10 test images are mostly in,
    solid colours, noise and a page of text are out; the score is in the answer, the prediction
    log and GET /model."""
    from PIL import ImageDraw

    card = requests.get(served.url + "/model", timeout=30).json()
    assert card["ood_threshold"] is not None and card["ood_note"] is None
    assert f"{card['ood_threshold']:.3f}" in card["model_card_markdown"]
    cifar = [_png(img.permute(1, 2, 0).numpy()) for img in served.images[:100]]
    files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(cifar)]
    answers = served.post("/classify_batch", files=files).json()["results"]
    kept = np.mean([a["in_distribution"] for a in answers])
    assert kept >= 0.85, kept  # 95 % of the validation images; the test set is alike
    rng = np.random.default_rng(0)
    text = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(text).text((4, 30), "not a photo", fill="black")
    buf = io.BytesIO()
    text.save(buf, format="PNG")
    strange = [
        _png(np.full((32, 32, 3), (200, 30, 30), np.uint8)),
        _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
        buf.getvalue(),
    ]
    for png in strange:
        body = served.classify(png).json()
        assert body["in_distribution"] is False, body
        assert body["ood_score"] > card["ood_threshold"]
    assert all(a["ood_score"] <= card["ood_threshold"] for a in answers if a["in_distribution"])
