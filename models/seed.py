"""The lab report's small CNNs: the baseline, its 4-conv variant and the wide net.

The report fed 32x32 RGB images normalised per channel; these take the same input as every model.
"""

from __future__ import annotations

import torch
from torch import nn

from models import options as opt

# The options of every net here, checked when a config is made (see models/options.py).
OPTION_CHECKS: dict[str, opt.Check] = {
    "kernel_size": opt.odd_kernel,
    "pool_kernel": opt.between(1, 32),  # at most the image: at least one pixel comes out
    "pool_stride": opt.positive,
    "channels": opt.positive,
    "hidden": opt.positive,
    "widths": opt.widths(1, 5),  # each block halves 32 pixels: five blocks leave one
    "num_classes": opt.num_classes,
}


def _pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pool(kernel: int, stride: int) -> tuple[nn.MaxPool2d, int]:
    """A max-pool; with stride 1 it pads to keep the size (the report's 3x3/s1/p1 pool)."""
    padding = kernel // 2 if stride == 1 else 0
    return nn.MaxPool2d(kernel, stride=stride, padding=padding), padding


class SeedBaseline(nn.Module):
    """Conv(3->18, k) -> ReLU -> MaxPool -> Linear(18*H*W, 64) -> ReLU -> Linear(64, 10).

    The report ran its learning-rate, batch and epoch studies with MaxPool(3, stride 1, pad 1),
    which keeps 32x32 (so the first linear layer has 18*32*32 inputs); the course's original net
    pools 2x2 with stride 2 (pool_kernel=2, pool_stride=2).
    """

    def __init__(
        self,
        kernel_size: int = 3,
        pool_kernel: int = 3,
        pool_stride: int = 1,
        channels: int = 18,
        hidden: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, kernel_size, stride=1, padding=kernel_size // 2),
            nn.ReLU(inplace=True),
        )
        self.pool, pad = _pool(pool_kernel, pool_stride)
        side = _pooled_size(32, pool_kernel, pool_stride, pad)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) -> (N, 10)
        return self.classifier(self.pool(self.features(x)))


class SeedDeep(SeedBaseline):
    """The report's 4-conv variant: convs 3->18->64->128->18 (same padding), then as the baseline.

    `kernel_size` applies to every conv, so the depth study can compare 3x3 with 1x1.
    """

    def __init__(
        self,
        kernel_size: int = 3,
        pool_kernel: int = 3,
        pool_stride: int = 1,
        hidden: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__(kernel_size, pool_kernel, pool_stride, 18, hidden, num_classes)
        widths = (3, 18, 64, 128, 18)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)


class SeedWide(nn.Module):
    """The report's best direction, read as: three conv blocks with 2x2/stride-2 pools and
    channels growing 3 -> 64 -> 128 -> 256 (32 -> 16 -> 8 -> 4 pixels), then a 256-unit hidden
    layer. The report gives the direction (pool by two, widen to a few hundred channels), not
    every width: these are our choice.
    """

    def __init__(
        self,
        widths: tuple[int, int, int] = (64, 128, 256),
        kernel_size: int = 3,
        hidden: int = 256,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in widths:
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, 2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = 32 // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) -> (N, 10)
        return self.classifier(self.features(x))
