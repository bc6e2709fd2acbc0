"""A whole run on one root folder: data -> split -> train -> export ONNX -> evaluate the export.

Root layout (everything a run writes lands under the root it is given):
    data/       downloaded and extracted archives (a mirror folder is read in place)
    splits/     index files of each split, named by sizes, seed and hash
    runs/NAME/  checkpoint, resolved config, model.onnx, results.json, learning curves and
                confusion PNGs
A run's folder is named after its preset and config hash, so re-running the same config resumes.

The accuracies a run reports are those of the exported ONNX file run by onnxruntime: the file
the endpoint serves. A test-time augmentation that is not baked into that file (`serve_tta`) is
measured on the PyTorch model and reported apart (`tta_val_accuracy`), never as the model's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab import labelled, ood
from cifarlab.arrays import Cifar10, load_cifar10
from cifarlab.config import DataConfig, RunConfig, identity_exclude
from cifarlab.data import OFFICIAL_FILE_MD5, data_fingerprint, prepare_cifar10
from cifarlab.evaluate import EvalResult, evaluate
from cifarlab.export import (
    ParityReport,
    check_parity,
    evaluate_onnx,
    export_onnx,
    model_input,
    onnx_logits,
    require_parity,
)
from cifarlab.history import EpochHook, TrainResult
from cifarlab.labelled import Labelled
from cifarlab.ood import OodReference
from cifarlab.plots import plot_confusion, plot_learning_curves
from cifarlab.split import Split, save_split, stratified_split
from cifarlab.tensors import resolve_device, resolve_precision
from cifarlab.train import train

PARITY_IMAGES = 1000  # validation images the ONNX export is checked on


@dataclass
class DataBundle:
    """Verified data in memory with its identity."""

    folder: Path
    data: Cifar10
    fingerprint: str


@dataclass
class TrainedRun:
    """A trained model with the data and split it was trained on (in memory)."""

    config: RunConfig
    run_dir: Path
    data: DataBundle
    split: Split
    split_dir: Path
    trained: TrainResult
    files: dict[str, Path] = field(default_factory=dict)
    extra: Labelled | None = None  # labelled images trained on beside the split (feedback)

    @property
    def val_images(self) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) validation images, in split order."""
        return self.data.data.train_images[self.split.val_idx]

    @property
    def val_labels(self) -> torch.Tensor:
        """Labels of `val_images`."""
        return self.data.data.train_labels[self.split.val_idx]


@dataclass
class Exported:
    """The ONNX file that will be served, and its agreement with PyTorch."""

    path: Path
    tta: str  # the test-time augmentation inside the graph ("none" unless serve_tta)
    parity: ParityReport


@dataclass
class Evaluation:
    """Accuracies of the exported file (onnxruntime) and, apart, of the unserved TTA."""

    val: EvalResult
    test: EvalResult
    tta: str  # the TTA measured apart on the PyTorch model ("none": not measured)
    tta_val: EvalResult | None = None
    tta_test: EvalResult | None = None
    ood: OodReference | None = None  # the served file's out-of-distribution reference


@dataclass
class RunOutcome:
    """Everything a finished run produced."""

    run: TrainedRun
    exported: Exported
    evaluation: Evaluation

    # Short names for the common reads.
    config = property(lambda self: self.run.config)
    run_dir = property(lambda self: self.run.run_dir)
    data = property(lambda self: self.run.data)
    split = property(lambda self: self.run.split)
    split_dir = property(lambda self: self.run.split_dir)
    trained = property(lambda self: self.run.trained)
    files = property(lambda self: self.run.files)
    val = property(lambda self: self.evaluation.val)
    test = property(lambda self: self.evaluation.test)

    def summary(self) -> dict[str, Any]:
        """JSON-ready results: the numbers a person or a tracker wants."""
        return summarise(self.run, self.exported, self.evaluation)


