"""The BentoML service: `curl -F image=@cat.png http://127.0.0.1:3000/classify`.

    bentoml serve serving.service:CifarClassifier      (or `make serve`)

Serves the newest `cifar10-classifier` in the BentoML model store (`$CIFAR_BENTO_MODEL` names
another tag), imported from the MLflow champion by `python -m serving.champion`. Imports numpy,
Pillow, onnxruntime and BentoML only: no torch, no Prefect, no MLflow.

Endpoints: POST /classify (multipart field `image`), POST /classify_batch (fields `images`, up to
`CIFAR_MAX_BATCH_IMAGES`), /readyz (200 once the model is loaded and warmed up), /metrics
(Prometheus: BentoML's request figures plus `cifar_inference_batch_size`,
`cifar_inference_seconds` and `cifar_rejected_uploads_total{reason}`), /docs.json (OpenAPI).

Bad input is answered with a 4xx and a JSON body `{"error": "...", "reason": "..."}`; see
`serving.preprocess` for the image rules and `serving.limits` for the request size limit.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving import bentoml_fixes
from serving.engine import Engine, MicroBatcher
from serving.limits import BodySizeLimit, max_upload_bytes
from serving.preprocess import DEFAULT_MAX_PIXELS, ImageRejected, decode_image, to_model_input



def _env_number(name: str, default: float, minimum: float, kind: type = int) -> Any:
    """A numeric setting from the environment; a bad value stops the service naming it."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {'whole number' if kind is int else 'number'}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


