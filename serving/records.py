"""The prediction log: every answer the service gives, one JSON line per image, in files.

Each worker appends to its own file `<folder>/predictions-<opened>-<host>-<pid>-<n>.jsonl.part`;
the file is closed (renamed to `.jsonl`) when it reaches `CIFAR_PREDICTION_LOG_FILE_MB` or is
`CIFAR_PREDICTION_LOG_FILE_MINUTES` old, so a closed file never changes again and can be shipped
or read by the monitor. Closed files older than `CIFAR_PREDICTION_LOG_RETENTION_DAYS` are deleted,
and the oldest go first when the folder passes `CIFAR_PREDICTION_LOG_MAX_MB`.

Lines are `{"kind": "prediction", ...}` (an answer: time, request id, model version and precision,
class probabilities, out-of-distribution score, image statistics, latency) or
`{"kind": "feedback", ...}` (a client's label for an earlier answer). No image bytes are kept
unless `CIFAR_KEEP_IMAGES_RATE` (a fraction of uploads, kept as sent under `images/`) or
`CIFAR_KEEP_FEEDBACK_IMAGES` (the 32x32 input of answers that get a label, under
`feedback-images/<label>/`) asks for them.

The request handler only appends to a queue; a thread per worker turns the queue into lines
every `FLUSH_SECONDS`, off the event loop. `serving.feedback.Ledger` indexes the request ids.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from serving import env
from serving.feedback import Ledger, Row
from serving.logfiles import OPEN_SUFFIX, default_folder, lock_open_file, prune, recover_orphans

log = logging.getLogger("cifar10.serving")

FLUSH_SECONDS = 0.5
MAX_PENDING = 100_000  # answers queued at most (~20 s at full speed): past it, not recorded
_MB = 1024 * 1024


@dataclass(frozen=True)
class LogSettings:
    folder: Path
    file_bytes: int = 16 * _MB  # a file is closed at this size ...
    file_seconds: float = 600.0  # ... or this age
    max_bytes: int = 1024 * _MB  # closed files and kept images, all workers together
    retention_seconds: float = 30 * 86400.0
    keep_images_rate: float = 0.0  # fraction of uploads kept as sent
    keep_feedback_images: bool = False  # the 32x32 input of answers that get a label
    feedback_image_seconds: float = 86400.0  # how long an answer's input waits for its label

    @classmethod
    def from_env(cls) -> LogSettings | None:
        """The settings `CIFAR_PREDICTION_LOG*` and `CIFAR_KEEP_*` state; None when the log is
        off (`CIFAR_PREDICTION_LOG=false`). A bad value stops the service naming it."""
        if not env.flag("CIFAR_PREDICTION_LOG", True):
            return None
        return cls(
            folder=default_folder(),
            file_bytes=int(env.number("CIFAR_PREDICTION_LOG_FILE_MB", 16, 0.001) * _MB),
            file_seconds=env.number("CIFAR_PREDICTION_LOG_FILE_MINUTES", 10, 0.01) * 60,
            max_bytes=int(env.number("CIFAR_PREDICTION_LOG_MAX_MB", 1024, 1) * _MB),
            retention_seconds=env.number("CIFAR_PREDICTION_LOG_RETENTION_DAYS", 30, 0.001) * 86400,
            keep_images_rate=env.number("CIFAR_KEEP_IMAGES_RATE", 0, 0, 1),
            keep_feedback_images=env.flag("CIFAR_KEEP_FEEDBACK_IMAGES", False),
            feedback_image_seconds=env.number("CIFAR_FEEDBACK_IMAGE_HOURS", 24, 0.001) * 3600,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "file_mb": self.file_bytes / _MB,
            "file_minutes": self.file_seconds / 60,
            "max_mb": self.max_bytes / _MB,
            "retention_days": self.retention_seconds / 86400,
            "keep_images_rate": self.keep_images_rate,
            "keep_feedback_images": self.keep_feedback_images,
            "feedback_image_hours": self.feedback_image_seconds / 3600,
        }


@dataclass(slots=True)
class Answer:
    """One answered request, as the handler hands it over (no work done on the event loop)."""

    time: float
    request_id: str
    batch: bool  # /classify_batch: the images' ids are `<request_id>.<index>`
    model: dict[str, Any]  # the served model's `info`
    probs: np.ndarray  # (n, classes)
    pixels: np.ndarray  # (n, 32, 32, 3) uint8: the model's input
    images: list[Any]  # serving.preprocess.Decoded per image (format, size, mode)
    ood: list[tuple[float | None, bool | None]]  # (ood_score, in_distribution) per image
    latency_s: float
    uploads: list[bytes] | None = None  # kept as sent (CIFAR_KEEP_IMAGES_RATE)

    def item_id(self, i: int) -> str:
        return f"{self.request_id}.{i}" if self.batch else self.request_id


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


_FILE_NUMBERS = itertools.count(1)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class PredictionLog:
    """One worker's writer. `add` is all the request handler calls."""

    def __init__(self, settings: LogSettings, class_names: tuple[str, ...]) -> None:
        self.settings = settings
        self.folder = settings.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.class_names = class_names
        self.ledger = Ledger(self.folder / "requests.sqlite")
        self._host = _UNSAFE.sub("_", socket.gethostname())[:40] or "host"
        self._pending: deque[Answer | dict[str, Any]] = deque()
        self._lock = threading.Lock()  # one flush at a time (the thread, or a feedback call)
        self._stop = threading.Event()
        self._file: Any = None
        self._path: Path | None = None
        self._opened = 0.0
        self._count = 0
        self.written = 0  # lines, for tests and benchmarks
        self.dropped = 0  # answers not recorded because the queue was full
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def start(self) -> PredictionLog:
        recover_orphans(self.folder)
        self.prune()
        self._thread.start()
        return self

    def add(self, answer: Answer | dict[str, Any]) -> None:
        if len(self._pending) >= MAX_PENDING:  # the writer is stuck (a locked or full disk)
            self.dropped += 1
            return
        self._pending.append(answer)  # deque.append is atomic: no lock on the event loop

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a full disk must not stop the answers
                log.exception("could not write the prediction log in %s", self.folder)

    def flush(self) -> None:
        """Write what is queued; close the file when it is big or old enough."""
        with self._lock:
            items = []
            while self._pending:
                items.append(self._pending.popleft())
            if self.dropped:
                log.error("prediction log: %d answers not recorded (writer behind)", self.dropped)
                self.dropped = 0
            if items:
                lines, rows = self._lines(items)
                self.ledger.add(rows)  # first the index, so feedback never misses a line
                self._write(lines)
            if self._file is not None and (
                self._file.tell() >= self.settings.file_bytes
                or time.time() - self._opened >= self.settings.file_seconds
            ):
                self._close_file()
                self.prune()

    def close(self) -> None:
        """Stop the thread, write the rest and close the file (the service's shutdown)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.flush()
        with self._lock:
            self._close_file()
        self.ledger.close()

    def _lines(self, items: list[Answer | dict[str, Any]]) -> tuple[list[str], list[Row]]:
        answers = [a for a in items if isinstance(a, Answer)]
        stats = _image_stats(answers)
        keep_pixels = self.settings.keep_feedback_images
        lines, rows, k = [], [], 0
        for item in items:
            if not isinstance(item, Answer):
                lines.append(json.dumps(item, separators=(",", ":")))
                continue
            when = iso(item.time)
            best = item.probs.argmax(axis=1)  # what the answer said, before any rounding
            probs = np.round(item.probs, 6)
            for i, img in enumerate(item.images):
                rid = item.item_id(i)
                label = self.class_names[int(best[i])]
                mean, std = stats[k]
                k += 1
                lines.append(
                    json.dumps(
                        {
                            "kind": "prediction",
                            "time": when,
                            "request_id": rid,
                            "request": item.request_id,
                            "index": i,
                            "model_version": item.model.get("version"),
                            "bento_tag": item.model.get("bento_tag"),
                            "precision": item.model.get("precision"),
                            "label": label,
                            "confidence": float(probs[i, best[i]]),
                            "probabilities": probs[i].tolist(),
                            "ood_score": item.ood[i][0],
                            "in_distribution": item.ood[i][1],
                            "image": {
                                "format": img.format,
                                "width": img.width,
                                "height": img.height,
                                "mode": img.mode,
                                "mean": mean,
                                "std": std,
                            },
                            "latency_ms": round(1000 * item.latency_s, 3),
                        },
                        separators=(",", ":"),
                    )
                )
                pixels = item.pixels[i].tobytes() if keep_pixels else None
                rows.append(Row(rid, item.time, str(item.model.get("version")), label, pixels))
            if item.uploads:
                self._keep_uploads(item)
        return lines, rows

    def _keep_uploads(self, item: Answer) -> None:
        day = self.folder / "images" / iso(item.time)[:10]
        day.mkdir(parents=True, exist_ok=True)
        for i, (data, img) in enumerate(zip(item.uploads or [], item.images)):
            ext = (img.format or "bin").lower()
            (day / f"{item.item_id(i)}.{ext}").write_bytes(data)

    def _write(self, lines: list[str]) -> None:
        if self._file is None:
            self._opened = time.time()
            self._count = next(_FILE_NUMBERS)  # unique in the process, whichever writer asks
            stamp = datetime.fromtimestamp(self._opened, UTC).strftime("%Y%m%dT%H%M%S")
            name = f"predictions-{stamp}-{self._host}-{os.getpid()}-{self._count}.jsonl"
            self._path = self.folder / (name + OPEN_SUFFIX)
            # Locked before it gets its open name: recover_orphans never takes a new file
            # for a dead writer's.
            fresh = self._path.with_name(name + ".new")
            self._file = open(fresh, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            lock_open_file(self._file)
            fresh.rename(self._path)
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        self.written += len(lines)

    def _close_file(self) -> None:
        if self._file is None or self._path is None:
            return
        # Renamed while still locked: nobody can take it for an orphan in between.
        self._path.rename(self._path.with_name(self._path.name[: -len(OPEN_SUFFIX)]))
        self._file.close()
        self._file = self._path = None

    def prune(self, now: float | None = None) -> list[Path]:
        """Delete closed files past the retention period, then the oldest over the size cap
        (all workers' files: whichever worker prunes first does it)."""
        now = time.time() if now is None else now
        return prune(self.folder, self.settings, now, self.ledger)


def _image_stats(answers: list[Answer]) -> list[tuple[list[float], list[float]]]:
    """Per-channel mean and spread (0-255) of every image's 32x32 input, in exact integer sums
    over all the queued images at once (channels made contiguous first: numpy's strided
    per-channel reductions cost several times more)."""
    if not answers:
        return []
    px = np.concatenate([a.pixels for a in answers]).reshape(-1, 1024, 3)
    x = np.ascontiguousarray(px.transpose(0, 2, 1)).astype(np.int32)  # (N, 3, 1024)
    mean = x.sum(axis=-1) / 1024
    std = np.sqrt(np.maximum(np.einsum("nck,nck->nc", x, x) / 1024 - mean * mean, 0))
    return list(zip(np.round(mean, 2).tolist(), np.round(std, 2).tolist()))


def give_feedback(plog: PredictionLog, request_id: str, label: str, wait_s: float) -> Any:
    """Store a client's label for an answer (serving.feedback.Given says what became of it).
    An answer given a moment ago by another worker may not be indexed yet: its queue is written
    every FLUSH_SECONDS, so an id not found is looked up again for `wait_s` before it is
    called unknown."""
    try:
        plog.flush()  # this worker's own answers, now
    except Exception:  # noqa: BLE001 - the other workers' answers may still be found
        log.exception("could not write the prediction log in %s", plog.folder)
    since = time.time() - plog.settings.retention_seconds  # older answers have expired
    deadline = time.monotonic() + wait_s
    while not plog.ledger.knows(request_id, since) and time.monotonic() < deadline:
        time.sleep(0.1)
    given = plog.ledger.give(request_id, label, since=since)
    if given.status == "stored":
        now = time.time()
        plog.add(
            {
                "kind": "feedback",
                "time": iso(now),
                "request_id": request_id,
                "label": label,
                "predicted": given.predicted,
                "correct": given.predicted == label,
                "model_version": given.model_version,
                "answered": iso(given.answered) if given.answered else None,
            }
        )
        if given.pixels is not None:
            try:
                _keep_feedback_image(plog.folder, request_id, label, given.pixels)
            except OSError:  # the label is stored; the image was a bonus
                log.exception("could not keep the image of %s", request_id)
    return given


def _keep_feedback_image(folder: Path, request_id: str, label: str, pixels: bytes) -> None:
    from PIL import Image

    dest = folder / "feedback-images" / label
    dest.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("RGB", (32, 32), pixels)
    image.save(dest / f"{request_id}.png")
