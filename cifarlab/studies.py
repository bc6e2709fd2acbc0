"""The ready-made sweeps: the lab report's studies (with the test accuracy it published per
point, cifarlab/report_figures.json) and the fast recipe's, each a base preset and a grid."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.config import DEFAULT_PRESET


class SweepError(ValueError):
    """A grid, study or scale that cannot make a sweep; the message names the culprit."""


@dataclass(frozen=True)
class Study:
    """A ready-made sweep: a base preset, the grid, and the report's published figures."""

    name: str
    preset: str
    grid: dict[str, list[Any]]
    description: str
    # Test accuracy (%) the lab report published for a point, keyed by the point's label.
    report: dict[str, float] = field(default_factory=dict)


def format_value(value: Any) -> str:
    """A grid value as a point label shows it: mappings as k=v/..., lists as AxBxC."""
    if isinstance(value, Mapping):
        return "/".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "x".join(format_value(v) for v in value)
    return str(value)


# The lab report's published figures per point (test accuracy %, its own machine), copied from
# the report into cifarlab/report_figures.json; `_report(study, key)` maps them onto point labels.
REPORT_FIGURES_FILE = Path(__file__).with_name("report_figures.json")
_SPLITS = [
    {"train_size": 36_000, "val_size": 10_000},
    {"train_size": 42_000, "val_size": 8_000},
    {"train_size": 45_000, "val_size": 5_000},
]


def report_figures() -> dict[str, Any]:
    """The report's studies as published (see the file's `source`)."""
    return json.loads(REPORT_FIGURES_FILE.read_text())["studies"]


def _report(study: str, label) -> dict[str, float]:
    """{point label: report test %} for one study; `label(point)` names the point or None."""
    out = {}
    for fig in report_figures()[study]["points"]:
        name = label(fig)
        if name is not None:
            out[name] = fig["test_accuracy"]
    return out


def _one(key: str, path: str):
    return lambda fig: f"{path}={format_value(fig[key])}"


def _depth_kernel_label(fig: Mapping[str, Any]) -> str | None:
    # The report compared its 4-conv net (seed-deep) at 3x3 and 1x1, and a 5-conv net that is
    # not in this project's model registry; its 1-conv 3x3 figure is the baseline's.
    if fig["convs"] != 4:
        return None
    return f"model.name=seed-deep, model.options.kernel_size={fig['kernel_size']}"


def _split_label(fig: Mapping[str, Any]) -> str:
    return "data=" + format_value({"train_size": fig["train_size"], "val_size": fig["val_size"]})


STUDIES: dict[str, Study] = {
    s.name: s
    for s in [
        Study(
            "report-lr",
            "seed-baseline",
            {"train.lr": [0.1, 0.001, 0.0008, 0.0005, 0.0004, 0.0003, 0.0001]},
            "learning rate at batch 32, 10 epochs (the report's study)",
            _report("lr", _one("lr", "train.lr")),
        ),
        Study(
            "report-batch-size",
            "seed-baseline",
            {"train.batch_size": [8, 16, 25, 32, 40]},
            "batch size at lr 4e-4, 10 epochs (the report's study)",
            _report("batch_size", _one("batch_size", "train.batch_size")),
        ),
        Study(
            "report-epochs",
            "seed-baseline",
            {"train.epochs": [2, 4, 7, 8, 10]},
            "epochs at lr 4e-4, batch 32 (the report's study)",
            _report("epochs", _one("epochs", "train.epochs")),
        ),
        Study(
            "report-depth-kernel",
            "seed-baseline",
            {"model.name": ["seed-baseline", "seed-deep"], "model.options.kernel_size": [3, 1]},
            "1 conv (seed-baseline) vs 4 convs (seed-deep), 3x3 vs 1x1 kernels (the report's study)",
            {
                **_report("depth_kernel", _depth_kernel_label),
                "model.name=seed-baseline, model.options.kernel_size=3": _report(
                    "lr", _one("lr", "train.lr")
                )["train.lr=0.0004"],
            },
        ),
        # The report ran its split study after the depth study, on the 4-conv net.
        Study(
            "report-split",
            "seed-deep",
            {"data": _SPLITS},
            "train/validation split sizes 36k/10k, 42k/8k, 45k/5k on the 4-conv net (the report's "
            "study)",
            _report("split", _split_label),
        ),
        Study(
            "fast-lr",
            DEFAULT_PRESET,
            {"train.lr": [0.2, 0.4, 0.75, 1.2, 2.0]},
            "learning rate of the fast recipe (default 0.75 on the CPU preset)",
        ),
        Study(
            "fast-batch-size",
            DEFAULT_PRESET,
            {"train.batch_size": [256, 512, 1024]},
            "batch size of the fast recipe (lr kept)",
        ),
        Study(
            "fast-epochs",
            DEFAULT_PRESET,
            {"train.epochs": [2, 4, 6, 8, 10]},
            "epochs of the fast recipe",
        ),
        Study(
            "fast-width",
            DEFAULT_PRESET,
            {"model.options.widths": [[32, 64, 64], [64, 128, 128], [64, 256, 256]]},
            "width of the fast net (its depth study: the block widths)",
        ),
        Study(
            "fast-optimizer",
            DEFAULT_PRESET,
            {"train.optimizer": ["sgd", "muon"], "train.epochs": [2, 6, 10]},
            "SGD against Muon for the filters (muon_lr default 0.24, tuned on 2-epoch runs; 0.1 "
            "did as well over 6 epochs; untried on the GPU preset), short and long schedules",
        ),
        Study("fast-split", DEFAULT_PRESET, {"data": _SPLITS}, "split sizes with the fast recipe"),
    ]
}
