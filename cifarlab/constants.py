"""Facts about CIFAR-10 shared by training and serving (no torch import: serving reads it too)."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32  # pixels, square
CHANNELS = 3

# Per-channel statistics of the 50,000 training images, on the 0-1 scale. Every model is fed
# (pixel / 255 - MEAN) / STD; serving applies the same constants to uploaded images.
MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# The lab report's best test accuracy (%) and the time it took (s): the bar the benchmarks quote.
REPORT_BEST_TEST_ACC = 75.86
REPORT_BEST_SECONDS = 270.0

# How serving turns an upload of any size into the 32x32 the models take: the central square crop
# (the largest square in the middle, so the aspect ratio is kept), then a resize with this Pillow
# filter (antialiased when shrinking). A 32x32 upload is used as it is, pixel for pixel.
RESIZE_FILTER = "bicubic"
