"""Sweep logic without Prefect: grids, studies, scaling, statistics, tables and plots.
(The sweep through the real deployment path is in test_stack_e2e.py.)"""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest
from PIL import Image

from cifarlab import studies
from cifarlab import sweep as sw
from cifarlab.config import preset
from cifarlab.plots import plot_sweep


def test_grid_is_the_cartesian_product_with_labels():
    points = sw.expand("seed-baseline", {"train.lr": [0.001, 0.0004], "train.batch_size": [16, 32]})
    assert [p.label for p in points] == [
        "train.lr=0.001, train.batch_size=16",
        "train.lr=0.001, train.batch_size=32",
        "train.lr=0.0004, train.batch_size=16",
        "train.lr=0.0004, train.batch_size=32",
    ]
    assert points[1].overrides == {"train": {"lr": 0.001, "batch_size": 32}}
    assert len({p.key for p in points}) == 4


def test_section_values_set_several_fields_and_options_keep_the_presets():
    (p,) = sw.expand("seed-baseline", {"data": [{"train_size": 45000, "val_size": 5000}]})
    assert p.overrides["data"] == {"train_size": 45000, "val_size": 5000}
    (q,) = sw.expand("fast-cpu", {"model.options.widths": [[32, 64, 64]]})
    config = preset("fast-cpu", **q.overrides)
    assert list(config.model.options["widths"]) == [32, 64, 64]
    assert set(preset("fast-cpu").model.options) <= set(config.model.options)  # others kept


@pytest.mark.parametrize(
    "grid,message",
    [
        ({}, "empty"),
        ({"optimizer.lr": [1]}, "must start with"),
        ({"train.lr": 0.1}, "non-empty list"),
        ({"train.lr": [0.1, -1.0]}, "train.lr=-1.0"),
        ({"model.name": ["vgg"]}, "model.name=vgg"),
        ({"data": [5]}, "mappings of fields"),
    ],
)
def test_bad_grids_are_refused_before_anything_runs(grid, message):
    with pytest.raises(studies.SweepError, match=message):
        sw.expand("seed-baseline", grid)


def test_bad_model_option_in_a_grid_is_refused_naming_point_and_field():
    with pytest.raises(
        studies.SweepError,
        match=r"(?s)point model\.options\.kernel_size=4: .*"
        r"model\.options\.kernel_size: must be odd, got 4",
    ):
        sw.expand("seed-baseline", {"model.options.kernel_size": [3, 4]})


def test_every_ready_made_study_expands_and_reproduces_the_report_values():
    for study in studies.STUDIES.values():
        assert sw.expand(study.preset, study.grid)
    lr = studies.STUDIES["report-lr"]
    assert lr.grid["train.lr"] == [0.1, 0.001, 0.0008, 0.0005, 0.0004, 0.0003, 0.0001]
    assert studies.STUDIES["report-batch-size"].grid["train.batch_size"] == [8, 16, 25, 32, 40]
    assert studies.STUDIES["report-epochs"].grid["train.epochs"] == [2, 4, 7, 8, 10]
    assert len(sw.expand("seed-baseline", studies.STUDIES["report-depth-kernel"].grid)) == 4
    labels = {p.label for p in sw.expand("seed-baseline", lr.grid)}
    assert set(lr.report) <= labels  # published figures attach to real points


def test_scale_shrinks_epochs_and_data():
    config = preset("seed-baseline")
    out = sw.scaled({"train": {"lr": 0.001}}, config, epoch_scale=0.25, data_scale=0.1)
    assert out == {
        "train": {"lr": 0.001, "epochs": 3},
        "data": {"train_size": 4000, "val_size": 1000},
    }
    with pytest.raises(studies.SweepError, match="epoch_scale"):
        sw.scaled({}, config, epoch_scale=0, data_scale=1)


def _outcomes():
    points = sw.expand("seed-baseline", {"train.lr": [0.001, 0.0004, 0.1]})
    o = [
        sw.Outcome(points[0], 0, "ok", "a", 0.60, 0.59, 10.0),
        sw.Outcome(points[0], 1, "ok", "b", 0.64, 0.70, 12.0),
        sw.Outcome(points[1], 0, "ok", "c", 0.63, 0.50, 11.0),
        sw.Outcome(points[1], 1, "ok", "d", 0.63, 0.52, 11.0),
        sw.Outcome(points[2], 0, "failed", error="diverged"),
        sw.Outcome(points[2], 1, "failed", error="diverged"),
    ]
    return o


