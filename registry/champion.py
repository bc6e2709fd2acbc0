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
from cifarlab.arrays import Cifar10
from registry import tracking, versions
from registry.predictions import SplitUnknown, classes_of, shared_validation

MIN_SHARED_IMAGES = 2000
REPORT_FOLDER = "champion_comparison"

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """What the rule decided for one new version, and on what evidence."""

    promote: bool
    reason: str
    champion_version: str | None = None
    comparison: cmp.Comparison | None = None
    shared_idx: np.ndarray | None = field(default=None, repr=False)
    classes_from: dict[str, str] = field(default_factory=dict)  # per side: record or run here
    unfetched: bool = False  # the champion's files did not come (an outage, or broken files)

    def tags(self) -> dict[str, str]:
        """The verdict as registry version tags."""
        out = {
            "promotion": "champion" if self.promote else "not promoted",
            "promotion_reason": self.reason[:4000],
        }
        if self.champion_version is not None:
            out["compared_with_version"] = self.champion_version
        if self.shared_idx is not None:
            out["shared_images"] = str(len(self.shared_idx))
        out.update(
            {f"{side}_classes_from": source[:500] for side, source in self.classes_from.items()}
        )
        if self.comparison is not None:
            t = self.comparison.test
            out.update(
                {
                    "shared_accuracy": f"{t.challenger_correct / t.n:.6f}",
                    "champion_shared_accuracy": f"{t.champion_correct / t.n:.6f}",
                    "accuracy_diff": f"{t.accuracy_diff:+.6f}",
                    "accuracy_diff_ci95": f"[{t.ci_low:+.6f}, {t.ci_high:+.6f}]",
                    "mcnemar_p": f"{t.p_value:.6g}",
                    "disagreements": f"{t.only_champion}/{t.only_challenger}",
                }
            )
        return out


