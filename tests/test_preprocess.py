"""Serving's image rules and batching, in-process (no server)."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.tensors import normalize
from serving.engine import MicroBatcher
from serving.preprocess import ImageRejected, decode_image, to_model_input

ROOT = Path(__file__).resolve().parents[1]


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_32x32_png_gives_exactly_the_training_input():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    decoded = np.stack([decode_image(_encode(Image.fromarray(p))).pixels for p in pixels])
    assert (decoded == pixels).all()  # lossless, no resize
    ours = to_model_input(decoded)
    theirs = normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.device("cpu")).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_central_square_is_kept_and_resized():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 200  # the central 40x40 square is bright, the sides black
    out = decode_image(_encode(Image.fromarray(img))).pixels
    assert out.shape == (32, 32, 3) and out.min() >= 190  # nothing of the black sides


def test_transparency_is_flattened_onto_white():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    assert (decode_image(_encode(rgba)).pixels == 255).all()


def test_16_bit_grayscale_keeps_its_top_8_bits():
    values = np.full((32, 32), 0xAB00 + 0x7F, np.uint16)
    out = decode_image(_encode(Image.fromarray(values)))
    assert out.mode.startswith("I") and (out.pixels == 0xAB).all()


def test_animation_uses_the_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 250, 0))]
    out = decode_image(_encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    assert out.frames == 2 and out.pixels[..., 0].mean() > 200 and out.pixels[..., 1].mean() < 50


def test_pixel_limit_is_checked_before_decoding():
    big = _encode(Image.new("L", (3000, 3000)))  # 9 MP, a few kB of PNG
    with pytest.raises(ImageRejected, match="9.0 megapixels") as err:
        decode_image(big, max_pixels=4_000_000)
    assert err.value.status == 413


@pytest.mark.parametrize("data,status", [(b"", 400), (b"GIF89a", 400), (b"plain text", 415)])
def test_broken_uploads_are_named(data, status):
    with pytest.raises(ImageRejected) as err:
        decode_image(data)
    assert err.value.status == status


def test_batcher_merges_concurrent_requests_and_keeps_their_order():
    seen: list[int] = []

    def infer(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return x * 2

    async def main():
        batcher = MicroBatcher(infer, max_batch_size=16)
        inputs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(40)]
        outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        batcher.close()
        return inputs, outs

    inputs, outs = asyncio.run(main())
    for x, y in zip(inputs, outs):
        np.testing.assert_array_equal(y, x * 2)
    assert sum(seen) == sum(len(x) for x in inputs) and max(seen) <= 16
    assert len(seen) < len(inputs)  # merged


def test_service_imports_neither_torch_nor_prefect_nor_mlflow(tmp_path):
    code = (
        "import sys, serving.service; "
        "print([m for m in ('torch', 'prefect', 'mlflow') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "BENTOML_HOME": str(tmp_path)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