def summarise(run: TrainedRun, exported: Exported, ev: Evaluation) -> dict[str, Any]:
    """JSON-ready results of a run: accuracies are those of the exported file."""
    t = run.trained
    names = run.data.data.class_names
    return {
        "preset": run.config.preset,
        "model": run.config.model.name,
        "device": t.device,
        "epochs_completed": t.epochs_completed,
        "stopped_early": t.stopped_early,
        "train_seconds": round(t.train_seconds, 2),
        "images_per_second": round(float(np.median([h.images_per_second for h in t.history])), 1),
        "evaluated": f"ONNX file {exported.path.name} by onnxruntime (TTA in the graph: "
        f"{exported.tta})",
        "val_accuracy": ev.val.accuracy,
        "val_loss": ev.val.loss,
        "test_accuracy": ev.test.accuracy,
        "test_loss": ev.test.loss,
        "val_per_class_accuracy": dict(zip(names, ev.val.per_class_accuracy, strict=True)),
        "test_per_class_accuracy": dict(zip(names, ev.test.per_class_accuracy, strict=True)),
        "served_tta": exported.tta,
        "tta": ev.tta,  # measured apart, not served
        "tta_val_accuracy": ev.tta_val.accuracy if ev.tta_val else None,
        "tta_test_accuracy": ev.tta_test.accuracy if ev.tta_test else None,
        "parity": exported.parity.as_dict(),
        "trained_on": f"train split ({len(run.split.train_idx)} images)"
        + (f" + {len(run.extra)} labelled through feedback" if run.extra is not None else ""),
        "feedback_images": len(run.extra) if run.extra is not None else None,
        "feedback_images_dropped": run.extra.dropped if run.extra is not None else None,
        "val_images": len(run.split.val_idx),
        "data_fingerprint": run.data.fingerprint,
        "split_sha256": run.split.digest,
        "history": [asdict(h) for h in t.history],
    }


