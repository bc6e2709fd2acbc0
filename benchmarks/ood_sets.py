"""Offline out-of-distribution (OOD) benchmark sets for a CIFAR-10 classifier.

Every builder returns uint8 images shaped (N, 32, 32, 3) (RGB, HWC) and is deterministic: the
same seed gives the same bytes on any machine with the same numpy / Pillow / scikit-learn
versions (the text set uses Pillow's bundled default font, not a system font).

The binding sets (their union is the benchmark's OOD side):
    digits          scikit-learn's 8x8 digits (all 1797), grey, bicubic-upscaled to 32x32 RGB
    solid           one uniformly random RGB colour per image
    noise_uniform   i.i.d. uniform pixel noise, 0..255 per channel
    noise_gaussian  i.i.d. Gaussian pixel noise, per-image mean and std drawn at random, clipped
    text            random words / letters drawn with PIL.ImageDraw on a plain background
    cifar_blur      CIFAR-10 test images, Gaussian blur of radius U(3, 4)
    cifar_jpeg5     CIFAR-10 test images, JPEG-encoded at quality 5 and decoded

Extra sets, NOT in the binding union (a check that a score is not tuned to the sets above):
    cifar_shuffle   CIFAR-10 test images with their pixels permuted (same colours, no structure)
    stripes         random sinusoidal gratings / checkerboards in two random colours

Benign shifts, NOT OOD (1000 CIFAR-10 test images each, still recognisable): the share of them
a score flags is its false-alarm rate on legitimate but unusual uploads (ideal: about 5 %):
    benign_hflip      mirrored left-right
    benign_grey       converted to greyscale (Pillow "L") and back to RGB
    benign_jpeg75     JPEG quality 75 at 32x32
    benign_blur_mild  Gaussian blur radius 0.6
    benign_roundtrip  bicubic upscale to 128x128 then the serving resize (bicubic) back to 32x32
    benign_dark       brightness x 0.6

    >>> sets = build_all(cifar_test)        # dict name -> (N, 32, 32, 3) uint8

Used by benchmarks/ood_bench.py. scikit-learn (for the digits) comes with MLflow.
"""

from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 32

BINDING = (
    "digits",
    "solid",
    "noise_uniform",
    "noise_gaussian",
    "text",
    "cifar_blur",
    "cifar_jpeg5",
)
EXTRA = ("cifar_shuffle", "stripes")
# Still CIFAR-10, mildly changed: NOT OOD. A score should flag about 5 % of these (its rate on
# clean in-distribution images); more means it would reject legitimate uploads of that kind.
BENIGN = (
    "benign_hflip",
    "benign_grey",
    "benign_jpeg75",
    "benign_blur_mild",
    "benign_roundtrip",
    "benign_dark",
)


def load_cifar_test(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 CIFAR-10 test images as uint8 (N, 32, 32, 3) and their labels (read only)."""
    with open(Path(folder) / "test_batch", "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, SIZE, SIZE)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), np.asarray(batch[b"labels"])


# ---------------------------------------------------------------------------------------------
# Synthetic sets
# ---------------------------------------------------------------------------------------------


def digits(seed: int = 0) -> np.ndarray:
    """All 1797 scikit-learn digits, 0..16 -> 0..255, bicubic 8x8 -> 32x32, grey as RGB.

    `seed` is unused (the set is fixed); it is accepted so every builder has one signature."""
    from sklearn.datasets import load_digits

    raw = load_digits().images  # (1797, 8, 8) float, 0..16, ink bright on black
    grey = np.clip(np.rint(raw * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    out = np.empty((len(grey), SIZE, SIZE, 3), np.uint8)
    for i, g in enumerate(grey):
        big = Image.fromarray(g, "L").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        out[i] = np.asarray(big)[:, :, None]
    return out


def solid(seed: int = 1, n: int = 1000) -> np.ndarray:
    """One uniformly random RGB colour filling each image."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(n, 1, 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours, (n, SIZE, SIZE, 3)))


def noise_uniform(seed: int = 2, n: int = 1000) -> np.ndarray:
    """Every channel of every pixel uniform on 0..255."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def noise_gaussian(seed: int = 3, n: int = 1000) -> np.ndarray:
    """Gaussian pixel noise around a per-image mean colour U(64, 192) with a per-image std
    U(10, 80) (so some images are faint noise on a flat colour), rounded and clipped."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(64, 192, size=(n, 1, 1, 3))
    std = rng.uniform(10, 80, size=(n, 1, 1, 1))
    x = mean + std * rng.standard_normal((n, SIZE, SIZE, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could people "
    "my than first water been call who oil its now find long down day did get come made may "
    "part OK STOP EXIT SALE OPEN HELLO NEWS 2024 42 7 x y z A B C Q W E R T Y"
).split()
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least 100 away (sum of |channel differences|) from the background."""
    for _ in range(100):
        c = rng.integers(0, 256, size=3)
        if np.abs(c - background).sum() >= 100:
            return tuple(int(v) for v in c)
    return tuple(int(v) for v in 255 - background)


def text(seed: int = 4, n: int = 1000) -> np.ndarray:
    """Random words or letter strings (1-3 lines) in a random colour, Pillow's default font at
    size 7-22 (random), at a random offset, on a plain random background, drawn at 32x32."""
    rng = np.random.default_rng(seed)
    fonts = {s: ImageFont.load_default(size=s) for s in range(7, 23)}
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        bg = rng.integers(0, 256, size=3)
        img = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in bg))
        draw = ImageDraw.Draw(img)
        size = int(rng.integers(7, 23))
        lines = int(rng.integers(1, 4)) if size <= 12 else 1
        y = int(rng.integers(-size // 3, max(1, SIZE - lines * size) + 1))
        for _ in range(lines):
            if rng.random() < 0.5:
                s = " ".join(str(rng.choice(_WORDS)) for _ in range(int(rng.integers(1, 4))))
            else:
                s = "".join(rng.choice(list(_LETTERS), size=int(rng.integers(1, 6))))
            x = int(rng.integers(-4, 12))
            draw.text((x, y), s, fill=_contrasting(rng, bg), font=fonts[size])
            y += size
        out[i] = np.asarray(img)
    return out


def stripes(seed: int = 7, n: int = 1000) -> np.ndarray:
    """Sinusoidal gratings (random period 2-16 px, random angle) or checkerboards (random cell
    2-8 px), mixing two random colours. Extra set, not binding."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
        if rng.random() < 0.5:
            period, theta = rng.uniform(2, 16), rng.uniform(0, np.pi)
            phase = rng.uniform(0, 2 * np.pi)
            t = 0.5 + 0.5 * np.sin(
                2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase
            )
        else:
            cell = int(rng.integers(2, 9))
            t = ((xx // cell + yy // cell) % 2).astype(np.float64)
        out[i] = np.rint(a * t[..., None] + b * (1 - t[..., None])).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# CIFAR-10 test images made unrecognisable
# ---------------------------------------------------------------------------------------------


def _pick(cifar_test: np.ndarray, seed: int, n: int) -> np.ndarray:
    idx = np.random.default_rng(seed).choice(len(cifar_test), size=n, replace=False)
    return cifar_test[np.sort(idx)]


def cifar_blur(cifar_test: np.ndarray, seed: int = 5, n: int = 2000) -> np.ndarray:
    """`n` random test images, Pillow GaussianBlur with a radius drawn from U(3, 4) each."""
    rng = np.random.default_rng(seed + 1000)
    src = _pick(cifar_test, seed, n)
    out = np.empty_like(src)
    for i, im in enumerate(src):
        r = float(rng.uniform(3.0, 4.0))
        out[i] = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius=r)))
    return out


def cifar_jpeg5(cifar_test: np.ndarray, seed: int = 6, n: int = 2000) -> np.ndarray:
    """`n` random test images saved as JPEG at quality 5 (Pillow, 4:2:0) and decoded."""
    src = _pick(cifar_test, seed, n)
    out = np.empty_like(src)
    for i, im in enumerate(src):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=5)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


