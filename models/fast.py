"""An airbench-style CIFAR-10 net: the fast recipe's architecture, written for CPU and GPU.

Shape of the net (input normalised, 32x32):
    whiten: frozen 2x2 conv, filters = whitened patch basis of the data (and its negation) -> 31x31
    3 groups of conv -> maxpool(2) -> BN -> GELU -> conv -> BN -> GELU     31 -> 15 -> 7 -> 3
    maxpool(3) -> linear (no bias) -> logits * scale                        3 -> 1
No residual connections: each 3x3 conv starts as an identity on its first input channels instead.
BatchNorm has a fixed unit scale and a trainable shift.
"""

from __future__ import annotations

import torch
from torch import nn

from models import options as opt

WHITEN_KERNEL = 2  # patch size of the whitening layer, pixels
BN_MOMENTUM = 0.4  # torch convention: weight of the new batch statistics
LOGIT_SCALE = 1 / 9  # keeps early logits small, so the high learning rate is stable

# The net's options, checked when a config is made (see models/options.py).
OPTION_CHECKS: dict[str, opt.Check] = {
    "widths": opt.widths(3, 3),  # one per conv group
    "num_classes": opt.num_classes,
}


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale frozen at 1: only the shift learns (fewer, better-behaved params)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=BN_MOMENTUM)
        self.weight.requires_grad_(False)


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias, initialised so its first filters pass their input through."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, kernel_size=3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        n = min(self.in_channels, self.out_channels)
        torch.nn.init.dirac_(self.weight.data[:n])


class _ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            _Conv(c_in, c_out),
            nn.MaxPool2d(2),
            _BatchNorm(c_out),
            nn.GELU(),
            _Conv(c_out, c_out),
            _BatchNorm(c_out),
            nn.GELU(),
        )


class FastNet(nn.Module):
    """Whitening conv + three conv groups + linear head. ~1.97 M params at widths 64/256/256."""

    def __init__(
        self, widths: tuple[int, int, int] = (64, 256, 256), num_classes: int = 10
    ) -> None:
        super().__init__()
        whiten_width = 2 * 3 * WHITEN_KERNEL**2  # 24: every basis filter and its negation
        self.whiten = nn.Conv2d(3, whiten_width, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.body = nn.Sequential(
            nn.GELU(),
            _ConvGroup(whiten_width, widths[0]),
            _ConvGroup(widths[0], widths[1]),
            _ConvGroup(widths[1], widths[2]),
            nn.MaxPool2d(3),
            nn.Flatten(),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised images (N, 3, 32, 32); a few thousand suffice."""
        k = WHITEN_KERNEL
        x = images.float()
        patches = x.unfold(2, k, 1).unfold(3, k, 1)  # (N, 3, 31, 31, k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)  # (P, 12)
        patches = patches - patches.mean(dim=0)
        cov = patches.T @ patches / len(patches)  # (12, 12)
        eigvals, eigvecs = torch.linalg.eigh(cov.double())
        basis = (eigvecs.T / torch.sqrt(eigvals + eps)[:, None]).float()  # (12, 12), rows = filters
        filters = basis.reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        if self.whiten.bias is not None:  # (the whitening layer is built with a bias)
            self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) -> (N, 10)
        return self.head(self.body(self.whiten(x))) * LOGIT_SCALE
