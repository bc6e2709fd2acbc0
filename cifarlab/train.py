"""One training function for every registered net, with per-epoch callbacks and checkpoints.

    train(config, train_x, train_y, val_x, val_y, run_dir) -> TrainResult

Images are uint8 tensors kept whole in memory; batches are normalised and augmented on the device
as whole tensors. A checkpoint is written after every epoch, so calling `train` again with the
same config and run folder resumes after the last finished epoch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import checkpoints
from cifarlab.config import RunConfig, TrainConfig
from cifarlab.evaluate import evaluate
from cifarlab.history import EpochHook, EpochMetrics, TrainResult
from cifarlab.optim import WeightAverage, lr_factor, make_optimizer
from cifarlab.tensors import (
    autocast,
    flip_where,
    normalize,
    resolve_device,
    resolve_precision,
    translate,
)
from models import build_model

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _flip_mask(
    cfg: TrainConfig, idx: torch.Tensor, base: torch.Tensor, epoch: int, gen: torch.Generator
) -> torch.Tensor | None:
    if cfg.flip == "random":
        return torch.rand(len(idx), generator=gen) < 0.5
    if cfg.flip == "alternating":
        # Each image flips on every other epoch, from a random start: half the epochs see it
        # mirrored, and consecutive epochs always see both views (less redundant than random).
        return base[idx] ^ bool(epoch % 2)
    return None


@dataclass
class _Session:
    """One call of `train`: what it built and how far it got (what a checkpoint holds)."""

    config: RunConfig
    device: torch.device
    amp: torch.dtype | None
    model: nn.Module
    step_fn: Callable[[torch.Tensor], torch.Tensor]  # the model, compiled when asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    average: WeightAverage | None
    steps_per_epoch: int
    flip_base: torch.Tensor  # which images start mirrored under the alternating flip
    history: list[EpochMetrics] = field(default_factory=list)
    epoch: int = 0  # epochs finished
    train_seconds: float = 0.0
    best_val: float = float("inf")
    bad_epochs: int = 0

    @property
    def total_steps(self) -> int:
        return self.config.train.epochs * self.steps_per_epoch

    @property
    def stopped_early(self) -> bool:
        return (
            bool(self.history)
            and _should_stop(self.config.train, self.bad_epochs)
            and self.epoch < self.config.train.epochs
        )


def train(
    config: RunConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    run_dir: Path,
    *,
    hooks: Sequence[EpochHook] = (),
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train `config.model` on uint8 images (N, 3, 32, 32); evaluate on validation every epoch.

    `hooks` run after each epoch with its metrics and the model; `progress(step, total)` after
    each optimiser step. Resumes from `run_dir/checkpoint.pt` when it exists.
    """
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError(f"empty data: {len(train_x)} training and {len(val_x)} validation images")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT_NAME

    s = _build(config, train_x)
    start_epoch = _resume(s, ckpt_path) if ckpt_path.exists() else 0
    while s.epoch < config.train.epochs and not s.stopped_early:
        trained = _train_epoch(s, train_x, train_y, progress)
        metrics = _validate(s, *_epoch_validation(s, val_x, val_y), trained)
        checkpoints.save_atomic(_checkpoint(s), ckpt_path)
        # The hooks (which log the epoch) run once it is saved: a run killed in between resumes
        # after this epoch, so no epoch is ever logged twice.
        _call_hooks(s, hooks, metrics)
    return _finish(s, start_epoch)


