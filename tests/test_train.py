"""Training: every net learns a learnable task; schedules; resume; early stopping; evaluation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cifarlab.checkpoints import CheckpointError
from cifarlab.config import RunConfig, preset
from cifarlab.evaluate import evaluate, score
from cifarlab.experiment import config_hash, run_experiment
from cifarlab.optim import lr_factor
from cifarlab.tensors import translate
from cifarlab.train import CHECKPOINT_NAME, train
from models import model_names
from tests.conftest import _pattern_images


def _task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    return torch.from_numpy(_pattern_images(labels, rng)), torch.from_numpy(labels)


TRAIN = _task(400, 0)
VAL = _task(200, 1)

QUICK = {
    "seed-baseline": dict(optimizer="adam", lr=1e-3, batch_size=32, epochs=3),
    "seed-deep": dict(optimizer="adam", lr=1e-3, batch_size=32, epochs=4),
    "seed-wide": dict(optimizer="adam", lr=1e-3, batch_size=32, epochs=3),
    "fast": dict(
        optimizer="sgd",
        lr=0.4,
        momentum=0.85,
        batch_size=50,
        epochs=5,
        schedule="warmup_linear",
        label_smoothing=0.1,
        translate=1,
        flip="alternating",
        averaging="lookahead",
        whiten_bias_epochs=1,
    ),
}


def _config(name: str, **train_over) -> RunConfig:
    options = {"widths": (16, 32, 32)} if name == "fast" else {}
    return RunConfig(
        model={"name": name, "options": options},
        train={**QUICK[name], "device": "cpu", **train_over},
    )


@pytest.mark.parametrize("name", model_names())
def test_every_model_learns_well_above_chance(name, tmp_path):
    result = train(_config(name), *TRAIN, *VAL, tmp_path)
    assert len(result.history) == QUICK[name]["epochs"]
    assert result.history[-1].val_accuracy > 0.6, result.history  # chance is 0.1
    again = evaluate(result.model, *VAL, device=torch.device("cpu"))
    assert again.accuracy > 0.6


def test_same_seed_same_weights(tmp_path):
    a = train(_config("fast", epochs=1), *TRAIN, *VAL, tmp_path / "a")
    b = train(_config("fast", epochs=1), *TRAIN, *VAL, tmp_path / "b")
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    calls = []

    def stop_after_two(metrics, _model):
        calls.append(metrics.epoch)
        if metrics.epoch == 2:
            raise KeyboardInterrupt  # as if the process were killed after epoch 2

    cfg = _config("seed-baseline", epochs=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, *TRAIN, *VAL, tmp_path, hooks=[stop_after_two])
    # The hooks run after epoch 2's checkpoint is saved: the resumed run starts at epoch 3 and
    # no epoch reaches the hooks (i.e. MLflow) twice.
    resumed = train(cfg, *TRAIN, *VAL, tmp_path, hooks=[lambda m, _: calls.append(m.epoch)])
    assert resumed.resumed_from_epoch == 2
    assert [h.epoch for h in resumed.history] == [1, 2, 3, 4]
    assert calls == [1, 2, 3, 4]
    # Resuming a finished run trains nothing more.
    done = train(cfg, *TRAIN, *VAL, tmp_path)
    assert done.resumed_from_epoch == 4 and len(done.history) == 4


def _killed_after_epoch_2_then_resumed(cfg: RunConfig, folder):
    """Train until a hook 'kills' the run after epoch 2's checkpoint, then run it again."""

    def kill_after_second(metrics, _model):
        if metrics.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, *TRAIN, *VAL, folder, hooks=[kill_after_second])
    return train(cfg, *TRAIN, *VAL, folder)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = _config("fast", epochs=2)
    full = train(cfg, *TRAIN, *VAL, tmp_path / "full")
    resumed = _killed_after_epoch_2_then_resumed(cfg, tmp_path / "cut")
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_muon_learns_and_resumes_exactly(tmp_path):
    # Muon's state (a momentum buffer per filter bank) goes through the checkpoint like SGD's.
    cfg = _config("fast", epochs=3, optimizer="muon", muon_lr=0.2)
    full = train(cfg, *TRAIN, *VAL, tmp_path / "full")
    assert full.history[-1].val_accuracy > 0.6, full.history
    resumed = _killed_after_epoch_2_then_resumed(cfg, tmp_path / "cut")
    assert resumed.resumed_from_epoch == 2
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_checkpoint_of_other_config_is_refused(tmp_path):
    train(_config("seed-baseline", epochs=1), *TRAIN, *VAL, tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    with pytest.raises(ValueError, match="different config"):
        train(_config("seed-baseline", epochs=1, lr=5e-4), *TRAIN, *VAL, tmp_path)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_is_plain_data_the_safe_loader_reads(tmp_path):
    train(_config("fast", epochs=1), *TRAIN, *VAL, tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 1 and isinstance(state["best_val"], float)
    assert set(state["average"]) and all(torch.is_tensor(v) for v in state["average"].values())


def test_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    cfg = _config("seed-baseline", epochs=1)
    train(cfg, *TRAIN, *VAL, tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    state["history"].append(_RunsShell(marker))  # a planted checkpoint
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=CHECKPOINT_NAME):
        train(cfg, *TRAIN, *VAL, tmp_path)
    assert not marker.exists()


def test_early_stopping_on_validation_loss(tmp_path):
    # A learning rate this high makes validation loss climb, so patience 1 stops the run.
    cfg = _config("seed-baseline", epochs=8, lr=0.05, early_stopping_patience=1)
    result = train(cfg, *TRAIN, *VAL, tmp_path)
    assert result.stopped_early and result.epochs_completed < 8
    losses = [h.val_loss for h in result.history]
    assert losses[-1] >= min(losses[:-1])


def test_the_validation_subset_is_not_part_of_the_run_identity(tmp_path):
    # It changes what is measured, not what is trained: same config hash, and a run cut off
    # under one setting resumes under another (its checkpoint is accepted).
    subset = _config("seed-baseline", epochs=3, val_images_per_epoch=50)
    full = _config("seed-baseline", epochs=3)
    assert config_hash(subset) == config_hash(full)

    def cut(metrics, _model):
        if metrics.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(subset, *TRAIN, *VAL, tmp_path, hooks=[cut])
    resumed = train(full, *TRAIN, *VAL, tmp_path)
    assert resumed.resumed_from_epoch == 1
    assert [h.val_images for h in resumed.history] == [50, len(VAL[0]), len(VAL[0])]


def test_epochs_validate_on_a_subset_and_the_last_on_every_image(tmp_path):
    cfg = _config("seed-baseline", epochs=3, val_images_per_epoch=50)
    result = train(cfg, *TRAIN, *VAL, tmp_path / "subset")
    assert [h.val_images for h in result.history] == [50, 50, len(VAL[0])]
    # Validation only measures: the same seed trains the same weights either way.
    full = train(_config("seed-baseline", epochs=3), *TRAIN, *VAL, tmp_path / "full")
    assert [h.val_images for h in full.history] == [len(VAL[0])] * 3
    assert full.history[-1].val_loss == pytest.approx(result.history[-1].val_loss)
    assert full.history[0].val_loss != pytest.approx(result.history[0].val_loss)
    # Early stopping compares epochs on the same images: all of them.
    patient = train(
        _config("seed-baseline", epochs=2, val_images_per_epoch=50, early_stopping_patience=5),
        *TRAIN,
        *VAL,
        tmp_path / "patient",
    )
    assert [h.val_images for h in patient.history] == [len(VAL[0])] * 2


@pytest.mark.parametrize("schedule", ["constant", "warmup_linear", "onecycle"])
def test_lr_schedules(schedule):
    cfg = _config("fast", schedule=schedule).train
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert max(factors) == pytest.approx(1.0, abs=0.01)
    if schedule != "constant":
        peak = int(np.argmax(factors))
        assert 15 <= peak <= 25 and factors[0] < 0.5 and factors[-1] < 0.2


def test_translate_shifts_within_padding():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = translate(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(translate(x, 0, torch.Generator()), x)
    # The centre pixel of each output comes from within 2 pixels of the input centre.
    for i in range(2):
        near = x[i, 0, 2:7, 2:7]
        assert out[i, 0, 4, 4] in near


def test_score_confusion_and_per_class():
    logits = torch.eye(10)[[0, 1, 1, 3]]
    labels = torch.tensor([0, 1, 2, 3])
    result = score(logits, labels)
    assert result.accuracy == 0.75
    assert result.confusion[2, 1] == 1 and result.confusion.sum() == 4
    assert result.per_class_accuracy[2] == 0.0 and result.per_class_accuracy[0] == 1.0


def test_presets_and_validation():
    cfg = preset("seed-baseline")
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (
        "adam",
        4e-4,
        32,
        10,
    )
    assert preset("fast").preset in ("fast-cpu", "fast-gpu")
    with pytest.raises(ValueError, match="unknown preset 'nope'.*seed-baseline"):
        preset("nope")
    with pytest.raises(ValueError, match="lr"):
        preset("seed-baseline", train={"lr": -1})
    with pytest.raises(ValueError, match="(?s)model.name.*Input should be 'fast', 'seed-baseline'"):
        preset("seed-baseline", model={"name": "vgg"})
    with pytest.raises(ValueError, match="exceeds"):
        preset("seed-baseline", data={"train_size": 45_000, "val_size": 6_000})
    # Serving a TTA needs one: fast-cpu measures none by default.
    with pytest.raises(ValueError, match="serve_tta is true but tta is 'none'"):
        preset("fast-cpu", train={"serve_tta": True})
    assert preset("fast-cpu", train={"serve_tta": True, "tta": "flip"}).train.serve_tta


def test_the_lean_cpu_preset_trains_on_at_most_90_tflop():
    """fast-cpu-lean is the recipe for 92 % test in at most 90 TFLOP of training: its config as
    committed must stay within that budget (FLOPs per image, counted as the benchmark counts
    them, x the images of an epoch x its epochs); fast-cpu's is over it."""
    from cifarlab.flops import training_flops

    rng = torch.get_rng_state()
    lean, full = training_flops(preset("fast-cpu-lean")), training_flops(preset("fast-cpu"))
    assert 80e12 < lean <= 90e12 < full, (lean, full)
    assert torch.equal(torch.get_rng_state(), rng)  # counting draws nothing from a run's seed


def test_run_experiment_writes_results_and_plots(synthetic_cifar, tmp_path):
    folder, sums = synthetic_cifar
    cfg = RunConfig(
        preset="test",
        data={"source": str(folder), "checksums": sums, "train_size": 240, "val_size": 60},
        model={"name": "seed-baseline"},
        train={**QUICK["seed-baseline"], "device": "cpu", "tta": "flip"},
    )
    outcome = run_experiment(cfg, tmp_path)
    results = json.loads((outcome.run_dir / "results.json").read_text())
    assert results["test_accuracy"] > 0.3 and len(results["history"]) == 3
    assert results["split_sha256"] == outcome.split.digest
    for key in ("learning_curves", "confusion_matrix"):
        assert outcome.files[key].read_bytes()[:4] == b"\x89PNG"
    assert (outcome.split_dir / "train_idx.npy").exists()
    assert json.loads((outcome.run_dir / "config.json").read_text())["train"]["tta"] == "flip"


@pytest.mark.realdata
@pytest.mark.e2e  # 20 s of real training: the end-to-end tier
def test_smoke_on_real_data(real_cifar, tmp_path):
    """A short run of the fast recipe on a real subset learns far above chance (10 %)."""
    cfg = preset(
        "fast-cpu-quick",
        data={"source": str(real_cifar), "train_size": 8000, "val_size": 2000},
        train={"batch_size": 256, "lr": 0.4, "epochs": 2, "tta": "flip"},
    )
    outcome = run_experiment(cfg, tmp_path)
    assert outcome.val.accuracy > 0.35 and outcome.test.accuracy > 0.35, outcome.summary()
    assert outcome.data.folder == real_cifar  # the mirror is read in place, not copied


def test_weight_average_is_the_model_until_it_starts(tmp_path):
    from cifarlab.optim import WeightAverage

    cfg = _config("fast", averaging="ema").train
    model = torch.nn.Linear(4, 2)
    average = WeightAverage(model, cfg)
    with torch.no_grad():
        model.weight.add_(1.0)  # training moved the weights; averaging has not started yet
    before = model.weight.clone()
    average.swap(model)
    assert torch.equal(model.weight, before)  # evaluation sees the trained weights
    average.update(model, step=10, total=100)  # first update: the average becomes the model
    with torch.no_grad():
        model.weight.add_(1.0)
    average.swap(model)
    assert torch.allclose(model.weight, before)  # now the average (the weights at its start)
