"""Champion vs challenger: McNemar p, the paired interval, per-class tables, figures, report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cifarlab.compare import (
    compare,
    disagreement_gallery,
    mcnemar_exact,
    paired_test,
    plot_confusion_diff,
    report_markdown,
)
from cifarlab.constants import CLASS_NAMES


def _exact_p(b: int, c: int) -> float:
    """Reference in exact integers: 2 * sum_{i<=min} C(n, i) / 2**n, rounded once to a float."""
    n = b + c
    term = tail = math.comb(n, 0)
    for i in range(min(b, c)):  # C(n, i + 1) = C(n, i) * (n - i) / (i + 1), exact in integers
        term = term * (n - i) // (i + 1)
        tail += term
    assert term == math.comb(n, min(b, c))  # the recurrence really gave binomial coefficients
    return min(1.0, 2 * tail / 2**n)


def _paired_arrays(both: int, only_champ: int, only_chall: int, neither: int):
    """Labels and two predictions with the given agreement counts (wrong answer = label + 1)."""
    n = both + only_champ + only_chall + neither
    labels = np.arange(n) % 10
    wrong = (labels + 1) % 10
    champ_right = np.r_[np.ones(both + only_champ, bool), np.zeros(only_chall + neither, bool)]
    chall_right = np.r_[
        np.ones(both, bool),
        np.zeros(only_champ, bool),
        np.ones(only_chall, bool),
        np.zeros(neither, bool),
    ]
    return labels, np.where(champ_right, labels, wrong), np.where(chall_right, labels, wrong)


@pytest.mark.parametrize(
    "b,c,expected",
    [
        (0, 6, 0.03125),  # 2 * 0.5**6
        (6, 0, 0.03125),
        (1, 9, 0.021484375),  # 2 * (1 + 10) / 2**10
        (5, 15, 43400 / 2**20),  # 2 * (1 + 20 + 190 + 1140 + 4845 + 15504) / 2**20
        (5, 5, 1.0),  # 2 * P(X <= 5) > 1 for X ~ Bin(10, 1/2): capped
        (0, 1, 1.0),
        (0, 0, 1.0),  # no discordant pairs: no evidence either way
    ],
)
def test_mcnemar_known_values(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_large_counts_stable_and_exact():
    p = mcnemar_exact(4000, 4200)
    assert math.isfinite(p) and 0.0 < p < 1.0
    assert p == mcnemar_exact(4200, 4000)
    assert p == pytest.approx(_exact_p(4000, 4200), rel=1e-9)
    # Where 2**-n underflows a float: 20,000 discordant pairs, both balanced and lopsided.
    assert mcnemar_exact(10_000, 10_000) == 1.0
    tiny = mcnemar_exact(9_000, 11_000)
    assert 0.0 < tiny < 1e-40
    assert tiny == pytest.approx(_exact_p(9_000, 11_000), rel=1e-9)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_paired_test_counts_interval_and_p():
    labels, champ, chall = _paired_arrays(both=60, only_champ=5, only_chall=15, neither=20)
    t = paired_test(labels, champ, chall)
    assert (t.n, t.champion_correct, t.challenger_correct) == (100, 65, 75)
    assert (t.only_champion, t.only_challenger) == (5, 15)
    assert t.accuracy_diff == pytest.approx(0.10)
    # se = sqrt(b + c - (c - b)**2 / n) / n = sqrt(19) / 100; z(0.975) = 1.959964
    half = 1.959963984540054 * math.sqrt(19) / 100
    assert t.ci_low == pytest.approx(0.10 - half, rel=1e-9)
    assert t.ci_high == pytest.approx(0.10 + half, rel=1e-9)
    assert t.ci_low == pytest.approx(0.0145664, abs=1e-6)
    assert t.ci_low < t.accuracy_diff < t.ci_high
    assert t.p_value == mcnemar_exact(5, 15)
    d = t.as_dict()
    assert d["only_challenger"] == 15 and d["p_value"] == t.p_value and len(d) == 9
    # A wider confidence level gives a wider interval around the same difference.
    wide = paired_test(labels, champ, chall, confidence=0.99)
    assert wide.ci_low < t.ci_low and wide.ci_high > t.ci_high


def test_paired_test_interval_clipped_and_sign():
    labels, champ, chall = _paired_arrays(both=0, only_champ=4, only_chall=0, neither=0)
    t = paired_test(labels, champ, chall)
    assert t.accuracy_diff == -1.0 and t.ci_low == -1.0 and t.ci_high <= 1.0
    assert t.p_value == pytest.approx(2 * 0.5**4)


@pytest.mark.parametrize(
    "labels,champ,chall,needle",
    [
        ([0, 1, 2], [0, 1], [0, 1, 2], "length"),
        ([], [], [], "empty"),
        ([0, 1, 10], [0, 1, 2], [0, 1, 2], "outside"),
        ([0.0, 1.0], [0, 1], [0, 1], "integer"),
    ],
)
def test_bad_inputs_raise(labels, champ, chall, needle):
    for call in (
        lambda: paired_test(labels, champ, chall),
        lambda: compare(labels, champ, chall, "a", "b"),
    ):
        with pytest.raises(ValueError, match=needle):
            call()


def _small():
    labels = np.array([0, 0, 1, 1, 2, 2])
    champ = np.array([0, 1, 1, 1, 2, 0])
    chall = np.array([0, 0, 1, 2, 2, 2])
    return compare(labels, champ, chall, "v3 (champion)", "v4 (challenger)")


def test_compare_per_class_and_confusion():
    cmp = _small()
    rows = {r["class"]: r for r in cmp.per_class}
    assert [r["class"] for r in cmp.per_class] == list(CLASS_NAMES)
    assert (
        rows["airplane"]["n"],
        rows["airplane"]["champion_acc"],
        rows["airplane"]["challenger_acc"],
        rows["airplane"]["delta"],
    ) == (2, 0.5, 1.0, 0.5)
    assert (rows["automobile"]["champion_acc"], rows["automobile"]["delta"]) == (1.0, -0.5)
    assert rows["bird"]["delta"] == 0.5
    assert rows["cat"]["n"] == 0 and math.isnan(rows["cat"]["delta"])

    expected_champ = np.zeros((10, 10), int)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0)]:
        expected_champ[t, p] += 1
    expected_chall = np.zeros((10, 10), int)
    for t, p in [(0, 0), (0, 0), (1, 1), (1, 2), (2, 2), (2, 2)]:
        expected_chall[t, p] += 1
    assert np.array_equal(cmp.champion_confusion, expected_champ)
    assert np.array_equal(cmp.challenger_confusion, expected_chall)
    assert (cmp.test.champion_correct, cmp.test.challenger_correct) == (4, 5)
    assert (cmp.test.only_champion, cmp.test.only_challenger) == (1, 2)


def _opens_as_png(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


def test_plot_confusion_diff_writes_png(tmp_path):
    out = plot_confusion_diff(_small(), tmp_path / "diff.png")
    assert out == tmp_path / "diff.png"
    width, height = _opens_as_png(out)
    assert width > 300 and height > 300


def _with_disagreements(count: int, n: int = 200):
    """n images where the two predictions differ on exactly `count` of them."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, n)
    champ = labels.copy()
    chall = labels.copy()
    chall[:count] = (labels[:count] + 1) % 10
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return compare(labels, champ, chall, "v3 (champion)", "v4 (challenger)"), images


