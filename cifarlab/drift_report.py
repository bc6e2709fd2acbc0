"""What the drift monitor shows a person: a window's statistics over time, their plots and the
report page (cifarlab/drift.py holds the tests).

`series` cuts a window of records into time bins: per bin the class mix, the mean confidence,
the out-of-distribution rate, and the live accuracy from feedback (the share of labelled
answers the model got right, with a Wilson 95 % interval: scipy's binomial test). `plot_series`
draws them in one PNG; `html_report` writes one self-contained page (the PNG inline) with the
verdict and every test.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.drift import Verdict
from cifarlab.plots import pyplot


def parse_time(text: str) -> float:
    """A record's ISO time (serving/records.py) as a POSIX timestamp."""
    return datetime.fromisoformat(text).timestamp()


@dataclass
class Series:
    """Per time bin (its start, POSIX seconds): answers, class shares, confidence, OOD rate, and
    from feedback: labels, correct ones, the accuracy and its 95 % interval."""

    start: list[float] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    class_share: list[list[float]] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    ood_rate: list[float] = field(default_factory=list)
    labelled: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    accuracy: list[tuple[float, float, float]] = field(default_factory=list)  # value, low, high

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: an empty bin's values are null."""

        def clean(v: Any) -> Any:
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return None if isinstance(v, float) and np.isnan(v) else v

        return {k: clean(v) for k, v in self.__dict__.items()}


def accuracy_interval(correct: int, labelled: int) -> tuple[float, float, float]:
    """The share right and its Wilson 95 % interval (nan without labels)."""
    from scipy import stats

    if labelled == 0:
        return (float("nan"),) * 3
    ci = stats.binomtest(correct, labelled).proportion_ci(0.95, method="wilson")
    return correct / labelled, float(ci.low), float(ci.high)


def series(
    predictions: Sequence[Mapping[str, Any]],
    feedback: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    start: float,
    end: float,
    bins: int = 12,
    ood_threshold: float | None = None,
) -> Series:
    """The window [start, end) in `bins` equal bins. Feedback counts in the bin of the answer it
    labels (its `answered` time, or the first bin for an answer older than the window), so
    accuracy lines up with what the model saw then."""
    edges = np.linspace(start, end, bins + 1)
    out = Series(start=[float(e) for e in edges[:-1]])
    p_time = np.array([parse_time(r["time"]) for r in predictions], dtype=float)
    p_bin = np.clip(np.searchsorted(edges, p_time, side="right") - 1, 0, bins - 1)
    label_ids = {n: i for i, n in enumerate(class_names)}
    f_time = np.array([parse_time(r.get("answered") or r["time"]) for r in feedback], dtype=float)
    f_bin = np.clip(np.searchsorted(edges, f_time, side="right") - 1, 0, bins - 1)
    for b in range(bins):
        rows = [r for r, k in zip(predictions, p_bin) if k == b]
        mix = np.bincount([label_ids[r["label"]] for r in rows], minlength=len(class_names))
        out.answers.append(len(rows))
        out.class_share.append((mix / len(rows)).tolist() if rows else [float("nan")] * len(mix))
        out.confidence.append(
            float(np.mean([r["confidence"] for r in rows])) if rows else float("nan")
        )
        flags = [
            r["in_distribution"] is False for r in rows if r.get("in_distribution") is not None
        ]
        out.ood_rate.append(float(np.mean(flags)) if flags else float("nan"))
        given = [r for r, k in zip(feedback, f_bin) if k == b]
        right = sum(bool(r.get("correct")) for r in given)
        out.labelled.append(len(given))
        out.correct.append(right)
        out.accuracy.append(accuracy_interval(right, len(given)))
    return out


def plot_series(s: Series, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Four panels over the window: class mix (stacked), confidence, OOD rate, live accuracy."""
    plt = pyplot()
    seen = [i for i, n in enumerate(s.answers) if n]  # bins without answers are left out
    t = [datetime.fromtimestamp(s.start[i], UTC) for i in seen]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    shares = np.array([s.class_share[i] for i in seen]).reshape(len(seen), -1).T
    axes[0].stackplot(t, shares, labels=class_names, step="post")
    axes[0].set_ylabel("class mix")
    axes[0].legend(fontsize=6, ncol=5, loc="upper center", bbox_to_anchor=(0.5, 1.35))
    axes[1].plot(t, [s.confidence[i] for i in seen], marker="o")
    axes[1].set_ylabel("mean confidence")
    axes[2].plot(t, [s.ood_rate[i] for i in seen], marker="o", color="tab:red")
    axes[2].set_ylabel("not CIFAR-10 (share)")
    labelled = [i for i, n in enumerate(s.labelled) if n]
    acc = np.array([s.accuracy[i] for i in labelled], dtype=float).reshape(-1, 3)
    t_acc = [datetime.fromtimestamp(s.start[i], UTC) for i in labelled]
    axes[3].errorbar(t_acc, acc[:, 0], yerr=[acc[:, 0] - acc[:, 1], acc[:, 2] - acc[:, 0]],
                     marker="o", color="tab:green", capsize=3)  # fmt: skip
    axes[3].set_ylabel("live accuracy\n(feedback, 95 % CI)")
    axes[3].set_ylim(0, 1)
    axes[3].set_xlabel("UTC")
    for ax in axes[:3]:
        ax.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10, y=0.995)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def verdict_rows(verdict: Verdict) -> list[dict[str, Any]]:
    """One row per test, most significant first (for tables)."""
    rows = [
        {
            "test": t.name,
            "statistic": round(t.statistic, 4),
            "p": float(f"{t.p_value:.3g}"),
            "p_adjusted": float(f"{t.p_corrected:.3g}"),
            "fired": t.fired,
        }
        for t in verdict.tests
    ]
    return sorted(rows, key=lambda r: r["p_adjusted"])


def html_report(verdict: Verdict, context: Mapping[str, Any], plot_png: Path | None) -> str:
    """One page: the verdict, the window, every test, the plots."""
    state = "DRIFT" if verdict.drift else "no drift"
    head = ", ".join(verdict.fired) if verdict.fired else "no test fired"
    facts = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in context.items()
    )
    tests = "".join(
        f"<tr class={'fired' if r['fired'] else 'quiet'}><td>{html.escape(r['test'])}</td>"
        f"<td>{r['statistic']}</td><td>{r['p']:.3g}</td><td>{r['p_adjusted']:.3g}</td>"
        f"<td>{'yes' if r['fired'] else ''}</td></tr>"
        for r in verdict_rows(verdict)
    )
    img = ""
    if plot_png is not None:
        data = base64.b64encode(Path(plot_png).read_bytes()).decode()
        img = f'<h2>Over the window</h2><img alt="time series" src="data:image/png;base64,{data}">'
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Drift: {state}</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto}}
table{{border-collapse:collapse}}td,th{{padding:.2rem .6rem;border-bottom:1px solid #ddd;
text-align:left}}.fired{{background:#fde2e2}}.verdict{{font-size:1.4rem}}</style></head><body>
<h1>CIFAR-10 drift monitor</h1><p class="verdict"><b>{state}</b>: {html.escape(head)}</p>
<table>{facts}</table><h2>Tests (Benjamini-Hochberg adjusted, fire under alpha)</h2>
<table><tr><th>test</th><th>statistic</th><th>p</th><th>p adjusted</th><th>fired</th></tr>
{tests}</table>{img}</body></html>
"""