def judge(
    store: tracking.Store,
    challenger_run_id: str,
    challenger_onnx: Path,
    data: Cifar10,
    min_shared_images: int = MIN_SHARED_IMAGES,
    min_significance: float | None = None,
    name: str = tracking.REGISTERED_MODEL,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> Verdict:
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
        shared = shared_validation(
            client.get_run(champion.run_id), client.get_run(challenger_run_id), labels
        )
    except (SplitUnknown, MlflowException) as exc:
        return Verdict(
            False, f"not compared with champion v{champion.version}: {exc}", champion.version
        )
    if len(shared) < min_shared_images:
        return Verdict(
            False,
            f"only {len(shared)} validation images are held out from both "
            f"this model and champion v{champion.version} (at least "
            f"{min_shared_images} needed): the alias stays",
            champion.version,
            shared_idx=shared,
        )
    images, truth = data.train_images[shared], labels[shared]
    try:
        champion_pred, champion_from = _champion_classes(store, champion, images, shared)
    except Exception as exc:  # noqa: BLE001 - a broken champion must not block every new run
        why = f"could not be fetched or run ({type(exc).__name__}: {exc})"
        return Verdict(
            False,
            f"not compared: champion v{champion.version}'s model {why}"[:2000],
            champion.version,
            shared_idx=shared, unfetched=True,
        )  # fmt: skip
    challenger_pred, challenger_from = classes_of(
        store, challenger_run_id, challenger_onnx, images, shared, known
    )
    comparison = cmp.compare(
        truth,
        champion_pred,
        challenger_pred,
        f"v{champion.version} (champion)",
        "this model (challenger)",
    )
    classes_from = {"champion": champion_from, "challenger": challenger_from}
    return _decide(comparison, champion.version, min_significance, shared, classes_from)


def _champion_classes(
    store: tracking.Store, champion: Any, images: torch.Tensor, shared: np.ndarray
) -> tuple[np.ndarray, str]:
    """The champion's classes on the shared images: from its run's record, else its file run."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx = versions.download_onnx(store, versions.version_uri(store, champion), Path(tmp))
        return classes_of(store, champion.run_id, onnx, images, shared)


def _decide(
    comparison: Any,
    champion_version: Any,  # as the registry gives it (MLflow: an int), kept on the verdict
    min_significance: float | None,
    shared: np.ndarray,
    classes_from: dict[str, str],
) -> Verdict:
    """Promote on more correct shared images (and McNemar's p below `min_significance`)."""
    t = comparison.test
    stats = (
        f"{100 * t.challenger_correct / t.n:.2f} % vs {100 * t.champion_correct / t.n:.2f} % "
        f"on {t.n} shared validation images (difference {100 * t.accuracy_diff:+.2f} points, "
        f"95 % CI [{100 * t.ci_low:+.2f}, {100 * t.ci_high:+.2f}], McNemar p = "
        f"{t.p_value:.3g})"
    )
    if t.challenger_correct <= t.champion_correct:
        reason, promote = f"not better than champion v{champion_version}: {stats}", False
    elif min_significance is not None and not t.p_value < min_significance:
        reason, promote = (
            (
                f"better than champion v{champion_version} but not significant "
                f"at p < {min_significance}: {stats}"
            ),
            False,
        )
    else:
        reason, promote = f"beats champion v{champion_version}: {stats}", True
    return Verdict(promote, reason, champion_version, comparison, shared, classes_from)


def log_report(
    store: tracking.Store, run_id: str, verdict: Verdict, data: Cifar10, version: str
) -> str | None:
    """The champion-vs-challenger report (markdown + PNGs) as artifacts of the challenger's
    run; returns the markdown (None without a comparison)."""
    c = verdict.comparison
    if c is None:
        return None
    c.challenger_name = f"v{version} (challenger)"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        diff = cmp.plot_confusion_diff(c, folder / "confusion_diff.png")
        gallery, shown = cmp.disagreement_gallery(
            c, data.train_images[verdict.shared_idx].numpy(), folder / "disagreements.png"
        )
        decision = (
            "challenger promoted to champion: " if verdict.promote else "challenger not promoted: "
        ) + verdict.reason
        markdown = cmp.report_markdown(
            c,
            decision,
            extra_rows=[
                (
                    "images in the gallery",
                    f"{shown} of {c.test.only_champion + c.test.only_challenger} disagreements",
                ),
                ("models compared", "the exported ONNX files, run by onnxruntime"),
                *(
                    (f"{side}'s classes from", source)
                    for side, source in verdict.classes_from.items()
                ),
            ],
            images={"Confusion matrix difference": diff.name, "Disagreements": gallery.name},
        )
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


def register(
    store: tracking.Store,
    run_id: str,
    model_uri: str,
    onnx_path: Path,
    data: Cifar10,
    *,
    tags: dict[str, str],
    min_shared_images: int = MIN_SHARED_IMAGES,
    min_significance: float | None = None,
    model_id: str | None = None,
    card_extra: tuple[tuple[str, str], ...] = (),
    name: str = tracking.REGISTERED_MODEL,
    known: tuple[np.ndarray, np.ndarray] | None = None,
    champion_tags: Callable[[], dict[str, str]] | None = None,
    lock: AbstractContextManager[Any],
) -> Registered:
    """Judge the run's exported model against the champion, register it as `champion` or
    `challenger` with the verdict on its tags, log the report and model card (also its description).

    The model is judged before the registry lock is taken; under it, the verdict stands if
    the champion is still the one it was judged against, else it is judged again.

    `champion_tags`: work only a champion needs (its int8 twin), whose tags go on the version
    with the others, so that no host ever sees the champion without them. It is done before
    the lock when the first verdict promotes (the lock is held for the registration's seconds,
    not that work's), and under it only if a verdict given again there promotes where the
    first did not.

    `lock` (required): held while the version is created and the alias moved, so that
    registrations of this model name happen one at a time (the flows pass a Prefect lease
    shared by every host, flows/locks.py; one process may pass a threading.Lock).

    The artifact store must answer first and under the lock, with brief MLflow retries
    meanwhile (versions.brief_retries): a dead store fails it before any version exists."""
    versions.require_artifact_store(store, run_id)  # a dead one fails now, in seconds
    with versions.brief_retries():
        first = judge(store, run_id, onnx_path, data, min_shared_images, min_significance, name,
                      known)  # fmt: skip
        if first.unfetched:  # a dead store fails here; one back (or never gone) judges again
            versions.require_artifact_store(store, run_id)
            first = judge(store, run_id, onnx_path, data, min_shared_images, min_significance,
                          name, known)  # fmt: skip
        prepared = champion_tags() if champion_tags is not None and first.promote else None
        # One registration of this name at a time, across every host: two runs finishing
        # together are registered one after the other, the second against the first's verdict.
        with lock:
            versions.drop_unfinished_versions(store, run_id, name)
            current = versions.champion_version(store, name)
            judged_against = (None if first.champion_version is None
                              else str(first.champion_version))  # fmt: skip
            if judged_against != (None if current is None else str(current.version)):
                first = judge(store, run_id, onnx_path, data, min_shared_images,
                              min_significance, name, known)  # the champion moved  # fmt: skip
            versions.require_artifact_store(store, run_id)  # (the lock may have taken minutes)
            return _register(
                store, run_id, model_uri, first, tags=tags, min_shared_images=min_shared_images,
                min_significance=min_significance, model_id=model_id, card_extra=card_extra,
                name=name, champion_tags=champion_tags, prepared=prepared, data=data,
            )  # fmt: skip


def _register(
    store: tracking.Store,
    run_id: str,
    model_uri: str,
    verdict: Verdict,
    *,
    data: Cifar10,
    tags: dict[str, str],
    min_shared_images: int,
    min_significance: float | None,
    model_id: str | None,
    card_extra: tuple[tuple[str, str], ...],
    name: str,
    champion_tags: Callable[[], dict[str, str]] | None,
    prepared: dict[str, str] | None,
) -> Registered:
    from registry.modelcard import CARD_FILE, model_card, registry_description

    if verdict.promote and champion_tags is not None:
        tags = {**tags, **(prepared if prepared is not None else champion_tags())}
    settings = {
        "min_shared_images": str(min_shared_images),
        "min_significance": str(min_significance) if min_significance else "none",
    }
    version = versions.create_version(
        store, run_id, model_uri, {**tags, **verdict.tags(), **settings}, name, model_id
    )
    alias = tracking.CHAMPION if verdict.promote else tracking.CHALLENGER
    # Report and card first, the alias last: a failure before it leaves a version marked
    # unfinished (removed by the run's next registration) and the run FAILED, never a champion
    # without its explanation.
    report = log_report(store, run_id, verdict, data, version)
    card = model_card(
        store.client.get_run(run_id),
        name=name,
        version=version,
        alias=alias,
        verdict=verdict.reason,
        extra=card_extra,
        config=_resolved_config(store, run_id),
    )
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
            return json.loads(
                Path(
                    store.client.download_artifacts(run_id, "resolved_config.json", tmp)
                ).read_text()
            )
    except Exception:  # noqa: BLE001 - the card then falls back to the run's params
        return None