@pytest.mark.parametrize("count,shown", [(100, 64), (3, 3), (0, 0)])
def test_disagreement_gallery_count(tmp_path, count, shown):
    cmp, images = _with_disagreements(count)
    path, n_shown = disagreement_gallery(cmp, images, tmp_path / "gallery.png")
    assert path == tmp_path / "gallery.png" and n_shown == shown
    _opens_as_png(path)


def test_disagreement_gallery_limit_and_shape_check(tmp_path):
    cmp, images = _with_disagreements(100)
    small_path, small_n = disagreement_gallery(cmp, images, tmp_path / "a.png", limit=10)
    big_path, big_n = disagreement_gallery(cmp, images, tmp_path / "b.png", limit=64)
    assert (small_n, big_n) == (10, 64)
    assert _opens_as_png(small_path)[1] < _opens_as_png(big_path)[1]  # fewer rows
    with pytest.raises(ValueError, match="shape"):
        disagreement_gallery(cmp, images[:-1], tmp_path / "c.png")


def test_report_markdown_contents():
    labels, champ, chall = _paired_arrays(both=14, only_champ=0, only_chall=6, neither=0)
    cmp = compare(labels, champ, chall, "v3 (champion)", "v4 (challenger)")
    decision = "challenger promoted: higher accuracy on the 20 shared images"
    md = report_markdown(
        cmp,
        decision,
        extra_rows=[("split digest", "abc123")],
        images={"Confusion difference": "confusion_diff.png", "Disagreements": "gallery.png"},
    )
    assert md.startswith("# Champion vs challenger")
    assert decision in md
    assert "v3 (champion)" in md and "v4 (challenger)" in md
    assert "0.03125" in md  # McNemar p for b = 0, c = 6
    assert "| split digest | abc123 |" in md
    assert "![Confusion difference](confusion_diff.png)" in md
    assert "![Disagreements](gallery.png)" in md
    # labels 0..9 repeat, so 2 images per class; the 6 challenger-only images are labels 4..9,
    # the first of each of those classes (index 14..19 -> classes 4..9): 50 % -> 100 %.
    assert "| airplane | 2 | 100.00 | 100.00 | +0.00 |" in md
    assert "| deer | 2 | 50.00 | 100.00 | +50.00 |" in md
    assert md.count("\n| ") >= 10 + 9  # ten per-class rows and the overall table
    # the extra row sits in the overall table, before the per-class table
    assert md.index("split digest") < md.index("| class |")
