"""The BentoML service, through a real `bentoml serve` on 127.0.0.1.

One module fixture trains a small model (real CIFAR-10 when present, else the synthetic files),
logs and registers it in a throw-away MLflow store exactly as the flow does, imports the champion
with the `cifar-import-champion` command into a throw-away BentoML store, and starts the server
in its own process group; requests are real multipart uploads.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
import subprocess
import sys
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
from serving.local import LocalServer

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 2 * 1024 * 1024  # the server under test runs with a 2 MiB body limit


def _png(pixels_hwc: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels_hwc).save(buf, format="PNG", **save)
    return buf.getvalue()


class Served:
    def __init__(self, url, model, images, labels, home):
        self.url, self.model, self.images, self.home = url, model, images, home
        self.labels = labels

    def post(self, path="/classify", files=None, data=None, **kw):
        return requests.post(self.url + path, files=files, data=data, timeout=60, **kw)

    def classify(self, content: bytes, name="img.png", mime="image/png", **fields):
        return self.post(files={"image": (name, content, mime)}, data=fields)

    def torch_probs(self, images_nchw: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits = self.model(normalize(images_nchw, torch.device("cpu")))
        return torch.softmax(logits.double(), dim=1).numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_cifar, prefect_api):
    root = tmp_path_factory.mktemp("serving")
    real = Path(os.environ.get("CIFAR10_SOURCE") or ROOT.parent / "shared/cifar10/cifar-10-batches-py")
    if (real / "test_batch").is_file():
        data = {"source": str(real), "train_size": 5000, "val_size": 1000}
    else:  # no real data here: the synthetic files, same format
        folder, sums = synthetic_cifar
        data = {"source": str(folder), "checksums": sums, "train_size": 240, "val_size": 60}
    config = preset("seed-baseline", data=data, train={"epochs": 2, "device": "cpu", "tta": "none"})
    outcome = run_experiment(config, root)  # trains, exports and evaluates the ONNX file
    model = outcome.trained.model.eval().float()
    onnx_path = outcome.exported.path

    # Log and register as train-cifar does (flows.tracking), into this test's own store.
    from cifarlab.constants import MEAN, STD
    from flows import champion, tracking

    store = tracking.open_store(root)
    run_id = tracking.start_run(store, "serving-test", {"preset": config.preset}, {})
    example = normalize(outcome.data.data.test_images[:2], torch.device("cpu")).numpy()
    logged = tracking.log_onnx_model(store, run_id, onnx_path, example, metadata={
        "class_names": list(outcome.data.data.class_names), "mean": list(MEAN), "std": list(STD),
        "val_accuracy": outcome.val.accuracy, "test_accuracy": outcome.test.accuracy})
    tracking.log_metrics(store, run_id, {"final_val_accuracy": outcome.val.accuracy})
    champion.register(store, run_id, logged.model_uri, onnx_path, outcome.data.data,
                      tags={"val_accuracy": f"{outcome.val.accuracy:.6f}", "served_tta": "none"},
                      model_id=logged.model_id)
    tracking.end_run(store, run_id, "FINISHED")

    home = root / "bentoml"
    env = {"CIFAR_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT), "CIFAR_ACCESS_LOG": "false"}
    import_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    imported = subprocess.run([sys.executable, "-m", "serving.champion", "--root", str(root)],
                              cwd=ROOT, env={**import_env, "BENTOML_HOME": str(home)},
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr

    d = outcome.data.data
    with LocalServer(home, root / "serve.log", env) as url:
        yield Served(url, model, d.test_images, d.test_labels, home)


def test_classify_answers_class_probabilities_and_model_version(served):
    r = served.classify(_png(served.images[0].permute(1, 2, 0).numpy()), top_k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = served.torch_probs(served.images[:1])[0]
    assert body["class_id"] == int(probs.argmax()) and body["label"] == CLASS_NAMES[body["class_id"]]
    assert body["confidence"] == pytest.approx(probs.max(), abs=1e-5)
    assert [c["class_id"] for c in body["top_k"]] == list(np.argsort(-probs)[:5])
    assert body["model"]["registered_model"] == "cifar10-classifier" and body["model"]["version"] == "1"
    assert body["model"]["run_id"] and body["model"]["bento_tag"].startswith("cifar10-classifier:")
    assert body["image"] == {"format": "PNG", "width": 32, "height": 32, "mode": "RGB", "frames": 1}


def test_curl_upload_as_in_the_readme(served, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    png = tmp_path / "cat.png"
    png.write_bytes(_png(served.images[3].permute(1, 2, 0).numpy()))
    out = subprocess.run(["curl", "-s", "-F", f"image=@{png}", served.url + "/classify"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout)["class_id"] == int(served.torch_probs(served.images[3:4]).argmax())


def test_endpoint_classes_equal_pytorch_on_300_test_images(served):
    n = 300
    expected = served.torch_probs(served.images[:n])
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4  # a near-tie may flip between runtimes: exempt
    pngs = [_png(img.permute(1, 2, 0).numpy()) for img in served.images[:n]]
    single = [served.classify(p).json()["class_id"] for p in pngs[:150]]
    batch = served.post("/classify_batch", files=[("images", (f"{i}.png", p, "image/png"))
                                                  for i, p in enumerate(pngs[150:])])
    assert batch.status_code == 200, batch.text
    got = np.array(single + [res["class_id"] for res in batch.json()["results"]])
    want = expected.argmax(axis=1)
    assert clear.sum() >= n - 3
    assert (got[clear] == want[clear]).all(), np.flatnonzero((got != want) & clear)


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
    sizes = [line for line in metrics.splitlines()
             if line.startswith("cifar_inference_batch_size_count")]
    assert sizes, "batch-size histogram missing from /metrics"
    # Adaptive batching merged concurrent requests: fewer onnxruntime calls than images.
    calls = sum(float(line.split()[-1]) for line in sizes)
    images = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("cifar_inference_batch_size_sum"))
    assert images > calls
    # BentoML's request figures by endpoint and status.
    assert any(line.startswith("bentoml_service_request_total") and 'endpoint="/classify"' in line
               and 'http_response_code="200"' in line and float(line.split()[-1]) >= n
               for line in metrics.splitlines())


# --- bad input: 4xx with a JSON message, and the server keeps serving ------------------------

def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height 8-bit RGB pixels (30 GB decoded), no data."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def _good_png() -> bytes:
    return _png(np.full((32, 32, 3), 120, np.uint8))


BAD_INPUTS = [
    # (case, files, form fields, status, text the JSON message must contain)
    ("not an image", {"image": ("notes.txt", b"hello, world", "text/plain")}, {}, 415,
     "not an image"),
    ("truncated PNG", {"image": ("cut.png", _good_png()[:60], "image/png")}, {}, 400,
     "truncated or corrupt"),
    ("empty file", {"image": ("empty.png", b"", "image/png")}, {}, 400, "empty"),
    ("missing field", None, {"top_k": "3"}, 400, "Field required"),
    ("misnamed field", {"file": ("cat.png", _good_png(), "image/png")}, {}, 400, "Field required"),
    ("text instead of a file", None, {"image": "http://127.0.0.1:9/cat.png"}, 400,
     "expected a file upload"),
    ("TIFF", {"image": ("a.tiff", b"II*\x00" + b"\x00" * 200, "image/tiff")}, {}, 415, ""),
    ("decompression bomb", {"image": ("bomb.png", _bomb_png(), "image/png")}, {}, 413,
     "megapixels"),
    ("body over the limit", {"image": ("big.png", b"\x89PNG" + b"\0" * (UPLOAD_LIMIT + 10),
                                       "image/png")}, {}, 413, "over the limit"),
    ("top_k out of range", {"image": ("a.png", _good_png(), "image/png")}, {"top_k": "11"}, 400,
     "less than or equal to 10"),
]


@pytest.mark.parametrize("case,files,fields,status,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_4xx_json(served, case, files, fields, status, text):
    if files is None and fields:  # a plain form without files: still multipart, as curl -F sends
        files = {k: (None, v) for k, v in fields.items()}
        fields = None
    r = served.post(files=files, data=fields)
    assert r.status_code == status, r.text
    body = r.json()
    message = body["error"] + json.dumps(body.get("detail", ""))
    assert text in message


def test_batch_names_the_bad_image(served):
    files = [("images", ("a.png", _good_png(), "image/png")),
             ("images", ("b.txt", b"not an image", "text/plain"))]
    r = served.post("/classify_batch", files=files)
    assert r.status_code == 415 and r.json()["error"].startswith("image 1 ")


def test_batch_over_the_image_limit_is_413(served):
    png = _good_png()
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(257)]
    r = served.post("/classify_batch", files=files)
    assert r.status_code == 413 and "257 images" in r.json()["error"]


def test_rejections_are_counted_in_metrics(served):
    served.classify(b"definitely not an image", name="x.txt", mime="text/plain")
    metrics = requests.get(served.url + "/metrics", timeout=10).text
    assert any(line.startswith('cifar_rejected_uploads_total{reason="not_an_image"}')
               and float(line.split()[-1]) >= 1 for line in metrics.splitlines())


def test_server_still_healthy_after_bad_input(served):
    for _, files, fields, _, _ in BAD_INPUTS:
        served.post(files=files or {k: (None, v) for k, v in fields.items()}, data=None)
    assert requests.get(served.url + "/readyz", timeout=10).status_code == 200
    r = served.classify(_good_png())
    assert r.status_code == 200 and r.json()["label"]


def test_real_world_images(served):
    """A large JPEG, an animated GIF, a 16-bit PNG, a palette PNG with transparency, CMYK JPEG."""
    rng = np.random.default_rng(0)
    # A smooth 1600x1200 "photo": noise at 40x30, scaled up (compresses like a real photo).
    photo = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.Resampling.BICUBIC)
    cases = []
    buf = io.BytesIO(); photo.save(buf, "JPEG", quality=85); cases.append(("JPEG", buf.getvalue(), 1))
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO(); frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    cases.append(("GIF", buf.getvalue(), 3))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(buf, "PNG")
    cases.append(("PNG", buf.getvalue(), 1))
    pal = Image.new("P", (32, 32)); pal.info["transparency"] = 0
    buf = io.BytesIO(); pal.save(buf, "PNG", transparency=0); cases.append(("PNG", buf.getvalue(), 1))
    buf = io.BytesIO(); photo.convert("CMYK").save(buf, "JPEG"); cases.append(("JPEG", buf.getvalue(), 1))
    buf = io.BytesIO(); photo.resize((300, 200)).save(buf, "WEBP"); cases.append(("WEBP", buf.getvalue(), 1))
    buf = io.BytesIO(); photo.resize((50, 30)).convert("1").save(buf, "BMP"); cases.append(("BMP", buf.getvalue(), 1))
    for fmt, content, frames_n in cases:
        r = served.classify(content, name="upload", mime="application/octet-stream")
        assert r.status_code == 200, (fmt, r.text)
        assert r.json()["image"]["format"] == fmt and r.json()["image"]["frames"] == frames_n


def test_openapi_documents_the_endpoints(served):
    spec = requests.get(served.url + "/docs.json", timeout=10).json()
    for path in ("/classify", "/classify_batch"):
        assert "post" in spec["paths"][path]
    text = json.dumps(spec)
    assert "curl -F image=@cat.png" in text and '"cat"' in text  # description and examples


def test_model_card_is_served_and_answers_point_at_it(served):
    import requests

    r = requests.get(served.url + "/model", timeout=30, allow_redirects=False)
    assert r.status_code == 200, (r.status_code, r.headers)
    body = r.json()
    assert body["mlflow_version"] == "1" and body["served_tta"] == "none"
    card = body["model_card_markdown"]
    assert "Intended use and limits" in card and "out of domain" in card
    answer = served.classify(_png(served.images[0].permute(1, 2, 0).numpy())).json()["model"]
    assert answer["model_card"] == "/model" and answer["served_tta"] == "none"
    assert answer["val_accuracy"] == pytest.approx(body["val_accuracy"])