def cifar_shuffle(cifar_test: np.ndarray, seed: int = 8, n: int = 1000) -> np.ndarray:
    """`n` random test images, each with its 1024 pixels permuted (a fresh permutation per
    image; colours kept together). Extra set, not binding."""
    rng = np.random.default_rng(seed + 1000)
    src = _pick(cifar_test, seed, n).reshape(n, SIZE * SIZE, 3)
    out = np.empty_like(src)
    for i in range(n):
        out[i] = src[i, rng.permutation(SIZE * SIZE)]
    return out.reshape(n, SIZE, SIZE, 3)


def _benign(cifar_test: np.ndarray, kind: str, seed: int = 9, n: int = 1000) -> np.ndarray:
    src = _pick(cifar_test, seed, n)
    out = np.empty_like(src)
    for i, im in enumerate(src):
        img = Image.fromarray(im)
        if kind == "hflip":
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif kind == "grey":
            img = img.convert("L").convert("RGB")
        elif kind == "jpeg75":
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=75)
            buf.seek(0)
            img = Image.open(buf).convert("RGB")
        elif kind == "blur_mild":
            img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
        elif kind == "roundtrip":
            big = img.resize((128, 128), Image.Resampling.BICUBIC)
            img = big.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        elif kind == "dark":
            img = Image.fromarray(np.rint(im * 0.6).astype(np.uint8))
        else:
            raise ValueError(kind)
        out[i] = np.asarray(img)
    return out


# ---------------------------------------------------------------------------------------------

SYNTHETIC: dict[str, Callable[[], np.ndarray]] = {
    "digits": digits,
    "solid": solid,
    "noise_uniform": noise_uniform,
    "noise_gaussian": noise_gaussian,
    "text": text,
    "stripes": stripes,
}
FROM_CIFAR: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "cifar_blur": cifar_blur,
    "cifar_jpeg5": cifar_jpeg5,
    "cifar_shuffle": cifar_shuffle,
    **{name: functools.partial(_benign, kind=name.removeprefix("benign_")) for name in BENIGN},
}


def build_all(
    cifar_test: np.ndarray, names: tuple[str, ...] = BINDING + EXTRA + BENIGN
) -> dict[str, np.ndarray]:
    """Every named set, uint8 (N, 32, 32, 3). `cifar_test`: the CIFAR-10 test images as
    uint8 (N, 32, 32, 3)."""
    sets: dict[str, np.ndarray] = {}
    for name in names:
        x = SYNTHETIC[name]() if name in SYNTHETIC else FROM_CIFAR[name](cifar_test)
        assert x.dtype == np.uint8 and x.shape[1:] == (SIZE, SIZE, 3), (name, x.shape)
        sets[name] = x
    return sets


def contact_sheet(sets: dict[str, np.ndarray], path: Path, per_row: int = 16) -> None:
    """A PNG with one row of the first `per_row` images of each set, 2x enlarged."""
    rows = [np.concatenate(list(x[:per_row]), axis=1) for x in sets.values()]
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(path)
