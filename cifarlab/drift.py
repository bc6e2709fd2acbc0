"""What a served model sees against what it was registered with: the reference and the tests.

The reference (`reference`) is computed when a run is evaluated, on its validation images as
the served file answers them, and logged with the run (`monitoring/reference.npz`): each image's
class probabilities, out-of-distribution score and the per-channel mean and spread of its 32x32
input, the same quantities every answer's record carries (serving/records.py).

`compare` tests a window of records against it, with scipy's tests:
  - the predicted classes' mix: chi-square against the reference's mix;
  - each class probability (black-box shift detection) and the confidence: two-sample
    Kolmogorov-Smirnov;
  - the out-of-distribution rate: binomial test against the reference's rate;
  - the image statistics (mean and spread per channel): Kolmogorov-Smirnov;
and adjusts the p-values for testing many things at once (Benjamini-Hochberg). A test fires
when its adjusted p-value is under `alpha`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cifarlab.ood import OodReference, pixels_of

ALPHA = 0.01
CHANNELS = ("r", "g", "b")


def reference(
    val_logits: np.ndarray, val_x: np.ndarray, ood: OodReference
) -> dict[str, np.ndarray]:
    """The arrays a version's answers are later compared with (validation images)."""
    z = val_logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    px = pixels_of(val_x).reshape(len(val_x), 3, -1)
    return {
        "probabilities": p.astype(np.float32),
        "ood_score": ood.scores(val_logits, val_x).astype(np.float32),
        "ood_threshold": np.float32(ood.threshold),
        "image_mean": px.mean(axis=2).astype(np.float32),
        "image_std": px.std(axis=2).astype(np.float32),
    }


def window_arrays(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The same arrays from prediction records (`kind: prediction`)."""
    preds = [r for r in records if r.get("kind", "prediction") == "prediction"]
    return {
        "probabilities": np.asarray([r["probabilities"] for r in preds], np.float32),
        "ood_score": np.asarray(
            [np.nan if r.get("ood_score") is None else r["ood_score"] for r in preds], np.float32
        ),
        "image_mean": np.asarray([r["image"]["mean"] for r in preds], np.float32),
        "image_std": np.asarray([r["image"]["std"] for r in preds], np.float32),
    }


@dataclass(frozen=True)
class Test:
    name: str  # e.g. "class_mix", "probability.cat", "image_mean.r"
    statistic: float
    p_value: float
    p_corrected: float = float("nan")
    fired: bool = False


@dataclass(frozen=True)
class Verdict:
    drift: bool
    images: int
    tests: list[Test]
    summary: dict[str, float]  # the window's class mix, mean confidence, OOD rate ...

    @property
    def fired(self) -> list[str]:
        return [t.name for t in self.tests if t.fired]


def _tests(
    ref: Mapping[str, np.ndarray], win: Mapping[str, np.ndarray], names: Sequence[str]
) -> list[Test]:
    from scipy import stats

    out = []
    k = ref["probabilities"].shape[1]
    ref_mix = np.bincount(ref["probabilities"].argmax(1), minlength=k) + 0.5  # no empty class
    win_counts = np.bincount(win["probabilities"].argmax(1), minlength=k)
    expected = ref_mix / ref_mix.sum() * win_counts.sum()
    chi = stats.chisquare(win_counts, expected)
    out.append(Test("class_mix", float(chi.statistic), float(chi.pvalue)))
    for c, name in enumerate(names):
        ks = stats.ks_2samp(win["probabilities"][:, c], ref["probabilities"][:, c])
        out.append(Test(f"probability.{name}", float(ks.statistic), float(ks.pvalue)))
    ks = stats.ks_2samp(win["probabilities"].max(1), ref["probabilities"].max(1))
    out.append(Test("confidence", float(ks.statistic), float(ks.pvalue)))
    scored = win["ood_score"][~np.isnan(win["ood_score"])]
    if len(scored):
        ref_rate = float(np.mean(ref["ood_score"] > ref["ood_threshold"]))
        flagged = int(np.sum(scored > ref["ood_threshold"]))
        bt = stats.binomtest(flagged, len(scored), ref_rate, alternative="greater")
        out.append(Test("ood_rate", flagged / len(scored), float(bt.pvalue)))
    for key in ("image_mean", "image_std"):
        for c, ch in enumerate(CHANNELS):
            ks = stats.ks_2samp(win[key][:, c], ref[key][:, c])
            out.append(Test(f"{key}.{ch}", float(ks.statistic), float(ks.pvalue)))
    return out


def compare(
    ref: Mapping[str, np.ndarray],
    win: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    alpha: float = ALPHA,
) -> Verdict:
    """Test a window against the reference, the p-values adjusted over all the tests by
    Benjamini-Hochberg (scipy). With every null true that bounds the chance of any alarm by
    `alpha` for independent or positively dependent tests; these are not all so (the class
    probabilities sum to one), so the false-alarm rate is measured rather than assumed
    (benchmarks/drift_bench.py: no alarm in 20 clean windows)."""
    from scipy import stats

    if len(win["probabilities"]) == 0:
        raise ValueError("the window holds no answers to test")
    raw = _tests(ref, win, class_names)
    corrected = stats.false_discovery_control([t.p_value for t in raw], method="bh")
    tests = [
        Test(t.name, t.statistic, t.p_value, float(q), bool(q < alpha))
        for t, q in zip(raw, corrected)
    ]
    probs = win["probabilities"]
    mix = np.bincount(probs.argmax(1), minlength=len(class_names)) / len(probs)
    scored = win["ood_score"][~np.isnan(win["ood_score"])]
    summary = {
        **{f"class_share.{n}": float(s) for n, s in zip(class_names, mix)},
        "confidence_mean": float(probs.max(1).mean()),
        "ood_rate": float(np.mean(scored > ref["ood_threshold"])) if len(scored) else float("nan"),
    }
    return Verdict(any(t.fired for t in tests), len(probs), tests, summary)
