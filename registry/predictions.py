"""The classes a version's exported model gives its validation images: the split they come
from, the images two runs share, and the record each run keeps of its model's classes (with the
model's SHA-256) so that a comparison need not run a file again; a record is believed only when
it is for that very model, covers the images and agrees with the file on a random sample."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.constants import CLASS_NAMES
from cifarlab.export import onnx_logits
from cifarlab.split import stratified_split
from registry import tracking

PREDICTIONS_FILE = "val_predictions.npz"
SPOT_CHECK_IMAGES = 256  # a record is believed only if its file gives the same classes on these

log = logging.getLogger(__name__)


class SplitUnknown(RuntimeError):
    """A run's validation images cannot be reconstructed from what it recorded."""


def validation_indices(run: Any, labels: np.ndarray) -> np.ndarray:
    """A run's validation indices into the training images (`run_split`)."""
    return np.asarray(run_split(run, labels).val_idx)


def run_split(run: Any, labels: np.ndarray) -> Any:
    """A run's split (cifarlab.split.Split), rebuilt from its params (sizes, seed) and checked
    against its recorded split hash; SplitUnknown where it cannot be."""
    p, recorded = run.data.params, run.data.tags.get("split_sha256")
    if not recorded:
        raise SplitUnknown(f"run {run.info.run_id} recorded no split hash")
    try:
        split = stratified_split(
            labels, int(p["data.train_size"]), int(p["data.val_size"]), int(p["data.split_seed"])
        )
    except (KeyError, ValueError) as exc:
        raise SplitUnknown(f"run {run.info.run_id} records no usable split ({exc})") from None
    if split.digest != recorded:
        raise SplitUnknown(
            f"run {run.info.run_id}: its split rebuilt here hashes to "
            f"{split.digest[:12]}, but it recorded {recorded[:12]} (other data?)"
        )
    return split


def shared_validation(champion: Any, challenger: Any, labels: np.ndarray) -> np.ndarray:
    """Indices held out from both runs' training: the shared split, else the intersection of
    the two validation sets (a validation image is never one of its own run's training images)."""
    theirs, mine = (r.data.tags.get("data_fingerprint") for r in (champion, challenger))
    if theirs is None or theirs != mine:
        raise SplitUnknown(
            f"the champion was trained on other data (data_fingerprint {theirs} "
            f"vs {mine}): their images cannot be matched"
        )
    mine = validation_indices(challenger, labels)
    if champion.data.tags.get("split_sha256") == challenger.data.tags["split_sha256"]:
        return mine
    return np.intersect1d(mine, validation_indices(champion, labels))


def predict(onnx_path: Path, images: torch.Tensor) -> np.ndarray:
    return onnx_logits(onnx_path, images).argmax(axis=1)


def model_digest(onnx_path: Path) -> str:
    """SHA-256 of the ONNX model's content (its protobuf as onnx re-serialises it), so the
    registry's copy, which MLflow saves again, matches the file it was made from."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def record_predictions(
    store: tracking.Store, run_id: str, onnx_path: Path, val_idx: np.ndarray, pred: np.ndarray
) -> None:
    """Save the classes `onnx_path` gives the validation images `val_idx` (indices into the
    training set) as the run's artifact PREDICTIONS_FILE, with the model's digest."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PREDICTIONS_FILE
        np.savez_compressed(
            path,
            val_idx=np.asarray(val_idx, dtype=np.int64),
            pred=np.asarray(pred, dtype=np.int16),
            onnx_digest=np.array(model_digest(onnx_path)),
        )
        store.client.log_artifact(run_id, str(path))


def recorded_predictions(
    store: tracking.Store, run_id: str, onnx_path: Path, num_classes: int = len(CLASS_NAMES)
) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices, classes) that the run recorded for this very model; None when it recorded
    none, recorded them for another model, or the record is not two matching integer arrays."""
    try:
        if not tracking.has_artifact(store, run_id, PREDICTIONS_FILE):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = store.client.download_artifacts(run_id, PREDICTIONS_FILE, tmp)
            with np.load(local) as z:
                digest, idx, pred = str(z["onnx_digest"]), z["val_idx"], z["pred"]
    except Exception:  # noqa: BLE001 - no usable record: the file is run instead
        return None
    well_formed = (
        idx.ndim == pred.ndim == 1
        and len(idx) == len(pred) > 0
        and idx.dtype.kind in "iu"
        and pred.dtype.kind in "iu"
        and idx.min() >= 0
        and pred.min() >= 0
        and pred.max() < num_classes
    )
    if not well_formed or digest != model_digest(onnx_path):
        return None
    return idx, pred


def _look_up(known: tuple[np.ndarray, np.ndarray] | None, shared: np.ndarray) -> np.ndarray | None:
    """The classes of `known` = (indices, classes) on the images `shared`, if it has them all."""
    if known is None:
        return None
    idx, pred = (np.asarray(a) for a in known)
    if not len(idx):
        return None
    order = np.argsort(idx)
    hit = order[np.minimum(np.searchsorted(idx, shared, sorter=order), len(idx) - 1)]
    return pred[hit] if np.array_equal(idx[hit], shared) else None


def _agrees(onnx_path: Path, images: torch.Tensor, classes: np.ndarray) -> bool:
    """Whether the file gives `classes` on a random sample of SPOT_CHECK_IMAGES of the images."""
    pick = np.sort(
        np.random.default_rng().choice(
            len(images), replace=False, size=min(SPOT_CHECK_IMAGES, len(images))
        )
    )
    return bool(np.array_equal(predict(onnx_path, images[pick]), classes[pick]))


def classes_of(
    store: tracking.Store,
    run_id: str,
    onnx_path: Path,
    images: torch.Tensor,
    shared: np.ndarray,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, str]:
    """A model's classes on the shared images, and where they came from: `known` (this flow
    run's own evaluation of the file), else the run's record of this very model if it holds
    them all and the file agrees with it on a sample, else the file run here."""
    found = _look_up(known, shared)
    if found is not None:
        return found, "this run's evaluation of the file"
    found = _look_up(recorded_predictions(store, run_id, onnx_path), shared)
    if found is None:
        return predict(onnx_path, images), "the file, run here"
    if not _agrees(onnx_path, images, found):
        log.warning(
            "run %s's %s disagrees with its model on a sample: the model is run",
            run_id,
            PREDICTIONS_FILE,
        )
        return predict(onnx_path, images), (
            f"the file, run here (run {run_id}'s {PREDICTIONS_FILE} disagreed with it)"
        )
    return found, (
        f"run {run_id}'s {PREDICTIONS_FILE} (the file agreed on "
        f"{min(SPOT_CHECK_IMAGES, len(images))} sampled images)"
    )
