"""Muon for the conv filters, Nesterov SGD for everything else, as one torch optimizer.

Muon (MomentUm Orthogonalized by Newton-Schulz) replaces each filter bank's momentum with the
nearest semi-orthogonal matrix: every direction the gradient points in moves by the same amount,
so the rare directions are not starved by the dominant ones. Each step also rescales the filters
to a fixed norm; the BatchNorm after every conv makes the net blind to that scale, so the lr is
the fraction of the filters' size each step moves them by. Parameters that are not conv filters
(BatchNorm shifts, the whitening bias, the linear head) keep Nesterov SGD with coupled L2.

One optimizer object for both kinds keeps the training loop, the lr schedule (each group's
`lr_scale` times the scheduled lr) and checkpoints (one `state_dict`) the same as for SGD.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cifarlab.config import TrainConfig

# Coefficients of the quintic iteration X <- aX + (bA + cA^2)X, A = XX^T: chosen to push every
# singular value of a norm-1 matrix towards 1 fast (to roughly 0.7-1.2 in a few steps; exactly 1
# is not needed) rather than to converge exactly.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with g's singular vectors, (rows, cols) like g."""
    a, b, c = _NS_COEFFS
    x = g / (g.norm() + eps)  # every singular value now <= 1
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def is_filter(p: torch.Tensor) -> bool:
    """Trainable conv weights: what Muon updates."""
    return p.requires_grad and p.dim() == 4


class MuonSGD(torch.optim.Optimizer):
    """Groups with `muon=True` get Muon (Nesterov momentum, orthogonalized, filters renormalised
    to norm sqrt(out_channels) each step, no weight decay); the others Nesterov SGD with coupled
    L2, as torch.optim.SGD(nesterov=True) computes it."""

    def __init__(
        self, groups: Iterable[dict[str, Any]], lr: float, momentum: float, ns_steps: int = 5
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=0.0, muon=False, ns_steps=ns_steps)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 4 for p in group["params"]):
                raise ValueError("a Muon group takes conv filters (4-D tensors) only")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["muon"] and group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(momentum).add_(grad)
                direction = grad.add(buf, alpha=momentum)  # Nesterov
                if group["muon"]:
                    p.mul_(math.sqrt(p.shape[0]) / (p.norm() + 1e-12))
                    flat = direction.reshape(p.shape[0], -1).float()
                    direction = orthogonalize(flat, group["ns_steps"]).view_as(p).to(p.dtype)
                p.add_(direction, alpha=-lr)
        return loss


# ---------------------------------------------------------------------------------------------
# Schedules and optimisers of a training config
# ---------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total` steps."""
    if cfg.schedule == "constant" or total <= 1:
        return 1.0
    t = step / (total - 1)
    w = cfg.warmup_frac
    if cfg.schedule == "warmup_linear":
        if t < w:
            return cfg.start_lr_frac + (1 - cfg.start_lr_frac) * t / w
        return 1.0 + (cfg.end_lr_frac - 1.0) * (t - w) / max(1 - w, 1e-12)
    # onecycle: cosine from lr/25 up to lr, then cosine down to lr/1e4 (torch's OneCycleLR shape).
    lo, end = 1 / 25, 1 / 1e4
    if t < w:
        return lo + (1 - lo) * (1 - math.cos(math.pi * t / w)) / 2
    return end + (1 - end) * (1 + math.cos(math.pi * (t - w) / max(1 - w, 1e-12))) / 2


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, Nesterov SGD, or Muon for the conv filters with Nesterov SGD for the rest.
    BatchNorm shifts get lr * bias_lr_scale and wd / bias_lr_scale. Each group's `lr_scale` is
    its peak lr over `cfg.lr`, which the schedule multiplies."""
    norm_biases = [
        m.bias
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None
    ]
    norm_ids = {id(p) for p in norm_biases}
    filters = [p for p in model.parameters() if is_filter(p)] if cfg.optimizer == "muon" else []
    taken = norm_ids | {id(p) for p in filters}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": others, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "lr_scale": 1.0}]
    if norm_biases:
        groups.append(
            {
                "params": norm_biases,
                "lr": cfg.lr * cfg.bias_lr_scale,
                "weight_decay": cfg.weight_decay / cfg.bias_lr_scale,
                "lr_scale": cfg.bias_lr_scale,
            }
        )
    if cfg.optimizer == "muon":
        groups.append(
            {
                "params": filters,
                "lr": cfg.muon_lr,
                "momentum": cfg.muon_momentum,
                "muon": True,
                "lr_scale": cfg.muon_lr / cfg.lr,
            }
        )
        return MuonSGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


class WeightAverage:
    """EMA of a model's state (weights and BatchNorm statistics); lookahead also pulls the model
    back onto the average. The decay ramps up as (progress)^3, so early steps average little."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.started = False  # the first update copies the model: no pull towards the init
        self.state = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, total: int) -> None:
        """Blend the model into the average (every `average_every` steps)."""
        decay = self.cfg.average_decay**self.cfg.average_every * (step / max(total, 1)) ** 3
        if not self.started:
            decay, self.started = 0.0, True
        current = model.state_dict()
        for k, avg in self.state.items():
            avg.lerp_(current[k], 1 - decay)
            if self.cfg.averaging == "lookahead":
                current[k].copy_(avg)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's state with the average (call twice to undo); a no-op until the
        averaging has started, when the model is its own average."""
        if not self.started:
            return
        current = model.state_dict()
        for k, avg in self.state.items():
            tmp = current[k].clone()
            current[k].copy_(avg)
            avg.copy_(tmp)
