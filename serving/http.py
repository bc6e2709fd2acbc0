"""The endpoint's HTTP routes, a Starlette app that the BentoML service mounts at the root.

    POST /classify          one image: multipart field `image`, or the raw image as the body
    POST /classify_batch    several images: multipart fields `images`
    POST /feedback          a client's label for an earlier answer: {"request_id", "label"}
    GET  /model             what is served, with its model card
    GET  /                  a page to drop images on (serving/page/)
    GET  /docs, /docs.json  Swagger UI and the OpenAPI document (serving/schemas.py)

Why our own routes rather than `@bentoml.api`: the raw-body path, one parse of a multipart
body straight into memory (no temporary files), field rules that refuse what BentoML would
silently drop or answer with 500, a budget of bytes in flight, and the served version on every
answer. BentoML still runs the processes, /readyz, /livez, /metrics and the traffic limits.

Answers: 200 with the classification and its `request_id` (headers `X-Model-Version`,
`X-Request-Id`); bad input 4xx with `{"error": message, "reason": code}`; over the upload budget
503 with Retry-After. Every answer is recorded in the prediction log (serving/records.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from serving import schemas
from serving.feedback import parse_feedback
from serving.live import LiveModel, Loaded
from serving.preprocess import (
    Decoded,
    ImageRejected,
    decode_image,
    finish_decode,
    is_cheap,
    open_image,
    to_model_input,
)
from serving.records import Answer, PredictionLog, give_feedback
from serving.uploads import BadRequest, Budget, read_upload

INLINE_BYTES = 16 * 1024  # CIFAR-sized PNGs are 2-3 KB
FEEDBACK_BYTES = 4096  # a feedback body is a few dozen bytes
CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a client's X-Request-Id we adopt


def request_id(request: Request) -> str:
    """The client's `X-Request-Id` when it is a short safe token, else a fresh one."""
    given = request.headers.get("x-request-id")
    if given and CLIENT_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


@dataclass
class Settings:
    max_upload_bytes: int
    max_inflight_bytes: int
    max_batch_images: int
    max_pixels: int
    feedback_wait_s: float = 2.0  # how long an id not (yet) on record is looked for


