"""Champion vs challenger on the same held-out images: paired test, plots and a Markdown report.

Both models answer the same images, so the fair test is a paired one: only the images where
exactly one model is right carry information (McNemar). Plain numpy + matplotlib, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from cifarlab.constants import CLASS_NAMES, NUM_CLASSES
from cifarlab.plots import pyplot


@dataclass
class PairedTest:
    """Counts, accuracy difference, its confidence interval and McNemar's p on shared images."""

    n: int  # shared images
    champion_correct: int
    challenger_correct: int
    only_champion: int  # b: champion right, challenger wrong
    only_challenger: int  # c: challenger right, champion wrong
    accuracy_diff: float  # challenger - champion accuracy, fraction
    ci_low: float
    ci_high: float
    p_value: float  # McNemar's exact two-sided test on the discordant pairs

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a flat dict of plain Python numbers (for MLflow or JSON)."""
        return asdict(self)


@dataclass(eq=False)  # arrays inside: element-wise == would make dataclass equality ambiguous
class Comparison:
    """Everything known about the two models' answers on the shared images."""

    labels: np.ndarray
    champion_pred: np.ndarray
    challenger_pred: np.ndarray
    champion_name: str
    challenger_name: str
    test: PairedTest
    per_class: list[dict]  # {"class", "n", "champion_acc", "challenger_acc", "delta"}
    champion_confusion: np.ndarray  # (10, 10) int, rows true, columns predicted
    challenger_confusion: np.ndarray


# ---------------------------------------------------------------------------------------------
# Statistics


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), max 1."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    # 2**-n underflows to 0 for n > 1074 and comb(n, k) overflows a float, so sum the
    # probabilities in log space; the largest term (i = k <= n/2) is factored out.
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(log_terms)
    log_tail = top + math.log(math.fsum(math.exp(t - top) for t in log_terms))
    return min(1.0, 2.0 * math.exp(log_tail))


def _as_labels(name: str, values) -> np.ndarray:
    """A 1-D integer array of class indices in [0, NUM_CLASSES), or ValueError naming `name`."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: nothing to compare")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= NUM_CLASSES:
        raise ValueError(f"{name} has values outside 0..{NUM_CLASSES - 1}")
    return arr.astype(np.int64, copy=False)


def _check_inputs(labels, champion_pred, challenger_pred) -> tuple[np.ndarray, ...]:
    """Validate the three arrays: integer classes, non-empty, all the same length."""
    arrays = (
        _as_labels("labels", labels),
        _as_labels("champion_pred", champion_pred),
        _as_labels("challenger_pred", challenger_pred),
    )
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(
            "labels, champion_pred and challenger_pred differ in length: "
            f"{[len(a) for a in arrays]} (both models must answer the same images)"
        )
    return arrays


def paired_test(labels, champion_pred, challenger_pred, confidence: float = 0.95) -> PairedTest:
    """McNemar's exact test and a Wald interval for the paired accuracy difference."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    labels, champ, chall = _check_inputs(labels, champion_pred, challenger_pred)
    champ_ok, chall_ok = champ == labels, chall == labels
    n = int(labels.size)
    b = int(np.sum(champ_ok & ~chall_ok))
    c = int(np.sum(chall_ok & ~champ_ok))
    diff = (c - b) / n
    # Variance of the paired difference: the concordant images cancel out, only b and c count.
    se = math.sqrt(max(0.0, b + c - (c - b) ** 2 / n)) / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return PairedTest(
        n=n,
        champion_correct=int(champ_ok.sum()),
        challenger_correct=int(chall_ok.sum()),
        only_champion=b,
        only_challenger=c,
        accuracy_diff=diff,
        ci_low=max(-1.0, diff - z * se),
        ci_high=min(1.0, diff + z * se),
        p_value=mcnemar_exact(b, c),
    )