def _build(config: RunConfig, train_x: torch.Tensor) -> _Session:
    """The model (seeded: the same config gives the same initial weights), optimiser, loss
    scaler and weight average, on the configured device."""
    cfg = config.train
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(config.model.name, **config.model.options)
    init_from_data = getattr(model, "init_from_data", None)  # the fast net's whitening layer
    if callable(init_from_data):
        init_from_data(normalize(train_x[:5000], torch.device("cpu")))
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = resolve_precision(cfg.precision, device)
    n = len(train_x)
    return _Session(
        config=config,
        device=device,
        amp=amp,
        model=model,
        step_fn=torch.compile(model) if cfg.compile else model,
        optimizer=make_optimizer(model, cfg),
        scaler=torch.amp.GradScaler(device.type, enabled=amp is torch.float16),
        average=WeightAverage(model, cfg) if cfg.averaging != "none" else None,
        # Full batches only (a random remainder sits out each epoch): a tiny last batch would
        # take a full-size step on a gradient and BatchNorm statistics many times noisier.
        steps_per_epoch=max(n // cfg.batch_size, 1),
        flip_base=torch.rand(n, generator=torch.Generator().manual_seed(cfg.seed)) < 0.5,
    )


def _resume(s: _Session, ckpt_path: Path) -> int:
    """Load the last finished epoch from the run folder's checkpoint; returns that epoch."""
    state = checkpoints.load(ckpt_path, s.device)
    if state["identity"] != checkpoints.identity(s.config):
        raise ValueError(
            f"{ckpt_path} belongs to a different config; use another run "
            "folder or delete the checkpoint to start over"
        )
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # fp16 loss scale (empty when the scaler is off)
        s.scaler.load_state_dict(state["scaler"])
    if s.average is not None:
        s.average.state, s.average.started = state["average"], state["average_started"]
    s.epoch, s.train_seconds = state["epoch"], state["train_seconds"]
    s.best_val, s.bad_epochs = state["best_val"], state["bad_epochs"]
    s.history = [EpochMetrics(**h) for h in state["history"]]
    log.info("resuming %s after epoch %d", ckpt_path.parent, s.epoch)
    return s.epoch


@dataclass
class _EpochTrained:
    loss: float  # mean over the images seen
    accuracy: float
    seconds: float
    images: int
    lr_factor: float  # at the epoch's last step


def _train_epoch(
    s: _Session,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    progress: Callable[[int, int], None] | None,
) -> _EpochTrained:
    """One pass over the training images. Its randomness is seeded by the epoch, so a resumed
    run draws the same batches."""
    cfg, device, model, epoch = s.config.train, s.device, s.model, s.epoch
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    whiten = getattr(model, "whiten", None)
    if whiten is not None and whiten.bias is not None:
        whiten.bias.requires_grad_(epoch < cfg.whiten_bias_epochs)
    model.train()
    perm = torch.randperm(len(train_x), generator=gen)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, factor = 0, 1.0
    _sync(device)
    t0 = time.perf_counter()
    for i in range(s.steps_per_epoch):
        step = epoch * s.steps_per_epoch + i
        factor = lr_factor(step, s.total_steps, cfg)
        for group in s.optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * factor
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        x, y = _batch(s, train_x, train_y, idx, gen)
        with autocast(device, s.amp):
            logits = s.step_fn(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        if s.average is not None and _averages_at(cfg, step + 1, s.total_steps):
            s.average.update(model, step + 1, s.total_steps)
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
        if progress is not None:
            progress(step + 1, s.total_steps)
    _sync(device)
    seconds = time.perf_counter() - t0
    s.train_seconds += seconds
    s.epoch += 1
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(
            f"training diverged in epoch {s.epoch}: the loss is "
            f"{loss_sum.item()} (try a lower train.lr than {cfg.lr})"
        )
    return _EpochTrained(loss_sum.item() / seen, correct.item() / seen, seconds, seen, factor)


def _batch(s: _Session, train_x: torch.Tensor, train_y: torch.Tensor, idx: torch.Tensor,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One training batch on the device, normalised and augmented (flip, then translate, both
    drawn from the epoch's generator in that order)."""
    cfg = s.config.train
    x = normalize(train_x[idx], s.device)  # (B, 3, 32, 32) float
    y = train_y[idx].to(s.device, non_blocking=True)
    mask = _flip_mask(cfg, idx, s.flip_base, s.epoch, gen)
    if mask is not None:
        x = flip_where(x, mask)
    x = translate(x, cfg.translate, gen)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _averages_at(cfg: TrainConfig, step: int, total: int) -> bool:
    """Whether the weight average takes in the weights after `step` (1-based)."""
    return step % cfg.average_every == 0 and step >= cfg.average_start_frac * total


def _epoch_validation(
    s: _Session, val_x: torch.Tensor, val_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What this epoch is validated on: the first `val_images_per_epoch` images (enough for a
    progress line), or all of them after the last epoch and under early stopping."""
    cfg = s.config.train
    n = cfg.val_images_per_epoch
    if n is None or s.epoch >= cfg.epochs or cfg.early_stopping_patience is not None:
        return val_x, val_y
    return val_x[:n], val_y[:n]


def _validate(
    s: _Session, val_x: torch.Tensor, val_y: torch.Tensor, t: _EpochTrained
) -> EpochMetrics:
    """Evaluate the weights that would be kept (the average, where one is kept) on validation;
    record the epoch and the early-stopping count."""
    cfg = s.config.train
    started = time.perf_counter()
    with _averaged(s):
        val = evaluate(
            s.model, val_x, val_y, device=s.device, channels_last=cfg.channels_last, amp_dtype=s.amp
        )
    val_seconds = time.perf_counter() - started
    metrics = EpochMetrics(
        epoch=s.epoch,
        train_loss=t.loss,
        train_accuracy=t.accuracy,
        val_loss=val.loss,
        val_accuracy=val.accuracy,
        lr=cfg.lr * t.lr_factor,
        epoch_seconds=t.seconds,
        images_per_second=t.images / t.seconds,
        train_seconds=s.train_seconds,
        val_images=len(val_x),
        val_seconds=val_seconds,
    )
    s.history.append(metrics)
    if val.loss < s.best_val:
        s.best_val, s.bad_epochs = val.loss, 0
    else:
        s.bad_epochs += 1
    log.info(
        "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
        s.epoch,
        cfg.epochs,
        t.loss,
        t.accuracy,
        val.loss,
        val.accuracy,
        t.seconds,
    )
    return metrics


def _checkpoint(s: _Session) -> dict[str, Any]:
    """Everything a resumed run needs (the training weights, not the average)."""
    return {
        "identity": checkpoints.identity(s.config),
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scaler": s.scaler.state_dict(),
        "average": s.average.state if s.average is not None else None,
        "average_started": s.average.started if s.average is not None else False,
        "epoch": s.epoch,
        "train_seconds": s.train_seconds,
        "best_val": s.best_val,
        "bad_epochs": s.bad_epochs,
        "history": [asdict(h) for h in s.history],
    }


def _call_hooks(s: _Session, hooks: Sequence[EpochHook], metrics: EpochMetrics) -> None:
    """The epoch hooks see the evaluated weights."""
    with _averaged(s):
        for hook in hooks:
            hook(metrics, s.model)


def _finish(s: _Session, start_epoch: int) -> TrainResult:
    """The final weights are the average, where one is kept; eval mode."""
    if s.average is not None:
        s.average.swap(s.model)
    s.model.eval()
    return TrainResult(
        model=s.model,
        history=s.history,
        train_seconds=s.train_seconds,
        device=str(s.device),
        epochs_completed=s.epoch,
        stopped_early=s.stopped_early,
        resumed_from_epoch=start_epoch,
    )


@contextlib.contextmanager
def _averaged(s: _Session):
    """The averaged weights in the model for the block, the training weights after it."""
    if s.average is not None:
        s.average.swap(s.model)
    try:
        yield
    finally:
        if s.average is not None:
            s.average.swap(s.model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _should_stop(cfg: TrainConfig, bad_epochs: int) -> bool:
    return cfg.early_stopping_patience is not None and bad_epochs >= cfg.early_stopping_patience
