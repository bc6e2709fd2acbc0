"""An int8 twin of the exported model: onnxruntime's static quantisation, judged like fp32.

Weights int8 per output channel, activations uint8 with ranges calibrated (min/max) on
`CALIBRATION_IMAGES` training images of the run's own split, never on validation or test
images. The int8 file is then evaluated by onnxruntime on the same validation and test images
as the fp32 one, and timed beside it. It may be served (a setting of the service) only if its
validation accuracy is within `MAX_DROP` of the fp32 model's: validation decides, the test
figure is reported.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarlab.cpu import has_int8_dot_product
from cifarlab.evaluate import EvalResult
from cifarlab.export import INPUT_NAME, evaluate_onnx, evaluate_onnx_per_core, onnx_latency_ms
from cifarlab.tensors import normalize

CALIBRATION_IMAGES = 512
MAX_DROP = 0.005  # 0.5 points of validation accuracy


@dataclass
class Int8Report:
    path: Path
    val: EvalResult
    test: EvalResult
    val_drop: float  # fp32 minus int8 validation accuracy (positive: int8 worse)
    servable: bool  # val_drop <= MAX_DROP
    # Judged on a CPU with int8 dot-product instructions (cifarlab.cpu; None: unknown): the
    # verdict holds for CPUs of the same kind only.
    judged_with_dot_product: bool | None
    weight_bits: int  # 8, or 7 where the CPU's int8 sums could saturate (`build_int8`)
    latency_ms: dict[int, float]
    fp32_latency_ms: dict[int, float]
    calibration_images: int


def calibration_set(
    train_images: torch.Tensor, train_idx: np.ndarray, n: int = CALIBRATION_IMAGES, seed: int = 0
) -> np.ndarray:
    """`n` training images of the split (uint8 NCHW), chosen with a fixed seed, normalised
    as the model sees them."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(np.asarray(train_idx), size=min(n, len(train_idx)), replace=False)
    return normalize(train_images[np.sort(pick)], torch.device("cpu")).numpy()


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an array, 64 images at a time."""

    def __init__(self, x: np.ndarray, batch: int = 64):
        self._chunks = iter([x[i : i + batch] for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {INPUT_NAME: np.ascontiguousarray(chunk)}


def quantize_int8(
    onnx_path: Path, calibration: np.ndarray, out_path: Path, weight_bits: int = 8
) -> Path:
    """Statically quantised copy of `onnx_path` (QDQ format) calibrated on `calibration`;
    `weight_bits` 7 keeps the weights within +-64 (onnxruntime's `reduce_range`), so that the
    16-bit sums of CPUs without int8 dot-product instructions cannot saturate."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range={8: False, 7: True}[weight_bits],
        )
    return out_path


def build_int8(
    fp32_path: Path,
    fp32_val: EvalResult,
    calibration: np.ndarray,
    val_images: torch.Tensor | np.ndarray,
    val_labels: torch.Tensor,
    test_images: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor,
    out_path: Path,
    fp32_latency_ms: dict[int, float] | None = None,
) -> Int8Report:
    """Quantise, evaluate on validation and test (images uint8, or already the model's input:
    `cifarlab.export.model_input`), time both files (the fp32 one only if its timing is not
    given). On a CPU without int8 dot-product instructions, or one that does not say, the
    weights get 7 bits: with 8, an AVX2 CPU's saturating sums cost seed-baseline's twin 4.4
    validation points, with 7 it was 0.2 (benchmarks/results/int8-seed-baseline.json)."""
    dot_product = has_int8_dot_product()
    weight_bits = 8 if dot_product else 7
    path = quantize_int8(fp32_path, calibration, out_path, weight_bits)
    sets = [(val_images, val_labels), (test_images, test_labels)]
    if dot_product is False:  # the int8 kernels spread over the cores poorly (measured: AVX2)
        val, test = evaluate_onnx_per_core(path, sets)
    else:  # onnxruntime's own threading, also where the CPU cannot tell
        val, test = [evaluate_onnx(path, x, y) for x, y in sets]
    drop = fp32_val.accuracy - val.accuracy
    servable = within_allowed_drop(fp32_val.predictions, val.predictions, val_labels.numpy())
    return Int8Report(
        path,
        val,
        test,
        drop,
        servable,
        dot_product,
        weight_bits,
        onnx_latency_ms(path),
        fp32_latency_ms or onnx_latency_ms(fp32_path),
        len(calibration),
    )


def within_allowed_drop(
    fp32_pred: np.ndarray, int8_pred: np.ndarray, labels: np.ndarray, max_drop: float = MAX_DROP
) -> bool:
    """Whether int8 gets at most `max_drop` of the images fewer right than fp32, counted in
    whole images (float accuracies would refuse an exact 0.5-point drop)."""
    n = len(labels)
    lost = int((fp32_pred == labels).sum()) - int((int8_pred == labels).sum())
    return lost * 1000 <= round(max_drop * 1000 * n)