def test_summary_means_sds_and_the_best_point_by_validation_only():
    rows = sw.summarise(_outcomes(), {"train.lr=0.0004": 66.42})
    first, second, failed = rows
    assert first["val_acc_mean"] == pytest.approx(0.62)
    assert first["val_acc_std"] == pytest.approx(statistics.stdev([0.60, 0.64]))
    assert first["test_acc_mean"] == pytest.approx(0.645)
    assert second["report_test_acc"] == 66.42 and first["report_test_acc"] is None
    assert (
        failed["seeds_ok"] == 0 and failed["seeds_failed"] == 2 and failed["errors"] == "diverged"
    )
    # Point 2 has the higher mean validation accuracy (0.63 vs 0.62) although its test accuracy
    # is far lower: the choice ignores the test set.
    assert sw.best_point(rows)["point"] == "train.lr=0.0004"


def test_tables_and_plot(tmp_path):
    rows = sw.summarise(_outcomes(), {"train.lr=0.0004": 66.42})
    parsed = list(csv.DictReader(io.StringIO(sw.to_csv(rows))))
    assert [r["train.lr"] for r in parsed] == ["0.001", "0.0004", "0.1"]
    md = sw.to_markdown("t", rows, sw.best_point(rows))
    assert "62.00 ± 2.83" in md and "(best by val)" in md and "66.42" in md and "diverged" in md
    png = plot_sweep(rows, ["train.lr"], tmp_path / "p.png")
    with Image.open(png) as img:
        assert img.size[0] > 300


def test_report_studies_carry_the_report_figures_of_every_point():
    figures = json.loads(studies.REPORT_FIGURES_FILE.read_text())["studies"]
    lr = studies.STUDIES["report-lr"].report
    assert lr == {f"train.lr={p['lr']}": p["test_accuracy"] for p in figures["lr"]["points"]}
    assert studies.STUDIES["report-epochs"].report["train.epochs=8"] == 63.37
    assert studies.STUDIES["report-batch-size"].report["train.batch_size=8"] == 64.71
    depth = studies.STUDIES["report-depth-kernel"].report
    assert depth["model.name=seed-deep, model.options.kernel_size=1"] == 71.41
    split = studies.STUDIES["report-split"]
    assert split.preset == "seed-deep"  # the report ran it on its 4-conv net
    assert split.report["data=train_size=45000/val_size=5000"] == 72.29
    for study in studies.STUDIES.values():  # every figure sits on a real point
        assert set(study.report) <= {p.label for p in sw.expand(study.preset, study.grid)}


def test_a_scaled_epochs_study_shows_the_epochs_run_and_merges_identical_points():
    study = studies.STUDIES["report-epochs"]
    grid_points = sw.expand(study.preset, study.grid)
    points, notes = sw.scale_points(grid_points, study.preset, epoch_scale=0.3, data_scale=0.1)
    # 2, 4, 7, 8, 10 epochs x 0.3, rounded up: 1, 2, 3, 3, 3.
    assert [p.label for p in points] == ["train.epochs=1", "train.epochs=2", "train.epochs=3"]
    assert points[2].stands_for() == ("train.epochs=7", "train.epochs=8", "train.epochs=10")
    assert all(p.overrides["data"] == {"train_size": 4000, "val_size": 1000} for p in points)
    assert any(
        "train.epochs=7, train.epochs=8, train.epochs=10 became the same run" in n for n in notes
    )
    outcomes = [
        sw.Outcome(p, s, "ok", f"{p.index}{s}", 0.5 + p.index / 10, 0.5, 1.0)
        for p in points
        for s in (0, 1)
    ]
    rows = sw.summarise(outcomes, study.report)
    assert [r["train.epochs"] for r in rows] == ["1", "2", "3"]
    # A point that runs one grid point shows that point's (full-scale) report figure; a merged
    # point shows none.
    assert [r["report_test_acc"] for r in rows] == [61.29, 65.07, None]
    md = sw.to_markdown("t", rows, sw.best_point(rows), notes)
    assert (
        "| train.epochs=3 **(best by val)** | train.epochs=7; train.epochs=8; train.epochs=10 |"
        in md
    )
    # A scaled point that stands for one grid point keeps that point's report figure.
    split = studies.STUDIES["report-split"]
    scaled, _ = sw.scale_points(sw.expand(split.preset, split.grid), split.preset, 0.2, 0.25)
    rows = sw.summarise([sw.Outcome(p, 0, "ok", "r", 0.5, 0.5, 1.0) for p in scaled], split.report)
    assert rows[0]["point"] == "data=train_size=9000/val_size=2500"
    assert [r["report_test_acc"] for r in rows] == [71.20, 72.11, 72.29]
    # Unscaled, nothing is merged or relabelled and the figures attach.
    same, none = sw.scale_points(grid_points, study.preset, 1, 1)
    assert same == grid_points and none == []
