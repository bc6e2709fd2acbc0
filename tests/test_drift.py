"""The drift tests (cifarlab/drift.py) on windows of real prediction records, written by the
service's own log writer, against a reference computed as at registration."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cifarlab import drift, ood
from cifarlab.constants import CLASS_NAMES
from serving.logfiles import read_records
from serving.preprocess import to_model_input
from serving.records import Answer, LogSettings, PredictionLog


class _Img:
    format, width, height, mode = "PNG", 32, 32, "RGB"


def _images(n: int, seed: int, brightness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Blocky random 'photos' (uint8 HWC) and a label per image from its mean colour."""
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 180, (n, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
    px = np.clip((base + rng.normal(0, 8, base.shape)) * brightness, 0, 255).astype(np.uint8)
    labels = (px.reshape(n, -1).mean(1) // 8).astype(int) % 10
    return px, labels


def _logits(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (len(labels), 10)) + 4 * np.eye(10)[labels]


@pytest.fixture(scope="module")
def ref():
    fit_px, fit_y = _images(1000, 0)
    val_px, val_y = _images(2000, 1)
    fit_x, val_x = to_model_input(fit_px), to_model_input(val_px)
    oodref = ood.fit(_logits(fit_y, 2), fit_x, _logits(val_y, 3), val_x)
    return drift.reference(_logits(val_y, 3), val_x, oodref), oodref


def _window(tmp_path, px: np.ndarray, logits: np.ndarray, oodref) -> dict:
    """Records of these answers as the service writes them, read back and turned to arrays."""
    log = PredictionLog(LogSettings(tmp_path), CLASS_NAMES).start()
    x = to_model_input(px)
    z = np.exp(logits - logits.max(1, keepdims=True))
    probs = z / z.sum(1, keepdims=True)
    scores = oodref.scores(logits, x)
    for i in range(len(px)):
        log.add(Answer(time.time(), f"r{i}", False, {"version": "1"}, probs[i : i + 1], px[i : i + 1],
                       [_Img()], [(float(scores[i]), bool(scores[i] <= oodref.threshold))], 0.001))  # fmt: skip
    log.close()
    return drift.window_arrays(list(read_records(tmp_path)))


def test_the_reference_measures_images_as_the_records_do(ref, tmp_path):
    px, y = _images(50, 7)
    win = _window(tmp_path, px, _logits(y, 8), ref[1])
    again = drift.reference(_logits(y, 8), to_model_input(px), ref[1])
    np.testing.assert_allclose(win["image_mean"], again["image_mean"], atol=0.01)
    np.testing.assert_allclose(win["image_std"], again["image_std"], atol=0.01)
    np.testing.assert_allclose(win["ood_score"], again["ood_score"], atol=1e-3)


def test_a_window_like_the_reference_raises_no_alarm(ref, tmp_path):
    px, y = _images(500, 11)
    verdict = drift.compare(ref[0], _window(tmp_path, px, _logits(y, 12), ref[1]), CLASS_NAMES)
    assert not verdict.drift, [(t.name, t.p_corrected) for t in verdict.tests if t.fired]
    assert verdict.images == 500 and len(verdict.tests) == 1 + 10 + 1 + 1 + 6


@pytest.mark.parametrize("shift, expect", [
    ("brighter", "image_mean.r"),
    ("two_classes", "class_mix"),
    ("noise", "ood_rate"),
])  # fmt: skip
def test_shifted_windows_are_flagged_by_the_right_test(ref, tmp_path, shift, expect):
    px, y = _images(500, 21, brightness=1.4 if shift == "brighter" else 1.0)
    if shift == "two_classes":  # only the two classes of the first two images
        px, y = _images(4000, 22)
        keep = np.isin(y, y[:2])
        px, y = px[keep][:500], y[keep][:500]
    if shift == "noise":
        px = np.random.default_rng(23).integers(0, 256, px.shape, dtype=np.uint8)
    verdict = drift.compare(ref[0], _window(tmp_path, px, _logits(y, 24), ref[1]), CLASS_NAMES)
    assert verdict.drift and expect in verdict.fired, verdict.fired


def test_an_empty_window_is_refused(ref):
    empty = {k: np.empty((0, *v.shape[1:])) for k, v in ref[0].items() if k != "ood_threshold"}
    with pytest.raises(ValueError, match="no answers"):
        drift.compare(ref[0], empty, CLASS_NAMES)
