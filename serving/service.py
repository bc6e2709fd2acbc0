"""The BentoML service: `curl -F image=@cat.png http://127.0.0.1:3000/classify`.

    bentoml serve serving.service:CifarClassifier      (or `make serve`; 127.0.0.1:3000 unless
                                                        --host/--port say otherwise)

Serves the newest `cifar10-classifier` in the BentoML model store (`$CIFAR_BENTO_MODEL` pins
another tag), imported from the MLflow champion by `cifar-import-champion` (registry/import_champion.py),
and swaps in a newer one when the store gets it (serving/live.py). Imports numpy, Pillow,
onnxruntime and BentoML only: no torch, no Prefect, no MLflow.

The routes (serving/http.py): POST /classify (multipart field `image`, or the raw image as the
body), POST /classify_batch (fields `images`, up to `CIFAR_MAX_BATCH_IMAGES`), POST /feedback, GET /model, the
page at /, /docs and /docs.json; BentoML adds /readyz (200 once the model is loaded and warmed
up) and /metrics (Prometheus: BentoML's request figures plus `cifar_inference_batch_size`,
`cifar_inference_seconds` and `cifar_rejected_uploads_total{reason}`).

Bad input is answered with a 4xx and a JSON body `{"error": "...", "reason": "..."}`; see
`serving.uploads` (request rules, size limit and the upload budget) and `serving.preprocess`
(image rules).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import bentoml

from serving import env
from serving.http import Front, Routes, Settings
from serving.live import PRECISIONS, LiveModel, Loaded, load
from serving.preprocess import DEFAULT_MAX_PIXELS
from serving.records import LogSettings, PredictionLog
from serving.uploads import max_inflight_bytes, max_upload_bytes

MODEL_TAG = os.environ.get("CIFAR_BENTO_MODEL", "cifar10-classifier:latest")
MAX_BATCH_IMAGES = env.number("CIFAR_MAX_BATCH_IMAGES", 256, 1, kind=int)
MAX_PIXELS = env.number("CIFAR_MAX_PIXELS", DEFAULT_MAX_PIXELS, 1, kind=int)
# Adaptive batching, tuned on the 2-core CPU box (benchmarks/serve_bench.py): batches of up to 64
# images, formed from whatever queued while the previous batch ran, no added wait.
BATCH_MAX_SIZE = env.number("CIFAR_BATCH_MAX_SIZE", 64, 1, kind=int)
BATCH_MAX_WAIT_MS = env.number("CIFAR_BATCH_MAX_WAIT_MS", 0, 0)
# Worker processes, each with its own model and batcher. BentoML's per-request work (HTTP, form
# parsing, middleware) is Python on one event loop per worker, so two workers with one
# onnxruntime thread each serve ~1.5x more than one worker with two (benchmarks/serve_bench.py).
WORKERS = env.number("CIFAR_SERVE_WORKERS", 2, 1, kind=int)
ORT_THREADS = env.number("CIFAR_ORT_THREADS", max(1, (os.cpu_count() or 1) // WORKERS), 1, kind=int)
# fp32 (default) or int8: the model's statically quantised twin, served only if it is within
# 0.5 points of fp32 on validation (else fp32, said in the log and at GET /model).
PRECISION = os.environ.get("CIFAR_PRECISION", "fp32").strip().lower()
if PRECISION not in PRECISIONS:
    raise ValueError(f"CIFAR_PRECISION={PRECISION!r}: expected one of {', '.join(PRECISIONS)}")
TRACING = os.environ.get("CIFAR_TRACING", "false").strip().lower() == "true"
# How often each worker looks for a newer model in its BentoML store (0: never; serving/live.py).
MODEL_POLL_SECONDS = env.number("CIFAR_MODEL_POLL_SECONDS", 10, 0)


MAX_UPLOAD_BYTES, MAX_INFLIGHT_BYTES = max_upload_bytes(), max_inflight_bytes()  # checked now
# The prediction log (serving/records.py): on unless CIFAR_PREDICTION_LOG=false.
PREDICTION_LOG = LogSettings.from_env()

ROUTES = Routes()


@bentoml.asgi_app(ROUTES.app, path="/")  # BentoML's PassiveMount: only the routes it has
@bentoml.service(
    name="cifar10-classifier",
    workers=WORKERS,
    # Loopback unless told otherwise: `bentoml serve ... --host 0.0.0.0` exposes it.
    http={"host": "127.0.0.1", "port": 3000},
    traffic={"timeout": 30, "max_concurrency": 512},  # past 512 in flight: 503, not a pile-up
    # No trace spans for the classification routes unless CIFAR_TRACING=true (with no exporter
    # configured they go nowhere, and building them costs ~0.2 ms of a ~1.5 ms request).
    tracing={"excluded_urls": [] if TRACING else ["/classify", "/classify_batch"]},
    # Per-request access log lines cost ~3 % of throughput here: off unless CIFAR_ACCESS_LOG=true
    # (/metrics counts requests by endpoint and status either way; errors are always logged).
    logging={"access": {"enabled": os.environ.get("CIFAR_ACCESS_LOG", "false") == "true"}},
)
class CifarClassifier:
    """CIFAR-10 classifier: an image in, its class and class probabilities out."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)  # what `bentoml build` packs

    def __init__(self) -> None:
        import prometheus_client  # after BentoML has set up multiprocess metrics

        stored = type(self).bento_model.stored
        if stored is None:
            raise RuntimeError(
                f"no model {MODEL_TAG} in the BentoML store "
                f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): import the MLflow champion "
                "first with `make import-champion` (python -m registry.import_champion)"
            )
        self.batch_sizes = prometheus_client.Histogram(
            "cifar_inference_batch_size",
            "Images per onnxruntime call (adaptive batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.infer_seconds = prometheus_client.Histogram(
            "cifar_inference_seconds",
            "Seconds per onnxruntime call",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        rejected = prometheus_client.Counter(
            "cifar_rejected_uploads", "Uploads refused, by reason", ["reason"]
        )
        self.live = LiveModel(self._load(stored), self._newest, self._load)
        self.records = None
        if PREDICTION_LOG is not None:
            names = self.live.current.engine.class_names
            self.records = PredictionLog(PREDICTION_LOG, names).start()
        ROUTES.front = Front(
            self.live,
            Settings(
                max_upload_bytes=MAX_UPLOAD_BYTES,
                max_inflight_bytes=MAX_INFLIGHT_BYTES,
                max_batch_images=MAX_BATCH_IMAGES,
                max_pixels=MAX_PIXELS,
            ),
            rejected,
            self.records,
        )
        self._follower: asyncio.Task | None = None
        self.ready = True

    def _load(self, stored: Any) -> Loaded:
        return load(
            stored, ORT_THREADS, BATCH_MAX_SIZE, BATCH_MAX_WAIT_MS, self._observe, PRECISION
        )

    @staticmethod
    def _newest() -> Any:
        """The store's model the service should serve now (None when following is off)."""
        if not MODEL_TAG.endswith(":latest"):
            return None  # a pinned tag: nothing to follow
        return bentoml.models.get(MODEL_TAG)

    @bentoml.on_startup
    async def _start_following(self) -> None:
        if MODEL_POLL_SECONDS > 0:
            self._follower = asyncio.get_running_loop().create_task(
                self.live.follow(MODEL_POLL_SECONDS)
            )

    @bentoml.on_shutdown
    async def _stop_following(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        if self.records is not None:
            await asyncio.to_thread(self.records.close)

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    def _observe(self, size: int, seconds: float) -> None:
        self.batch_sizes.observe(size)
        self.infer_seconds.observe(seconds)