class Front:
    """Per worker: the live model, the upload budget, the decoding thread and the counters."""

    def __init__(
        self,
        live: LiveModel,
        settings: Settings,
        rejected: Any = None,
        records: PredictionLog | None = None,
    ):
        self.live = live
        self.settings = settings
        self.records = records  # None: the prediction log is off
        self.budget = Budget(settings.max_inflight_bytes)
        self.rejected = rejected  # prometheus Counter by reason, or None
        # Costly decodes, one at a time per worker: the event loop stays free for everyone
        # else, and at most one big image is expanded in memory at once.
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        # Feedback waits on SQLite and on the other workers' queues: its own two threads, so
        # that a flood of unknown ids cannot hold up the default pool (model swaps use it).
        self.feedback_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="feedback")

    async def decode(self, data: bytes | bytearray) -> Decoded:
        """Small uploads whose header promises a small single-frame image are decoded on the
        event loop (well under a millisecond); everything else on the decoding thread. A big
        file goes to the thread even to read its header: a PNG's compressed text chunks are
        expanded while it is opened."""
        loop = asyncio.get_running_loop()
        if len(data) > INLINE_BYTES:
            return await loop.run_in_executor(
                self.decoder, decode_image, data, self.settings.max_pixels
            )
        img = open_image(data, self.settings.max_pixels)
        if is_cheap(img):
            return finish_decode(img)
        return await loop.run_in_executor(self.decoder, finish_decode, img)

    def refuse(
        self,
        exc: BadRequest | ImageRejected,
        prefix: str = "",
        served: Loaded | None = None,
        rid: str | None = None,
    ) -> JSONResponse:
        if self.rejected is not None:
            self.rejected.labels(exc.reason).inc()
        headers = dict(getattr(exc, "headers", {}))
        if served is not None:
            headers["X-Model-Version"] = served.version
        if rid is not None:
            headers["X-Request-Id"] = rid
        return JSONResponse(
            {"error": prefix + str(exc), "reason": exc.reason},
            status_code=exc.status,
            headers=headers,
        )

    async def classify(self, request: Request, *, many: bool) -> JSONResponse:
        served = self.live.current  # this request's model, even if a swap happens meanwhile
        served.in_flight += 1
        try:
            return await self._classify(request, served, many)
        except ClientDisconnect:  # nobody to answer; not a server error either
            return JSONResponse(
                {
                    "error": "the client closed the connection before sending the whole body",
                    "reason": "client_disconnected",
                },
                status_code=400,
            )
        except Exception:  # a bug, never the client's fault: say so in JSON, log it
            log.exception("classification failed")
            return JSONResponse(
                {
                    "error": "internal error while classifying; the server log has the details",
                    "reason": "internal_error",
                },
                status_code=500,
                headers={"X-Model-Version": served.version},
            )
        finally:
            served.in_flight -= 1

    async def _classify(self, request: Request, served: Loaded, many: bool) -> JSONResponse:
        started = time.perf_counter()
        rid = request_id(request)
        try:
            upload = await read_upload(
                dict(request.headers),
                request.url.query,
                request.stream(),
                file_field="images" if many else "image",
                many=many,
                max_files=self.settings.max_batch_images if many else 1,
                max_bytes=self.settings.max_upload_bytes,
                budget=self.budget,
            )
        except BadRequest as exc:
            return self.refuse(exc, served=served, rid=rid)
        kept = None
        try:
            decoded = []
            for i, data in enumerate(upload.images):
                try:
                    decoded.append(await self.decode(data))
                except ImageRejected as exc:
                    prefix = (
                        f"image {i} (of {len(upload.images)}, counted from 0): " if many else ""
                    )
                    return self.refuse(exc, prefix, served, rid)
            if self.records and random.random() < self.records.settings.keep_images_rate:
                kept = [bytes(data) for data in upload.images]
        finally:
            self.budget.give(upload.held)
            upload.images.clear()
        pixels = np.stack([d.pixels for d in decoded])
        out = await served.batcher.submit(to_model_input(pixels))
        probs, ood = out[:, :-1], served.verdicts(out[:, -1])
        results = [
            self.result(served, p, d, upload.top_k, o) for p, d, o in zip(probs, decoded, ood)
        ]
        if many:
            for i, r in enumerate(results):
                r["request_id"] = f"{rid}.{i}"
            body = {"request_id": rid, "results": results, "model": served.info}
        else:
            body = {"request_id": rid, **results[0]}
        seconds = time.perf_counter() - started
        if self.records is not None:
            self.records.add(
                Answer(
                    time.time(), rid, many, served.info, probs, pixels, decoded, ood, seconds, kept
                )
            )
        return JSONResponse(
            body,
            headers={
                "X-Model-Version": served.version,
                "X-Request-Id": rid,
                "Server-Timing": f"total;dur={1000 * seconds:.1f}",
            },
        )

    @staticmethod
    def result(
        served: Loaded, probs: np.ndarray, d: Decoded, top_k: int, ood: tuple[Any, Any]
    ) -> dict[str, Any]:
        return {
            **served.engine.answer(probs, top_k),
            "ood_score": ood[0],
            "in_distribution": ood[1],
            "image": {
                "format": d.format,
                "width": d.width,
                "height": d.height,
                "mode": d.mode,
                "frames": d.frames,
            },
            "model": served.info,
        }

    async def feedback(self, request: Request) -> JSONResponse:
        """POST /feedback {"request_id": ..., "label": ...}: 200 stored, 404 unknown or expired
        id, 400 bad body or label, 409 a label was given before (the first is kept)."""
        try:
            request_id, label = await self._feedback_body(request)
        except BadRequest as exc:
            return self.refuse(exc)
        if self.records is None:
            return self.refuse(
                BadRequest(
                    "this service keeps no prediction log (CIFAR_PREDICTION_LOG=false), so it "
                    "has no answers to attach labels to",
                    404,
                    "not_recorded",
                )
            )
        try:
            given = await asyncio.get_running_loop().run_in_executor(
                self.feedback_pool,
                give_feedback, self.records, request_id, label, self.settings.feedback_wait_s,
            )  # fmt: skip
        except Exception:  # a bug or a broken disk, never the client's fault: say so in JSON
            log.exception("storing feedback failed")
            return JSONResponse(
                {"error": "internal error while storing the label; the server log has the "
                 "details", "reason": "internal_error"}, status_code=500,
            )  # fmt: skip
        if given.status == "unknown":
            days = self.records.settings.retention_seconds / 86400
            return self.refuse(
                BadRequest(
                    f"no answer with request id {request_id!r} is on record: unknown, or older "
                    f"than the prediction log keeps ({days:g} days)",
                    404,
                    "unknown_request_id",
                )
            )
        body = {
            "request_id": request_id,
            "label": given.label,
            "predicted": given.predicted,
            "model_version": given.model_version,
        }
        if given.status == "duplicate":
            error = f"request {request_id!r} already has the label {given.label!r}; kept"
            return JSONResponse(
                {"error": error, "reason": "feedback_exists", **body}, status_code=409
            )
        return JSONResponse({"stored": True, **body})

    async def _feedback_body(self, request: Request) -> tuple[str, str]:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > FEEDBACK_BYTES:
                raise BadRequest(
                    f"a feedback body is at most {FEEDBACK_BYTES} bytes", 413, "too_large"
                )
        return parse_feedback(bytes(data), self.live.current.engine.class_names)

    async def model_card(self, _request: Request) -> JSONResponse:
        served = self.live.current
        keys = (
            "registered_model",
            "mlflow_version",
            "mlflow_run_id",
            "val_accuracy",
            "test_accuracy",
            "int8_val_accuracy",
            "int8_test_accuracy",
            "int8_servable",
            "int8_judged_with_dot_product",
            "served_tta",
            "preset",
            "promotion_reason",
            "class_names",
        )
        return JSONResponse(
            {
                "bento_tag": served.tag,
                **{k: served.metadata.get(k) for k in keys},
                "precision": served.precision,
                "precision_note": served.precision_note,
                "ood_threshold": served.metadata.get("ood_threshold"),
                "ood_method": served.metadata.get("ood_method"),
                "ood_note": served.ood_note,
                "model_card_markdown": served.card,
            },
            headers={"X-Model-Version": served.version},
        )