def confusion_matrix(labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(NUM_CLASSES, NUM_CLASSES) counts, rows true class, columns predicted class."""
    flat = np.bincount(labels * NUM_CLASSES + pred, minlength=NUM_CLASSES * NUM_CLASSES)
    return flat.reshape(NUM_CLASSES, NUM_CLASSES)


def _per_class(labels: np.ndarray, champ: np.ndarray, chall: np.ndarray) -> list[dict]:
    """Per-class accuracy of both models (fractions; NaN for a class with no images)."""
    rows = []
    for k, name in enumerate(CLASS_NAMES):
        mask = labels == k
        n = int(mask.sum())
        champ_acc = float(np.mean(champ[mask] == k)) if n else float("nan")
        chall_acc = float(np.mean(chall[mask] == k)) if n else float("nan")
        rows.append(
            {
                "class": name,
                "n": n,
                "champion_acc": champ_acc,
                "challenger_acc": chall_acc,
                "delta": chall_acc - champ_acc,
            }
        )
    return rows


def compare(
    labels, champion_pred, challenger_pred, champion_name: str, challenger_name: str
) -> Comparison:
    """Paired test, per-class accuracies and both confusion matrices on the shared images."""
    labels, champ, chall = _check_inputs(labels, champion_pred, challenger_pred)
    return Comparison(
        labels=labels,
        champion_pred=champ,
        challenger_pred=chall,
        champion_name=champion_name,
        challenger_name=challenger_name,
        test=paired_test(labels, champ, chall),
        per_class=_per_class(labels, champ, chall),
        champion_confusion=confusion_matrix(labels, champ),
        challenger_confusion=confusion_matrix(labels, chall),
    )


# ---------------------------------------------------------------------------------------------
# Figures


def plot_confusion_diff(cmp: Comparison, path: Path) -> Path:
    """Heat map of challenger minus champion confusion counts, the difference in each cell."""
    plt = pyplot()
    diff = cmp.challenger_confusion.astype(np.int64) - cmp.champion_confusion.astype(np.int64)
    limit = max(1, int(np.abs(diff).max()))  # symmetric limits keep white at exactly 0
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    image = ax.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=ax, shrink=0.8, label="images (challenger - champion)")
    ticks = range(NUM_CLASSES)
    ax.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true")
    # Say how to read the signs: more on the diagonal is better, more off it is worse.
    ax.set_title(
        f"Confusion difference: {cmp.challenger_name} minus {cmp.champion_name}\n"
        "diagonal > 0: challenger right more often; off-diagonal > 0: more mistakes",
        fontsize=10,
    )
    for i in ticks:
        for j in ticks:
            value = int(diff[i, j])
            ax.text(
                j,
                i,
                f"{value:+d}" if value else "0",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(value) > 0.6 * limit else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


_SCALE = 3  # nearest-neighbour upscaling: 32 px -> 96 px, big enough to see
_CELL_W = 32 * _SCALE + 20  # room for captions like "chall: automobile"
_CELL_H = 32 * _SCALE + 46  # image plus three caption lines
_HEADER_H = 44
_GREEN, _RED = "#1a7f37", "#cf222e"


def _no_disagreement_png(cmp: Comparison, path: Path) -> Path:
    """A small PNG that says there is nothing to show."""
    plt = pyplot()
    fig = plt.figure(figsize=(5, 1.2))
    fig.text(
        0.5,
        0.5,
        f"no disagreements between\n{cmp.champion_name} and {cmp.challenger_name}",
        ha="center",
        va="center",
        fontsize=11,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _mosaic(tiles: np.ndarray, cols: int, width: int) -> np.ndarray:
    """White canvas with each (32, 32, 3) tile upscaled and placed in its cell."""
    rows = math.ceil(len(tiles) / cols)
    canvas = np.full((_HEADER_H + rows * _CELL_H, width, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        big = tile.repeat(_SCALE, axis=0).repeat(_SCALE, axis=1)
        top = _HEADER_H + (i // cols) * _CELL_H + 2
        left = (i % cols) * _CELL_W + (_CELL_W - big.shape[1]) // 2
        canvas[top : top + big.shape[0], left : left + big.shape[1]] = big
    return canvas


def disagreement_gallery(
    cmp: Comparison, images: np.ndarray, path: Path, limit: int = 64, seed: int = 0
) -> tuple[Path, int]:
    """PNG grid of a seeded sample of images the two models answer differently; (path, count)."""
    images = np.asarray(images)
    if images.shape != (len(cmp.labels), 3, 32, 32):
        raise ValueError(
            f"images must have shape ({len(cmp.labels)}, 3, 32, 32) to match the "
            f"labels, got {images.shape}"
        )
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    differ = np.flatnonzero(cmp.champion_pred != cmp.challenger_pred)
    if differ.size == 0:
        return _no_disagreement_png(cmp, path), 0
    # A seeded shuffle, not the first indices: the gallery is a sample of all disagreements.
    chosen = np.random.default_rng(seed).permutation(differ)[:limit]
    cols = min(8, len(chosen))
    width = max(cols * _CELL_W, 520)  # wide enough for the header line
    canvas = _mosaic(images[chosen].transpose(0, 2, 3, 1).astype(np.uint8), cols, width)

    # Captions drawn straight onto the canvas with Pillow: far cheaper than a matplotlib text
    # object per caption (three per image), which cost more than the rest of a registration.
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=11)
    draw.multiline_text(
        (6, 4),
        f"{len(chosen)} of {differ.size} images where the models "
        f"disagree\nchamp = {cmp.champion_name}, chall = {cmp.challenger_name}; "
        "green = right, red = wrong",
        fill="black",
        font=font,
        spacing=3,
    )
    for slot, idx in enumerate(chosen):
        x = (slot % cols) * _CELL_W + _CELL_W / 2
        y = _HEADER_H + (slot // cols) * _CELL_H + 32 * _SCALE + 4
        truth = int(cmp.labels[idx])
        lines = [(f"true: {CLASS_NAMES[truth]}", "black")]
        for tag, pred in (("champ", cmp.champion_pred[idx]), ("chall", cmp.challenger_pred[idx])):
            lines.append((f"{tag}: {CLASS_NAMES[int(pred)]}", _GREEN if pred == truth else _RED))
        for row, (text, colour) in enumerate(lines):
            draw.text((x, y + 13 * row), text, fill=colour, font=font, anchor="ma")
    picture.save(path, format="PNG")
    return Path(path), int(len(chosen))


# ---------------------------------------------------------------------------------------------
# Report


def _cell(text: str) -> str:
    """Escape a pipe so a name or value cannot break the Markdown table."""
    return str(text).replace("|", "\\|")


def _format_p(p: float) -> str:
    """Four significant digits; tiny p-values in exponent form."""
    return f"{p:.4g}"


def _pct(fraction: float) -> str:
    """A fraction as a percentage with two decimals, or a dash when undefined."""
    return "—" if math.isnan(fraction) else f"{100 * fraction:.2f}"


def _points(fraction: float) -> str:
    """A difference of fractions as signed percentage points, or a dash when undefined."""
    return "—" if math.isnan(fraction) else f"{100 * fraction:+.2f}"


def report_markdown(
    cmp: Comparison,
    decision: str,
    extra_rows: Sequence[tuple[str, str]] = (),
    images: Mapping[str, str] | None = None,
) -> str:
    """Markdown report: decision, overall paired test, per-class accuracies and image links."""
    t = cmp.test
    level = "95 %"  # compare() always uses the default confidence
    rows = [
        ("shared images", f"{t.n:,}"),
        (
            f"accuracy, {cmp.champion_name}",
            f"{_pct(t.champion_correct / t.n)} % ({t.champion_correct:,} / {t.n:,})",
        ),
        (
            f"accuracy, {cmp.challenger_name}",
            f"{_pct(t.challenger_correct / t.n)} % ({t.challenger_correct:,} / {t.n:,})",
        ),
        ("difference (challenger - champion)", f"{_points(t.accuracy_diff)} points"),
        (f"{level} CI of the difference", f"[{_points(t.ci_low)}, {_points(t.ci_high)}] points"),
        ("McNemar exact p (two-sided)", _format_p(t.p_value)),
        ("only champion right (b)", f"{t.only_champion:,}"),
        ("only challenger right (c)", f"{t.only_challenger:,}"),
        *extra_rows,
    ]
    lines = [
        "# Champion vs challenger",
        "",
        f"**Decision:** {decision}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in rows]
    lines += [
        "",
        "## Per class",
        "",
        "| class | n | champion % | challenger % | delta (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['class']} | {r['n']:,} | {_pct(r['champion_acc'])} | "
        f"{_pct(r['challenger_acc'])} | {_points(r['delta'])} |"
        for r in cmp.per_class
    ]
    for title, file_name in (images or {}).items():
        lines += ["", f"## {title}", "", f"![{title}]({file_name})"]
    return "\n".join(lines) + "\n"
