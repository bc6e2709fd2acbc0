"""The champion rule: a new registry version takes the alias `champion` only when its exported
model beats the champion's exported model on images that neither of them trained on.

1. Both models are the ONNX files the endpoint would serve, run by onnxruntime.
2. The images are the validation images the two runs share: the whole validation split when
   their split hashes match, else the intersection of the two validation index sets (each run's
   split is recomputed from its recorded sizes and seed and checked against its recorded hash).
   Fewer than `min_shared_images` (default 2,000): no verdict, the alias stays where it is.
3. Promotion: higher accuracy on those images; with `min_significance` also McNemar's exact
   p-value below it. The test set plays no part.

Each run records the classes its ONNX file gives its validation images, with the model's
SHA-256 (`val_predictions.npz`, written where the flow evaluates that file). A comparison reads
a model's classes from that record when it was made for the very model it compares, covers the
shared images and agrees with the file on a random sample of them; otherwise (a run from before
records, other images, a record that disagrees) it runs the file. The version's tags say which.

Every verdict is written on the new version (tags) and, with a comparison, as a report (markdown,
confusion-difference heat map, gallery of disagreements) in the challenger's MLflow run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab import compare as cmp
from cifarlab.constants import CLASS_NAMES
from cifarlab.arrays import Cifar10
from cifarlab.export import onnx_logits
from cifarlab.split import stratified_split
from registry import tracking, versions

MIN_SHARED_IMAGES = 2000
REPORT_FOLDER = "champion_comparison"
PREDICTIONS_FILE = "val_predictions.npz"
SPOT_CHECK_IMAGES = 256  # a record is believed only if its file gives the same classes on these

log = logging.getLogger(__name__)


class SplitUnknown(RuntimeError):
    """A run's validation images cannot be reconstructed from what it recorded."""


@dataclass
class Verdict:
    """What the rule decided for one new version, and on what evidence."""

    promote: bool
    reason: str
    champion_version: str | None = None
    comparison: cmp.Comparison | None = None
    shared_idx: np.ndarray | None = field(default=None, repr=False)
    classes_from: dict[str, str] = field(default_factory=dict)  # per side: record or run here

    def tags(self) -> dict[str, str]:
        """The verdict as registry version tags."""
        out = {"promotion": "champion" if self.promote else "not promoted",
               "promotion_reason": self.reason[:4000]}
        if self.champion_version is not None:
            out["compared_with_version"] = self.champion_version
        if self.shared_idx is not None:
            out["shared_images"] = str(len(self.shared_idx))
        out.update({f"{side}_classes_from": source[:500]
                    for side, source in self.classes_from.items()})
        if self.comparison is not None:
            t = self.comparison.test
            out.update({
                "shared_accuracy": f"{t.challenger_correct / t.n:.6f}",
                "champion_shared_accuracy": f"{t.champion_correct / t.n:.6f}",
                "accuracy_diff": f"{t.accuracy_diff:+.6f}",
                "accuracy_diff_ci95": f"[{t.ci_low:+.6f}, {t.ci_high:+.6f}]",
                "mcnemar_p": f"{t.p_value:.6g}",
                "disagreements": f"{t.only_champion}/{t.only_challenger}",
            })
        return out


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
        split = stratified_split(labels, int(p["data.train_size"]), int(p["data.val_size"]),
                                 int(p["data.split_seed"]))
    except (KeyError, ValueError) as exc:
        raise SplitUnknown(f"run {run.info.run_id} records no usable split ({exc})") from None
    if split.digest != recorded:
        raise SplitUnknown(f"run {run.info.run_id}: its split rebuilt here hashes to "
                           f"{split.digest[:12]}, but it recorded {recorded[:12]} (other data?)")
    return split


def shared_validation(champion: Any, challenger: Any, labels: np.ndarray) -> np.ndarray:
    """Indices held out from both runs' training: the shared split, else the intersection of
    the two validation sets (a validation image is never one of its own run's training images)."""
    theirs, mine = (r.data.tags.get("data_fingerprint") for r in (champion, challenger))
    if theirs is None or theirs != mine:
        raise SplitUnknown(f"the champion was trained on other data (data_fingerprint {theirs} "
                           f"vs {mine}): their images cannot be matched")
    mine = validation_indices(challenger, labels)
    if champion.data.tags.get("split_sha256") == challenger.data.tags["split_sha256"]:
        return mine
    return np.intersect1d(mine, validation_indices(champion, labels))