def not_ready(_request: Request) -> JSONResponse:
    return JSONResponse(
        {"error": "the model is not loaded yet", "reason": "not_ready"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


log = logging.getLogger("cifar10.serving")
PAGE = Path(__file__).resolve().parent / "page"
_PAGE_FILES = {"page.js": "text/javascript", "page.css": "text/css"}


class Routes:
    """The Starlette app; its handlers reach this worker's `Front` once the service set it."""

    def __init__(self) -> None:
        self.front: Front | None = None
        self.app = Starlette(
            routes=[
                Route("/classify", self._classify, methods=["POST"]),
                Route("/classify_batch", self._classify_batch, methods=["POST"]),
                Route("/feedback", self._feedback, methods=["POST"]),
                Route("/model", self._model, methods=["GET"]),
                Route("/", self._page, methods=["GET"]),
                Route("/page/{name}", self._page_file, methods=["GET"]),
                Route("/docs", self._docs, methods=["GET"]),
                Route("/docs.json", self._openapi, methods=["GET"]),
            ]
        )

    async def _page(self, _request: Request) -> FileResponse:
        return FileResponse(PAGE / "index.html", media_type="text/html")

    async def _page_file(self, request: Request) -> FileResponse | JSONResponse:
        name = request.path_params["name"]
        if name not in _PAGE_FILES:
            return JSONResponse(
                {"error": f"no page file {name!r}", "reason": "not_found"}, status_code=404
            )
        return FileResponse(PAGE / name, media_type=_PAGE_FILES[name])

    async def _docs(self, _request: Request) -> FileResponse:
        return FileResponse(PAGE / "docs.html", media_type="text/html")

    async def _openapi(self, _request: Request) -> JSONResponse:
        if self.front is None:
            return not_ready(_request)
        s = self.front.settings
        return JSONResponse(schemas.openapi(s.max_upload_bytes, s.max_batch_images, s.max_pixels))

    async def _classify(self, request: Request) -> JSONResponse:
        if self.front is None:
            return not_ready(request)
        return await self.front.classify(request, many=False)

    async def _classify_batch(self, request: Request) -> JSONResponse:
        if self.front is None:
            return not_ready(request)
        return await self.front.classify(request, many=True)

    async def _feedback(self, request: Request) -> JSONResponse:
        if self.front is None:
            return not_ready(request)
        return await self.front.feedback(request)

    async def _model(self, request: Request) -> JSONResponse:
        if self.front is None:
            return not_ready(request)
        return await self.front.model_card(request)
