"""onnxruntime inference and adaptive batching for the service (numpy + onnxruntime, no torch).

`Engine` wraps one ONNX model and its metadata; `MicroBatcher` merges concurrent requests into
one onnxruntime call. The in-process benchmark and the HTTP service use the same two classes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.constants import CLASS_NAMES, IMAGE_SIZE
from cifarlab.cpu import usable_cores
from cifarlab.ood import OodReference


def default_threads() -> int:
    """Every core this process may use (the service sets its own count: CIFAR_ORT_THREADS)."""
    return usable_cores()


def _softmax(logits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows of `logits` -> probabilities (float64), written into `out`."""
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


@dataclass
class Engine:
    """An ONNX classifier: normalised float32 (N, 3, 32, 32) in, class probabilities out."""

    path: Path
    metadata: Mapping[str, Any] = field(default_factory=dict)
    threads: int = field(default_factory=default_threads)
    ood: OodReference | None = None  # the version's out-of-distribution reference, if it has one

    def __post_init__(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's idle worker threads spin by default, burning CPU that the HTTP server
        # needs on a small machine: $CIFAR_ORT_SPIN=1 turns spinning back on.
        spin = os.environ.get("CIFAR_ORT_SPIN", "0")
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.session = ort.InferenceSession(
            str(self.path), opts, providers=["CPUExecutionProvider"]
        )
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, IMAGE_SIZE, IMAGE_SIZE]:
            raise ValueError(
                f"{self.path}: expected one input of shape (N, 3, {IMAGE_SIZE}, "
                f"{IMAGE_SIZE}), found {[(i.name, i.shape) for i in inputs]}"
            )
        self.input_name = inputs[0].name
        self.class_names: tuple[str, ...] = tuple(self.metadata.get("class_names") or CLASS_NAMES)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.class_names):
            raise ValueError(
                f"{self.path}: the model has {outputs[-1]} outputs but the metadata "
                f"names {len(self.class_names)} classes"
            )

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax of the logits, float64 rows summing to 1."""
        logits = self.logits(x)
        return _softmax(logits, np.empty(logits.shape))

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, classes + 1): each image's class probabilities, then its out-of-distribution
        score (NaN without a reference). One array, so that the batcher splits it by rows."""
        logits = self.logits(x)
        out = np.empty((len(x), logits.shape[1] + 1))
        _softmax(logits, out[:, :-1])
        out[:, -1] = self.ood.scores(logits, x) if self.ood is not None else np.nan
        return out

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """First calls allocate and pick kernels: do them before the first request."""
        for n in batch_sizes:
            self.logits(np.zeros((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))

    def answer(self, probs: np.ndarray, top_k: int) -> dict[str, Any]:
        """One row of probabilities -> label, class id, confidence and the top-k classes."""
        order = np.argsort(-probs, kind="stable")[:top_k]
        best = int(order[0])
        return {
            "label": self.class_names[best],
            "class_id": best,
            "confidence": float(probs[best]),
            "top_k": [
                {
                    "label": self.class_names[int(i)],
                    "class_id": int(i),
                    "probability": float(probs[int(i)]),
                }
                for i in order
            ],
        }


class MicroBatcher:
    """Adaptive batching on one event loop.

    A request that finds the engine idle runs at once (no waiting at low load). Requests that
    arrive while a batch is running queue up, and the next batch takes all of them, up to
    `max_batch_size` images: the batch grows with the load, and nobody waits longer than the
    batch ahead of them. `max_wait_ms` > 0 additionally holds a batch that long for company.
    Inference runs on one dedicated thread (onnxruntime uses its own threads inside it), so the
    event loop keeps accepting and decoding requests meanwhile.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 64,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Input rows (n, ...) -> output rows (n, ...), computed in some batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.append((x, future))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.max_wait_s and sum(len(x) for x, _ in self._queue) < self.max_batch_size:
                await asyncio.sleep(self.max_wait_s)
            items = [self._queue.popleft()]
            size = len(items[0][0])
            while self._queue and size + len(self._queue[0][0]) <= self.max_batch_size:
                x, fut = self._queue.popleft()
                items.append((x, fut))
                size += len(x)
            items = [(x, fut) for x, fut in items if not fut.done()]  # callers that gave up
            if not items:
                continue
            batch = items[0][0] if len(items) == 1 else np.concatenate([x for x, _ in items])
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._executor, self.infer, batch)
            except Exception as exc:  # one failed batch fails its requests, not the loop
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - start)
            offset = 0
            for x, fut in items:
                if not fut.done():
                    fut.set_result(out[offset : offset + len(x)])
                offset += len(x)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
