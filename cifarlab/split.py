"""Seeded, stratified train/validation split of the 50,000 training images, saved as index files.

The official 10,000 test images are never part of a split: they are reported, never used to choose.
A split is identified by a content hash of its indices, so a run records exactly which images it saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Split:
    """Indices into the training set; `digest` hashes both index arrays."""

    train_idx: np.ndarray  # int64 (train_size,)
    val_idx: np.ndarray  # int64 (val_size,)
    seed: int

    @property
    def digest(self) -> str:
        """sha256 over the two index arrays (order matters: it is the order on disk)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.train_idx, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.ascontiguousarray(self.val_idx, dtype=np.int64).tobytes())
        return h.hexdigest()


def _proportional(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of `total` proportional to `counts`, summing exactly to `total`."""
    exact = counts * total / counts.sum()
    share = np.floor(exact).astype(np.int64)
    # Largest remainders get the leftover units; ties go to the lower class id (stable sort).
    order = np.argsort(-(exact - share), kind="stable")
    share[order[: total - share.sum()]] += 1
    return np.minimum(share, counts)


def stratified_split(labels: np.ndarray, train_size: int, val_size: int, seed: int) -> Split:
    """Split indices so that every class keeps its share in both parts; same seed, same split."""
    labels = np.asarray(labels)
    n = len(labels)
    if train_size < 1:
        raise ValueError(f"train_size must be at least 1, got {train_size}")
    if val_size < 1:
        raise ValueError(f"val_size must be at least 1, got {val_size}")
    if train_size + val_size > n:
        raise ValueError(
            f"train_size + val_size = {train_size + val_size} exceeds the {n} training images"
        )
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    val_counts = _proportional(counts, val_size)
    train_counts = _proportional(counts - val_counts, train_size)
    train_parts, val_parts = [], []
    for cls, n_val, n_train in zip(classes, val_counts, train_counts, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val : n_val + n_train])
    # Shuffle across classes so that a prefix of either part is itself roughly stratified.
    train_idx = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
    val_idx = rng.permutation(np.concatenate(val_parts)).astype(np.int64)
    return Split(train_idx=train_idx, val_idx=val_idx, seed=seed)


def save_split(split: Split, folder: Path, data_fingerprint: str = "") -> Path:
    """Write `train_idx.npy`, `val_idx.npy` and `split.json` (sizes, seed, hash) into a folder.

    The folder is named after the sizes, seed and hash, so two different splits never share one.
    Returns the folder. Writing is idempotent.
    """
    name = (
        f"train{len(split.train_idx)}-val{len(split.val_idx)}-seed{split.seed}-{split.digest[:12]}"
    )
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    for fname, arr in (("train_idx.npy", split.train_idx), ("val_idx.npy", split.val_idx)):
        tmp = out / f".{fname}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        tmp.replace(out / fname)
    meta = {
        "train_size": len(split.train_idx),
        "val_size": len(split.val_idx),
        "seed": split.seed,
        "sha256": split.digest,
        "data_fingerprint": data_fingerprint,
    }
    (out / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_split(folder: Path) -> Split:
    """Read a split written by `save_split`, checking its hash against `split.json`."""
    folder = Path(folder)
    meta = json.loads((folder / "split.json").read_text())
    split = Split(
        train_idx=np.load(folder / "train_idx.npy"),
        val_idx=np.load(folder / "val_idx.npy"),
        seed=int(meta["seed"]),
    )
    if split.digest != meta["sha256"]:
        raise ValueError(
            f"split in {folder} has hash {split.digest}, split.json says {meta['sha256']}"
        )
    return split
