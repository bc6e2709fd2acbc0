"""The model a worker serves, and the swap to a new champion while requests keep coming.

Where a new champion comes from: the BentoML model store the service reads. Importing the
registry's champion into it is the training side's job (`train-cifar`'s last step on one
machine; `cifar-import-champion --follow 60` on a serving host). The service itself only
looks at its own store every `CIFAR_MODEL_POLL_SECONDS` (default 10; 0 turns following off):
no MLflow client, no credentials and no network in the serving process, and a model reaches
the endpoint only after the importer has checked it (shapes, normalisation) in the store that
`bentoml build` packs.

A swap: the new model is loaded and warmed up on a thread beside the old one, then takes every
new request; requests already holding the old one finish on it, and it is closed once the last
of them is done. Every answer names the version that computed it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.cpu import has_int8_dot_product
from cifarlab.ood import OodReference
from serving.engine import Engine, MicroBatcher

log = logging.getLogger("cifar10.serving")


@dataclass
class Loaded:
    """One model from the store, ready to answer: engine, batcher and what to say about it."""

    tag: str
    engine: Engine
    batcher: MicroBatcher
    metadata: dict[str, Any]
    card: str | None
    precision: str = "fp32"
    precision_note: str | None = None  # why int8 was asked for and not served
    ood_note: str | None = None  # why answers carry no out-of-distribution verdict
    in_flight: int = 0
    info: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        m = self.metadata
        int8 = self.precision == "int8"
        self.info = {
            "bento_tag": self.tag,
            "registered_model": m.get("registered_model"),
            "version": m.get("mlflow_version"),
            "run_id": m.get("mlflow_run_id"),
            "val_accuracy": m.get("int8_val_accuracy" if int8 else "val_accuracy"),
            "served_tta": m.get("served_tta"),
            "precision": self.precision,
            "model_card": "/model",
        }

    @property
    def version(self) -> str:
        """The registry version (the Bento tag when it came from elsewhere)."""
        return str(self.metadata.get("mlflow_version") or self.tag)

    def verdicts(self, scores: np.ndarray) -> list[tuple[float | None, bool | None]]:
        """(ood_score, in_distribution) per image; (None, None) without a reference."""
        ood = self.engine.ood
        if ood is None:
            return [(None, None)] * len(scores)
        return [(round(float(s), 4), bool(s <= ood.threshold)) for s in scores]

    async def retire(self) -> None:
        """Close once the requests that took this model have their answers."""
        while self.in_flight:
            await asyncio.sleep(0.05)
        self.batcher.close()


PRECISIONS = ("fp32", "int8")


_READ = object()  # choose_file's default: read this CPU's flags


def choose_file(
    meta: dict[str, Any], precision: str, dot_product: Any = _READ
) -> tuple[str, str, str | None]:
    """(ONNX file, precision served, why int8 was not served) for the asked precision: int8
    only when the model has an int8 twin within 0.5 points of fp32 on validation, judged on a
    CPU like this one. `dot_product`: whether this CPU has int8 dot-product instructions
    (default: read from it, cifarlab.cpu; None: it cannot tell)."""
    fp32 = meta.get("onnx_file", "model.onnx")
    if precision != "int8":
        return fp32, "fp32", None
    if not meta.get("int8_file"):
        return (
            fp32,
            "fp32",
            (
                "int8 asked for, but this model has no int8 twin (train-cifar builds "
                "one for a version it promotes to champion, or with int8=always): "
                "serving fp32"
            ),
        )
    if not meta.get("int8_servable"):
        drop = (meta.get("val_accuracy") or 0) - (meta.get("int8_val_accuracy") or 0)
        return (
            fp32,
            "fp32",
            (
                f"int8 asked for, but its int8 twin is {100 * drop:.2f} points "
                "behind on validation (allowed: 0.5): serving fp32"
            ),
        )
    here = has_int8_dot_product() if dot_product is _READ else dot_product
    if meta.get("int8_judged_with_dot_product") is True and here is not True:
        # Without those instructions the int8 sums can saturate: its accuracy here is unknown.
        return (
            fp32,
            "fp32",
            (
                "int8 asked for, but its int8 twin was judged on a CPU with int8 "
                "dot-product instructions (VNNI/AMX) and this one "
                f"{'has none' if here is False else 'does not say'}, where its "
                "accuracy may drop: serving fp32"
            ),
        )
    return meta["int8_file"], "int8", None


def load(
    stored: Any,
    threads: int,
    batch_size: int,
    wait_ms: float,
    on_batch: Callable[[int, float], None] | None,
    precision: str = "fp32",
) -> Loaded:
    """A BentoML store model -> `Loaded`, warmed up (blocking: call it on a thread)."""
    meta = dict(stored.info.metadata)
    onnx_file, served, note = choose_file(meta, precision)
    if note:
        log.warning("%s: %s", stored.tag, note)
    ood, ood_note = ood_reference(stored, meta)
    if ood_note:
        log.warning("%s: %s", stored.tag, ood_note)
    engine = Engine(Path(stored.path_of(onnx_file)), meta, threads=threads, ood=ood)
    engine.warm_up()
    card = Path(stored.path_of("model_card.md"))
    return Loaded(
        str(stored.tag),
        engine,
        MicroBatcher(
            engine.infer, max_batch_size=batch_size, max_wait_ms=wait_ms, on_batch=on_batch
        ),
        meta,
        card.read_text() if card.is_file() else None,
        served,
        note,
        ood_note,
    )


def ood_reference(stored: Any, meta: dict[str, Any]) -> tuple[OodReference | None, str | None]:
    """The version's out-of-distribution reference from its store entry, or why there is none
    (answers then say `in_distribution: null`)."""
    name = meta.get("ood_file")
    if not name:
        return None, meta.get("ood_note") or (
            "this model came into the store without an out-of-distribution reference (a "
            "version registered and imported before the service scored images for it): "
            "answers carry in_distribution: null"
        )
    try:
        return OodReference.from_json(Path(stored.path_of(name)).read_text()), None
    except (OSError, ValueError, TypeError) as exc:
        return None, f"its out-of-distribution reference {name} cannot be used ({exc})"


class LiveModel:
    """The model requests go to now; `follow` swaps in a newer one from the store."""

    def __init__(self, current: Loaded, newest: Callable[[], Any], loader: Callable[[Any], Loaded]):
        self.current = current
        self._newest = newest  # -> the store model the service should serve now
        self._loader = loader
        self.swaps = 0

    async def check(self) -> bool:
        """Swap to the store's newest model if it is not the one served; True if swapped."""
        stored = await asyncio.to_thread(self._newest)
        if stored is None or str(stored.tag) == self.current.tag:
            return False
        new = await asyncio.to_thread(self._loader, stored)
        old, self.current = self.current, new
        self.swaps += 1
        log.info("now serving %s (registry version %s), was %s", new.tag, new.version, old.tag)
        asyncio.get_running_loop().create_task(old.retire())
        return True

    async def follow(self, every_s: float) -> None:
        """Check every `every_s` seconds until cancelled; a model that fails to load is logged
        and the current one kept."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving the model we have
                log.exception(
                    "could not swap to the store's newest model; still serving %s", self.current.tag
                )
