"""The out-of-distribution score (cifarlab/ood.py): its statistics, its fit and its threshold."""

from __future__ import annotations

import numpy as np
import pytest

from cifarlab import ood
from cifarlab.constants import MEAN, STD


def _input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> the model's normalised input (N, 3, 32, 32)."""
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255
    return (x - np.asarray(MEAN, np.float32)[:, None, None]) / np.asarray(STD, np.float32)[
        :, None, None
    ]


def _photos(n: int, seed: int) -> np.ndarray:
    """Smooth random images with edges: a stand-in for photographs."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (n, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def test_roughness_ignores_contrast_and_separates_flat_and_noisy_images():
    photos = _photos(20, 0)
    darker = (photos * 0.6).astype(np.uint8)
    r, r_dark = ood.roughness(_input(photos)), ood.roughness(_input(darker))
    assert np.abs(r - r_dark).max() < 0.25  # a darker photo is as rough for its contrast
    flat = ood.roughness(_input(np.full((1, 32, 32, 3), 120, np.uint8)))
    noise = ood.roughness(
        _input(np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    )
    assert flat[0, 0] < r[:, 0].min() - 2  # nothing varies: log of ~0
    assert noise[0, 0] > r[:, 0].max() and noise[0, 0] - noise[0, 1] > (r[:, 0] - r[:, 1]).max()


def test_the_threshold_keeps_95_percent_of_validation_in_and_round_trips():
    rng = np.random.default_rng(0)
    fit_x, val_x = _input(_photos(500, 1)), _input(_photos(400, 2))
    fit_logits = rng.normal(0, 1, (500, 10)) + 6 * np.eye(10)[rng.integers(0, 10, 500)]
    val_logits = rng.normal(0, 1, (400, 10)) + 6 * np.eye(10)[rng.integers(0, 10, 400)]
    ref = ood.fit(fit_logits, fit_x, val_logits, val_x)
    scores = ref.scores(val_logits, val_x)
    assert np.mean(scores <= ref.threshold) == pytest.approx(0.95, abs=0.01) == ref.kept
    strange = _input(np.random.default_rng(3).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    assert (ref.scores(rng.normal(0, 1, (20, 10)), strange) > ref.threshold).all()
    again = ood.OodReference.from_json(ref.to_json())
    np.testing.assert_allclose(again.scores(val_logits, val_x), scores)
    with pytest.raises(ValueError, match="method 'other'"):
        ood.OodReference.from_json(ref.to_json().replace(ood.METHOD, "other"))
