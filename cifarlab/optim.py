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

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float, momentum: float,
                 ns_steps: int = 5) -> None:
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
