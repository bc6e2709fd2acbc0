"""A whole training run on one root folder: data -> split -> train -> evaluate -> plots, results.

Root layout (everything a run writes lands under the root it is given):
    data/       downloaded and extracted archives (a mirror folder is read in place)
    splits/     index files of each split, named by sizes, seed and hash
    runs/NAME/  checkpoint, resolved config, results.json, learning curves and confusion PNGs
A run's folder is named after its preset and config hash, so re-running the same config resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.config import DataConfig, RunConfig
from cifarlab.data import OFFICIAL_FILE_MD5, Cifar10, data_fingerprint, load_cifar10, prepare_cifar10
from cifarlab.evaluate import EvalResult, evaluate
from cifarlab.plots import plot_confusion, plot_learning_curves
from cifarlab.split import Split, save_split, stratified_split
from cifarlab.tensors import resolve_device, resolve_precision
from cifarlab.train import EpochHook, TrainResult, train


@dataclass
class DataBundle:
    """Verified data in memory with its identity."""

    folder: Path
    data: Cifar10
    fingerprint: str


@dataclass
class RunOutcome:
    """Everything a finished run produced."""

    config: RunConfig
    run_dir: Path
    data: DataBundle
    split: Split
    split_dir: Path
    trained: TrainResult
    val: EvalResult
    test: EvalResult
    files: dict[str, Path]

    def summary(self) -> dict[str, Any]:
        """JSON-ready results: the numbers a person or a tracker wants."""
        return {
            "preset": self.config.preset,
            "model": self.config.model.name,
            "device": self.trained.device,
            "epochs_completed": self.trained.epochs_completed,
            "stopped_early": self.trained.stopped_early,
            "train_seconds": round(self.trained.train_seconds, 2),
            "images_per_second": round(np.median([h.images_per_second
                                                  for h in self.trained.history]), 1),
            "val_accuracy": self.val.accuracy,
            "val_loss": self.val.loss,
            "test_accuracy": self.test.accuracy,
            "test_loss": self.test.loss,
            "test_per_class_accuracy": dict(zip(self.data.data.class_names,
                                                self.test.per_class_accuracy, strict=True)),
            "tta": self.config.train.tta,
            "trained_on": f"train split ({len(self.split.train_idx)} images)",
            "data_fingerprint": self.data.fingerprint,
            "split_sha256": self.split.digest,
            "history": [asdict(h) for h in self.trained.history],
        }


def config_hash(config: RunConfig) -> str:
    """Short stable hash of a resolved config."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def load_data(cfg: DataConfig, root: Path) -> DataBundle:
    """Fetch (or find) and verify the files, then load them."""
    sums = cfg.checksums or OFFICIAL_FILE_MD5
    folder = prepare_cifar10(Path(root) / "data", cfg.source, checksums=sums,
                             retries=cfg.download_retries, backoff_s=cfg.download_backoff_s)
    return DataBundle(folder=folder, data=load_cifar10(folder), fingerprint=data_fingerprint(sums))


def make_split(cfg: DataConfig, bundle: DataBundle, root: Path) -> tuple[Split, Path]:
    """The configured stratified split, saved under root/splits."""
    n = len(bundle.data.train_labels)
    if cfg.train_size + cfg.val_size > n:
        raise ValueError(f"train_size + val_size = {cfg.train_size + cfg.val_size} exceeds the "
                         f"{n} training images in {bundle.folder}")
    split = stratified_split(bundle.data.train_labels.numpy(), cfg.train_size, cfg.val_size,
                             cfg.split_seed)
    return split, save_split(split, Path(root) / "splits", bundle.fingerprint)


def run_experiment(config: RunConfig, root: Path, *, hooks: Sequence[EpochHook] = (),
                   progress: Callable[[int, int], None] | None = None,
                   run_dir: Path | None = None) -> RunOutcome:
    """Train and evaluate one config; results and plots land in its run folder."""
    root = Path(root)
    run_dir = Path(run_dir or root / "runs" / f"{config.preset}-{config_hash(config)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    bundle = load_data(config.data, root)
    split, split_dir = make_split(config.data, bundle, root)
    d = bundle.data
    trained = train(config, d.train_images[split.train_idx], d.train_labels[split.train_idx],
                    d.train_images[split.val_idx], d.train_labels[split.val_idx], run_dir,
                    hooks=hooks, progress=progress)

    device = resolve_device(config.train.device)
    opts = dict(device=device, tta=config.train.tta, channels_last=config.train.channels_last,
                amp_dtype=resolve_precision(config.train.precision, device))
    val = evaluate(trained.model, d.train_images[split.val_idx], d.train_labels[split.val_idx],
                   **opts)
    test = evaluate(trained.model, d.test_images, d.test_labels, **opts)

    files = {
        "config": run_dir / "config.json",
        "learning_curves": plot_learning_curves(trained.history, run_dir / "learning_curves.png"),
        "confusion_matrix": plot_confusion(test.confusion, d.class_names,
                                           run_dir / "confusion_matrix.png"),
        "split": split_dir,
    }
    outcome = RunOutcome(config, run_dir, bundle, split, split_dir, trained, val, test, files)
    files["results"] = run_dir / "results.json"
    files["results"].write_text(json.dumps(outcome.summary(), indent=2) + "\n")
    return outcome