def config_hash(config: RunConfig) -> str:
    """Short stable hash of a resolved config."""
    text = json.dumps(
        config.model_dump(mode="json", exclude=identity_exclude(config)), sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def checksums_of(cfg: DataConfig) -> dict[str, str]:
    """The md5 of every file the config's data set must have."""
    return dict(cfg.checksums or OFFICIAL_FILE_MD5)


def load_data(cfg: DataConfig, root: Path, *, retries: int | None = None) -> DataBundle:
    """Fetch (or find) and verify the files, then load them: after the first time, one `stat`
    per file and the arrays this process holds or the root's memory-mapped copy of them
    (cifarlab.data). A failed download is retried `retries` times (default: the config's
    `download_retries`)."""
    sums = checksums_of(cfg)
    folder = prepare_cifar10(
        Path(root) / "data",
        cfg.source,
        checksums=sums,
        retries=cfg.download_retries if retries is None else retries,
        backoff_s=cfg.download_backoff_s,
    )
    return DataBundle(
        folder=folder,
        data=load_cifar10(folder, array_cache(root)),
        fingerprint=data_fingerprint(sums),
    )


def array_cache(root: Path) -> Path:
    """Where a root keeps the verified CIFAR-10 arrays as memory-mapped `.npy` files."""
    return Path(root) / "data" / ".arrays"


def make_split(cfg: DataConfig, bundle: DataBundle, root: Path) -> tuple[Split, Path]:
    """The configured stratified split, saved under root/splits."""
    n = len(bundle.data.train_labels)
    if cfg.train_size + cfg.val_size > n:
        raise ValueError(
            f"train_size + val_size = {cfg.train_size + cfg.val_size} exceeds the "
            f"{n} training images in {bundle.folder}"
        )
    split = stratified_split(
        bundle.data.train_labels.numpy(), cfg.train_size, cfg.val_size, cfg.split_seed
    )
    return split, save_split(split, Path(root) / "splits", bundle.fingerprint)


# ---------------------------------------------------------------------------------------------
# The steps of a run (the flow runs each as its own task)
# ---------------------------------------------------------------------------------------------


def train_run(
    config: RunConfig,
    root: Path,
    *,
    hooks: Sequence[EpochHook] = (),
    progress: Callable[[int, int], None] | None = None,
    run_dir: Path | None = None,
    download_retries: int | None = None,
) -> TrainedRun:
    """Load and split the data, train (resuming from the run folder's checkpoint), plot curves.
    `download_retries` overrides the config's (the flow passes 0: its fetch task retries)."""
    root = Path(root)
    run_dir = Path(run_dir or root / "runs" / f"{config.preset}-{config_hash(config)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    bundle = load_data(config.data, root, retries=download_retries)
    split, split_dir = make_split(config.data, bundle, root)
    d = bundle.data
    x, y = d.train_images[split.train_idx], d.train_labels[split.train_idx]
    extra = None
    if config.data.extra_train:
        held_out = (d.train_images[split.val_idx].numpy(), d.test_images.numpy())
        packed = labelled.resolve(config.data.extra_train, root)
        if not packed.is_file():
            raise FileNotFoundError(
                f"data.extra_train={config.data.extra_train!r}: no {packed} on this host (a "
                "retraining run logs it as its artifact feedback/<name>: put it there)"
            )
        extra = labelled.load(packed, held_out)
        x = torch.cat([x, torch.from_numpy(extra.images)])
        y = torch.cat([y, torch.from_numpy(extra.labels)])
    trained = train(
        config,
        x,
        y,
        d.train_images[split.val_idx],
        d.train_labels[split.val_idx],
        run_dir,
        hooks=hooks,
        progress=progress,
    )
    files = {
        "config": run_dir / "config.json",
        "learning_curves": plot_learning_curves(trained.history, run_dir / "learning_curves.png"),
        "split": split_dir,
    }
    return TrainedRun(config, run_dir, bundle, split, split_dir, trained, files, extra)


def export_run(run: TrainedRun, *, require: bool = True) -> Exported:
    """Export the model that will be served (with its TTA when `serve_tta`) and check parity
    with PyTorch on validation images; with `require`, a mismatch raises ParityError."""
    tta = run.config.train.tta if run.config.train.serve_tta else "none"
    path = export_onnx(run.trained.model, run.run_dir / "model.onnx", tta=tta)
    report = check_parity(
        run.trained.model,
        path,
        run.val_images[:PARITY_IMAGES],
        tta=tta,
        channels_last=run.config.train.channels_last,
    )
    if require:
        require_parity(report)
    return Exported(path, tta, report)


@dataclass
class EvalInputs:
    """The validation and test images as the exported file takes them, made once for every
    file run on them (the served one, its int8 twin)."""

    val: np.ndarray
    test: np.ndarray


def split_inputs(data: Cifar10, split: Split) -> EvalInputs:
    """The split's validation images and the test set, normalised (float32, 123 MB per 10,000
    images, held while they are in use, against 12 MB per 1,000-image batch when each file
    normalises its own)."""
    return EvalInputs(model_input(data.train_images[split.val_idx]), model_input(data.test_images))


def eval_inputs(run: TrainedRun) -> EvalInputs:
    """`split_inputs` of a trained run's data and split."""
    return split_inputs(run.data.data, run.split)


def evaluate_run(
    run: TrainedRun, exported: Exported, inputs: EvalInputs | None = None
) -> Evaluation:
    """Validation and test accuracy of the exported file; a TTA that is not served is measured
    on the PyTorch model and kept apart. `inputs`: the sets already normalised, if at hand."""
    d = run.data.data
    inputs = inputs or eval_inputs(run)
    val = evaluate_onnx(exported.path, inputs.val, run.val_labels)
    test = evaluate_onnx(exported.path, inputs.test, d.test_labels)
    ev = Evaluation(
        val, test, tta="none", ood=fit_ood(exported.path, d, run.split, val, inputs.val)
    )
    cfg = run.config.train
    if cfg.tta != "none" and not cfg.serve_tta:
        device = resolve_device(cfg.device)
        opts: dict[str, Any] = dict(
            device=device,
            tta=cfg.tta,
            channels_last=cfg.channels_last,
            amp_dtype=resolve_precision(cfg.precision, device),
        )
        ev.tta = cfg.tta
        ev.tta_val = evaluate(run.trained.model, run.val_images, run.val_labels, **opts)
        ev.tta_test = evaluate(run.trained.model, d.test_images, d.test_labels, **opts)
    run.files["confusion_matrix"] = plot_confusion(
        test.confusion,
        d.class_names,
        run.run_dir / "confusion_matrix.png",
        title="Confusion matrix (test, served ONNX model)",
    )
    return ev


OOD_FIT_IMAGES = 2000


def fit_ood(
    onnx_path: Path, data: Cifar10, split: Split, val: EvalResult, val_x: np.ndarray
) -> OodReference:
    """The served file's out-of-distribution reference (cifarlab/ood.py): its Gaussian and
    scales from OOD_FIT_IMAGES training-split images (a fixed draw), its threshold from the
    validation split it was just evaluated on (`val`, with its logits, and its input `val_x`)."""
    rng = np.random.default_rng(0)
    pick = np.sort(rng.permutation(split.train_idx)[:OOD_FIT_IMAGES])
    fit_x = model_input(data.train_images[pick])
    assert val.logits is not None  # evaluate_onnx keeps them
    return ood.fit(onnx_logits(onnx_path, fit_x), fit_x, val.logits, val_x)


def write_results(run: TrainedRun, exported: Exported, ev: Evaluation) -> Path:
    """results.json in the run folder."""
    path = run.run_dir / "results.json"
    path.write_text(json.dumps(summarise(run, exported, ev), indent=2) + "\n")
    run.files["results"] = path
    return path


def run_experiment(
    config: RunConfig,
    root: Path,
    *,
    hooks: Sequence[EpochHook] = (),
    progress: Callable[[int, int], None] | None = None,
    run_dir: Path | None = None,
) -> RunOutcome:
    """Train, export and evaluate one config; results and plots land in its run folder."""
    run = train_run(config, root, hooks=hooks, progress=progress, run_dir=run_dir)
    exported = export_run(run)
    evaluation = evaluate_run(run, exported)
    write_results(run, exported, evaluation)
    return RunOutcome(run, exported, evaluation)