def _predict(onnx_path: Path, images: torch.Tensor) -> np.ndarray:
    return onnx_logits(onnx_path, images).argmax(axis=1)


def _model_digest(onnx_path: Path) -> str:
    """SHA-256 of the ONNX model's content (its protobuf as onnx re-serialises it), so the
    registry's copy, which MLflow saves again, matches the file it was made from."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def record_predictions(store: tracking.Store, run_id: str, onnx_path: Path,
                       val_idx: np.ndarray, pred: np.ndarray) -> None:
    """Save the classes `onnx_path` gives the validation images `val_idx` (indices into the
    training set) as the run's artifact PREDICTIONS_FILE, with the model's digest."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PREDICTIONS_FILE
        np.savez_compressed(path, val_idx=np.asarray(val_idx, dtype=np.int64),
                            pred=np.asarray(pred, dtype=np.int16),
                            onnx_digest=np.array(_model_digest(onnx_path)))
        store.client.log_artifact(run_id, str(path))


def recorded_predictions(store: tracking.Store, run_id: str, onnx_path: Path,
                         num_classes: int = len(CLASS_NAMES)) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices, classes) that the run recorded for this very model; None when it recorded
    none, recorded them for another model, or the record is not two matching integer arrays."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = store.client.download_artifacts(run_id, PREDICTIONS_FILE, tmp)
            with np.load(local) as z:
                digest, idx, pred = str(z["onnx_digest"]), z["val_idx"], z["pred"]
    except Exception:  # noqa: BLE001 - no usable record: the file is run instead
        return None
    well_formed = (idx.ndim == pred.ndim == 1 and len(idx) == len(pred) > 0
                   and idx.dtype.kind in "iu" and pred.dtype.kind in "iu"
                   and idx.min() >= 0 and 0 <= pred.min() and pred.max() < num_classes)
    if not well_formed or digest != _model_digest(onnx_path):
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
    pick = np.sort(np.random.default_rng().choice(len(images), replace=False,
                                                  size=min(SPOT_CHECK_IMAGES, len(images))))
    return bool(np.array_equal(_predict(onnx_path, images[pick]), classes[pick]))