MODEL_TAG = os.environ.get("CIFAR_BENTO_MODEL", "cifar10-classifier:latest")
MAX_BATCH_IMAGES = _env_number("CIFAR_MAX_BATCH_IMAGES", 256, 1)
MAX_PIXELS = _env_number("CIFAR_MAX_PIXELS", DEFAULT_MAX_PIXELS, 1)
# Adaptive batching, tuned on the 2-core CPU box (benchmarks/serve_bench.py): batches of up to 64
# images, formed from whatever queued while the previous batch ran, no added wait.
BATCH_MAX_SIZE = _env_number("CIFAR_BATCH_MAX_SIZE", 64, 1)
BATCH_MAX_WAIT_MS = _env_number("CIFAR_BATCH_MAX_WAIT_MS", 0, 0, float)
# Worker processes, each with its own model and batcher. BentoML's per-request work (HTTP, form
# parsing, middleware) is Python on one event loop per worker, so two workers with one
# onnxruntime thread each serve ~1.5x more than one worker with two (benchmarks/serve_bench.py).
WORKERS = _env_number("CIFAR_SERVE_WORKERS", 2, 1)
ORT_THREADS = _env_number("CIFAR_ORT_THREADS", max(1, (os.cpu_count() or 1) // WORKERS), 1)
INLINE_DECODE_BYTES = 64 * 1024  # smaller uploads are decoded on the event loop, larger on a thread


class ClassProbability(BaseModel):
    label: str = Field(examples=["cat"])
    class_id: int = Field(ge=0, examples=[3])
    probability: float = Field(ge=0, le=1, examples=[0.87])


class ModelInfo(BaseModel):
    bento_tag: str = Field(examples=["cifar10-classifier:7c3kqvx2hkqmamvb"])
    registered_model: str | None = Field(examples=["cifar10-classifier"])
    version: str | None = Field(description="MLflow registry version", examples=["3"])
    run_id: str | None = Field(description="MLflow run that trained it")
    val_accuracy: float | None = Field(
        description="validation accuracy of this very ONNX model (onnxruntime), the figure "
        "that made it champion", examples=[0.9103])
    served_tta: str | None = Field(None, description="test-time augmentation inside the model's "
                                   "graph (none, flip, flip_translate)", examples=["none"])
    model_card: str = Field("/model", description="where its model card is served")


class ImageInfo(BaseModel):
    format: str = Field(examples=["PNG"])
    width: int = Field(examples=[32])
    height: int = Field(examples=[32])
    mode: str = Field(description="Pillow mode of the upload before conversion to RGB",
                      examples=["RGB"])
    frames: int = Field(description="frames in the file; the first one is classified",
                        examples=[1])


class Classification(BaseModel):
    label: str = Field(examples=["cat"])
    class_id: int = Field(examples=[3])
    confidence: float = Field(description="probability of `label`", examples=[0.87])
    top_k: list[ClassProbability]
    image: ImageInfo
    model: ModelInfo


class BatchClassification(BaseModel):
    results: list[Classification] = Field(description="one per uploaded image, in upload order")
    model: ModelInfo


# Any declared content type is accepted (curl says application/octet-stream for a file without a
# known extension): the bytes decide what the file is.
ImageUpload = Path


bentoml_fixes.apply()  # multipart parsing: 400 instead of 500, no URL fetching


def _error(exc: ImageRejected, prefix: str = "") -> JSONResponse:
    return JSONResponse({"error": prefix + str(exc), "reason": exc.reason}, status_code=exc.status)


_SERVED: dict[str, Any] = {}  # the BentoML model this worker loaded (set in __init__)


async def _model_card(request: Any) -> JSONResponse:
    """GET /model: what is served, and its model card (markdown) from the registry."""
    stored = _SERVED.get("model")
    if stored is None:
        return JSONResponse({"error": "the model is not loaded yet", "reason": "not_ready"},
                            status_code=503)
    meta = dict(stored.info.metadata)
    card = Path(stored.path_of("model_card.md"))
    keys = ("registered_model", "mlflow_version", "mlflow_run_id", "val_accuracy",
            "test_accuracy", "served_tta", "preset", "promotion_reason", "class_names")
    return JSONResponse({"bento_tag": str(stored.tag), **{k: meta.get(k) for k in keys},
                         "model_card_markdown": card.read_text() if card.is_file() else None})


# Mounted at the root: BentoML's PassiveMount matches only the routes this app has (/model).
model_app = Starlette(routes=[Route("/model", _model_card, methods=["GET"])])


@bentoml.asgi_app(model_app, path="/")
@bentoml.service(
    name="cifar10-classifier",
    workers=WORKERS,
    traffic={"timeout": 30, "max_concurrency": 512},  # past 512 in flight: 503, not a pile-up
    # Per-request access log lines cost ~3 % of throughput here: off unless CIFAR_ACCESS_LOG=true
    # (/metrics counts requests by endpoint and status either way; errors are always logged).
    logging={"access": {"enabled": os.environ.get("CIFAR_ACCESS_LOG", "false") == "true"}},
)
class CifarClassifier:
    """CIFAR-10 classifier: an image in, its class and class probabilities out."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import prometheus_client  # after BentoML has set up multiprocess metrics

        ref = type(self).bento_model
        stored = ref.stored
        if stored is None:
            raise RuntimeError(
                f"no model {MODEL_TAG} in the BentoML store "
                f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): import the MLflow champion "
                "first with `make import-champion` (python -m serving.champion)")
        meta = dict(stored.info.metadata)
        _SERVED["model"] = stored
        self.engine = Engine(Path(stored.path_of(meta.get("onnx_file", "model.onnx"))), meta,
                             threads=ORT_THREADS)
        self.engine.warm_up()
        self.model_info = ModelInfo(
            bento_tag=str(stored.tag), registered_model=meta.get("registered_model"),
            version=meta.get("mlflow_version"), run_id=meta.get("mlflow_run_id"),
            val_accuracy=meta.get("val_accuracy"), served_tta=meta.get("served_tta"))
        self.batch_sizes = prometheus_client.Histogram(
            "cifar_inference_batch_size", "Images per onnxruntime call (adaptive batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.infer_seconds = prometheus_client.Histogram(
            "cifar_inference_seconds", "Seconds per onnxruntime call",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.rejected = prometheus_client.Counter(
            "cifar_rejected_uploads", "Uploads refused, by reason", ["reason"])
        self.batcher = MicroBatcher(self.engine.probabilities, max_batch_size=BATCH_MAX_SIZE,
                                    max_wait_ms=BATCH_MAX_WAIT_MS, on_batch=self._observe)
        self.ready = True

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    def _observe(self, size: int, seconds: float) -> None:
        self.batch_sizes.observe(size)
        self.infer_seconds.observe(seconds)

    async def _decode(self, path: Path) -> Any:
        data = path.read_bytes()
        if len(data) <= INLINE_DECODE_BYTES:
            return decode_image(data, MAX_PIXELS)
        return await asyncio.to_thread(decode_image, data, MAX_PIXELS)

    def _result(self, probs: np.ndarray, decoded: Any, top_k: int) -> Classification:
        return Classification(**self.engine.answer(probs, top_k), model=self.model_info,
                              image=ImageInfo(format=decoded.format, width=decoded.width,
                                              height=decoded.height, mode=decoded.mode,
                                              frames=decoded.frames))

    @bentoml.api(route="/classify")
    async def classify(
        self,
        image: ImageUpload = Field(description="the image file: PNG, JPEG, WebP, BMP or GIF, "
                                   "any size (the central square is resized to 32x32)"),
        top_k: int = Field(default=3, ge=1, le=10, description="how many classes to list"),
    ) -> Classification:
        """Classify one image: `curl -F image=@cat.png http://127.0.0.1:3000/classify`."""
        try:
            decoded = await self._decode(image)
        except ImageRejected as exc:
            self.rejected.labels(exc.reason).inc()
            return _error(exc)  # type: ignore[return-value]
        probs = await self.batcher.submit(to_model_input(decoded.pixels))
        return self._result(probs[0], decoded, top_k)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(
        self,
        images: list[ImageUpload] = Field(description="several image files (repeat the field: "
                                          "-F images=@a.png -F images=@b.png)"),
        top_k: int = Field(default=3, ge=1, le=10, description="how many classes to list"),
    ) -> BatchClassification:
        """Classify several images in one request; one bad image fails the request, naming it."""
        if not images:
            return JSONResponse({"error": "no images: send one or more `images` fields",
                                 "reason": "no_images"}, status_code=400)  # type: ignore[return-value]
        if len(images) > MAX_BATCH_IMAGES:
            return JSONResponse({"error": f"{len(images)} images in one request, over the limit of "
                                 f"{MAX_BATCH_IMAGES}", "reason": "too_many_images"},
                                status_code=413)  # type: ignore[return-value]
        decoded = []
        for i, path in enumerate(images):
            try:
                decoded.append(await self._decode(path))
            except ImageRejected as exc:
                self.rejected.labels(exc.reason).inc()
                return _error(exc, f"image {i} (of {len(images)}, counted from 0): ")  # type: ignore[return-value]
        probs = await self.batcher.submit(to_model_input(np.stack([d.pixels for d in decoded])))
        return BatchClassification(results=[self._result(p, d, top_k) for p, d in zip(probs, decoded)],
                                   model=self.model_info)


CifarClassifier.add_asgi_middleware(BodySizeLimit, max_bytes=max_upload_bytes())