def _classes(store: tracking.Store, run_id: str, onnx_path: Path, images: torch.Tensor,
             shared: np.ndarray, known: tuple[np.ndarray, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, str]:
    """A model's classes on the shared images, and where they came from: `known` (this flow
    run's own evaluation of the file), else the run's record of this very model if it holds
    them all and the file agrees with it on a sample, else the file run here."""
    found = _look_up(known, shared)
    if found is not None:
        return found, "this run's evaluation of the file"
    found = _look_up(recorded_predictions(store, run_id, onnx_path), shared)
    if found is None:
        return _predict(onnx_path, images), "the file, run here"
    if not _agrees(onnx_path, images, found):
        log.warning("run %s's %s disagrees with its model on a sample: the model is run",
                    run_id, PREDICTIONS_FILE)
        return _predict(onnx_path, images), (f"the file, run here (run {run_id}'s "
                                             f"{PREDICTIONS_FILE} disagreed with it)")
    return found, (f"run {run_id}'s {PREDICTIONS_FILE} (the file agreed on "
                   f"{min(SPOT_CHECK_IMAGES, len(images))} sampled images)")


def judge(store: tracking.Store, challenger_run_id: str, challenger_onnx: Path, data: Cifar10,
          min_shared_images: int = MIN_SHARED_IMAGES, min_significance: float | None = None,
          name: str = tracking.REGISTERED_MODEL,
          known: tuple[np.ndarray, np.ndarray] | None = None) -> Verdict:
    """Compare a new model with the current champion on their shared validation images.
    `known` = (validation indices, the challenger's predictions on them), when its evaluation
    has already run the same file over them: those are not computed again."""
    champion = versions.champion_version(store, name)
    if champion is None:
        return Verdict(True, "first version of the model: champion by default")
    from mlflow.exceptions import MlflowException

    client = store.client
    labels = data.train_labels.numpy()
    try:
        shared = shared_validation(client.get_run(champion.run_id),
                                   client.get_run(challenger_run_id), labels)
    except (SplitUnknown, MlflowException) as exc:
        return Verdict(False, f"not compared with champion v{champion.version}: {exc}",
                       champion.version)
    if len(shared) < min_shared_images:
        return Verdict(False, f"only {len(shared)} validation images are held out from both "
                       f"this model and champion v{champion.version} (at least "
                       f"{min_shared_images} needed): the alias stays", champion.version,
                       shared_idx=shared)
    images, truth = data.train_images[shared], labels[shared]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            champion_onnx = versions.download_onnx(store, versions.version_uri(store, champion),
                                                   Path(tmp))
            champion_pred, champion_from = _classes(store, champion.run_id, champion_onnx,
                                                    images, shared)
    except Exception as exc:  # noqa: BLE001 - a broken champion must not block every new run
        return Verdict(False, f"not compared: champion v{champion.version}'s model could not be "
                       f"fetched or run ({type(exc).__name__}: {exc})"[:2000], champion.version,
                       shared_idx=shared)
    challenger_pred, challenger_from = _classes(store, challenger_run_id, challenger_onnx,
                                                images, shared, known)
    comparison = cmp.compare(truth, champion_pred, challenger_pred,
                             f"v{champion.version} (champion)", "this model (challenger)")
    classes_from = {"champion": champion_from, "challenger": challenger_from}
    t = comparison.test
    stats = (f"{100 * t.challenger_correct / t.n:.2f} % vs {100 * t.champion_correct / t.n:.2f} % "
             f"on {t.n} shared validation images (difference {100 * t.accuracy_diff:+.2f} points, "
             f"95 % CI [{100 * t.ci_low:+.2f}, {100 * t.ci_high:+.2f}], McNemar p = "
             f"{t.p_value:.3g})")
    if t.challenger_correct <= t.champion_correct:
        return Verdict(False, f"not better than champion v{champion.version}: {stats}",
                       champion.version, comparison, shared, classes_from)
    if min_significance is not None and not t.p_value < min_significance:
        return Verdict(False, f"better than champion v{champion.version} but not significant "
                       f"at p < {min_significance}: {stats}", champion.version, comparison, shared,
                       classes_from)
    return Verdict(True, f"beats champion v{champion.version}: {stats}", champion.version,
                   comparison, shared, classes_from)


def log_report(store: tracking.Store, run_id: str, verdict: Verdict, data: Cifar10,
               version: str) -> str | None:
    """The champion-vs-challenger report (markdown + PNGs) as artifacts of the challenger's
    run; returns the markdown (None without a comparison)."""
    c = verdict.comparison
    if c is None:
        return None
    c.challenger_name = f"v{version} (challenger)"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        diff = cmp.plot_confusion_diff(c, folder / "confusion_diff.png")
        gallery, shown = cmp.disagreement_gallery(c, data.train_images[verdict.shared_idx].numpy(),
                                                  folder / "disagreements.png")
        decision = ("challenger promoted to champion: " if verdict.promote else
                    "challenger not promoted: ") + verdict.reason
        markdown = cmp.report_markdown(c, decision, extra_rows=[
            ("images in the gallery", f"{shown} of {c.test.only_champion + c.test.only_challenger}"
                                      " disagreements"),
            ("models compared", "the exported ONNX files, run by onnxruntime"),
            *((f"{side}'s classes from", source)
              for side, source in verdict.classes_from.items()),
        ], images={"Confusion matrix difference": diff.name, "Disagreements": gallery.name})
        (folder / "report.md").write_text(markdown)
        for path in (folder / "report.md", diff, gallery):
            store.client.log_artifact(run_id, str(path), artifact_path=REPORT_FOLDER)
    return markdown


@dataclass
class Registered:
    """A registered version with its verdict, report and model card."""

    registration: versions.Registration
    verdict: Verdict
    report_markdown: str | None
    model_card: str


def register(store: tracking.Store, run_id: str, model_uri: str, onnx_path: Path, data: Cifar10,
             *, tags: dict[str, str], min_shared_images: int = MIN_SHARED_IMAGES,
             min_significance: float | None = None, model_id: str | None = None,
             card_extra: tuple[tuple[str, str], ...] = (),
             name: str = tracking.REGISTERED_MODEL,
             known: tuple[np.ndarray, np.ndarray] | None = None,
             champion_tags: Callable[[], dict[str, str]] | None = None,
             lock: AbstractContextManager[Any] | None = None) -> Registered:
    """Judge the run's exported model against the champion, add it to the registry as
    `champion` or `challenger` with the verdict on its tags, log the comparison report and the
    model card (also the version's description).

    The model is judged before the registry lock is taken; under it, the verdict stands if
    the champion is still the one it was judged against, else it is judged again.

    `champion_tags`: work only a champion needs (its int8 twin), whose tags go on the version
    with the others, so that no host ever sees the champion without them. It is done before
    the lock when the first verdict promotes (the lock is held for the registration's seconds,
    not that work's), and under it only if a verdict given again there promotes where the
    first did not.

    `lock`: held while the version is created and the alias moved, so that registrations of
    this model name happen one at a time (the flows pass a Prefect concurrency lease shared by
    every host, flows/locks.py; a single process may pass a threading.Lock)."""
    first = judge(store, run_id, onnx_path, data, min_shared_images, min_significance, name,
                  known)
    prepared = champion_tags() if champion_tags is not None and first.promote else None
    # One registration at a time for this model name, across every host: two runs finishing
    # together are registered one after the other, the second against the first's verdict.
    with lock if lock is not None else contextlib.nullcontext():
        versions.drop_unfinished_versions(store, run_id, name)
        current = versions.champion_version(store, name)
        judged_against = None if first.champion_version is None else str(first.champion_version)
        if judged_against != (None if current is None else str(current.version)):
            first = judge(store, run_id, onnx_path, data, min_shared_images, min_significance,
                          name, known)  # the champion moved since: judged against the new one
        return _register(store, run_id, model_uri, first, tags=tags,
                         min_shared_images=min_shared_images, min_significance=min_significance,
                         model_id=model_id, card_extra=card_extra, name=name,
                         champion_tags=champion_tags, prepared=prepared, data=data)


def _register(store: tracking.Store, run_id: str, model_uri: str, verdict: Verdict, *,
              data: Cifar10, tags: dict[str, str], min_shared_images: int,
              min_significance: float | None, model_id: str | None,
              card_extra: tuple[tuple[str, str], ...], name: str,
              champion_tags: Callable[[], dict[str, str]] | None,
              prepared: dict[str, str] | None) -> Registered:
    from registry.modelcard import CARD_FILE, model_card, registry_description

    if verdict.promote and champion_tags is not None:
        tags = {**tags, **(prepared if prepared is not None else champion_tags())}
    settings = {"min_shared_images": str(min_shared_images),
                "min_significance": str(min_significance) if min_significance else "none"}
    version = versions.create_version(store, run_id, model_uri, {**tags, **verdict.tags(),
                                      **settings}, name, model_id)
    alias = tracking.CHAMPION if verdict.promote else tracking.CHALLENGER
    # Report and card first, the alias last: a failure before it leaves a version marked
    # unfinished (removed by the run's next registration) and the run FAILED, never a champion
    # without its explanation.
    report = log_report(store, run_id, verdict, data, version)
    card = model_card(store.client.get_run(run_id), name=name, version=version, alias=alias,
                      verdict=verdict.reason, extra=card_extra,
                      config=_resolved_config(store, run_id))
    store.client.update_model_version(name, version, description=registry_description(card))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CARD_FILE
        path.write_text(card)
        store.client.log_artifact(run_id, str(path))
    versions.set_alias(store, run_id, version, alias, name)
    reg = versions.Registration(name, version, alias, verdict.champion_version, verdict.reason)
    return Registered(reg, verdict, report, card)


def _resolved_config(store: tracking.Store, run_id: str) -> dict[str, Any] | None:
    """The run's resolved_config.json artifact (typed values), or None where it has none."""
    import json

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(store.client.download_artifacts(
                run_id, "resolved_config.json", tmp)).read_text())
    except Exception:  # noqa: BLE001 - the card then falls back to the run's params
        return None
