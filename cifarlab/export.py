"""ONNX export with a dynamic batch axis, the parity check that gates registration, and the
evaluation of the exported file itself (what the endpoint serves is what is measured).

The exported graph takes *normalised* float images (N, 3, 32, 32), like the PyTorch model; the
service normalises with the same constants (`cifarlab.constants`). With `tta` the test-time
augmentation is part of the graph, so the served model computes what was evaluated.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifarlab.cpu import usable_cores
from cifarlab.evaluate import EvalResult, score, tta_logits
from cifarlab.tensors import normalize

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PARITY_ATOL = 1e-4  # max |logit difference| allowed between PyTorch and onnxruntime


class ParityError(RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""


class WithTTA(nn.Module):
    """A model whose forward pass averages its test-time augmentation views (see `tta_logits`)."""

    def __init__(self, model: nn.Module, tta: str) -> None:
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) -> (N, 10)
        return tta_logits(self.model, x, self.tta)


def servable(model: nn.Module, tta: str = "none") -> nn.Module:
    """The CPU fp32 eval-mode copy of `model` that is exported, with `tta` in its forward pass."""
    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    return cpu_model if tta == "none" else WithTTA(cpu_model, tta).eval()


# Which torch exporter writes the file. Their files give the same logits to within 1e-7 and
# run equally fast in onnxruntime (fast-cpu and seed-baseline nets, with and without TTA); the
# TorchScript one takes 0.1 s where the dynamo one takes 2.4 s in a fresh process (it builds
# onnxscript's op registry first), and every flow run is a fresh process. Torch marks the
# TorchScript exporter deprecated: should a torch upgrade remove it, set DEFAULT_EXPORTER to
# "dynamo" (tests/test_export.py checks both).
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
OPSET = 18


def export_onnx(
    model: nn.Module, path: Path, tta: str = "none", exporter: str = DEFAULT_EXPORTER
) -> Path:
    """Export a CPU fp32 copy of the model (with `tta` baked in) to one self-contained `.onnx`
    file, batch axis dynamic (named "batch")."""
    import warnings

    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r}: expected one of {', '.join(EXPORTERS)}")
    cpu_model = servable(model, tta)
    example = torch.zeros(2, 3, 32, 32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            cpu_model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
        )
    else:
        with warnings.catch_warnings():
            # Its own notices that it is deprecated (see above).
            warnings.filterwarnings(
                "ignore",
                message=".*legacy TorchScript-based ONNX export",
                category=DeprecationWarning,
            )
            warnings.filterwarnings(
                "ignore", message="The feature will be removed", category=DeprecationWarning
            )
            # A flip is a Slice of step -1, which it cannot constant-fold: nothing to fold there.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(
                cpu_model,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                dynamo=False,
                opset_version=OPSET,
            )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def onnx_session(path: Path, threads: int = 0):
    """An onnxruntime CPU session (the Azure provider that is also listed is never wanted);
    `threads`: its intra-op threads (0: onnxruntime's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class ParityReport:
    """How closely onnxruntime reproduces PyTorch on real images."""

    images: int
    max_abs_diff: float
    argmax_agreement: float  # fraction of images with the same predicted class
    atol: float

    @property
    def passed(self) -> bool:
        """Within tolerance and the same class for every image."""
        return self.max_abs_diff <= self.atol and self.argmax_agreement == 1.0

    def as_dict(self) -> dict[str, float | int | bool]:
        """Plain values, for tracking."""
        return {**asdict(self), "passed": self.passed}


@torch.inference_mode()
def check_parity(
    model: nn.Module,
    onnx_path: Path,
    images: torch.Tensor,
    atol: float = PARITY_ATOL,
    batch_size: int = 500,
    tta: str = "none",
    channels_last: bool = True,
) -> ParityReport:
    """Compare PyTorch (fp32, CPU, with the same `tta` as the export) and onnxruntime logits on
    uint8 images (N, 3, 32, 32). PyTorch runs channels-last where the net trained so (the
    default, `train.channels_last`): the same logits (to ~1e-7), sooner (1,000 images: 0.42-0.46
    s against 0.60-0.76 s for the seed net, 2.8 against 3.4 s for the fast net, on a 2-core AMD
    EPYC; most of the export stage)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    cpu_model = servable(model, tta).to(memory_format=layout)
    session = onnx_session(onnx_path)
    max_diff, agree = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size], torch.device("cpu"))
        expected = cpu_model(x.contiguous(memory_format=layout)).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        max_diff = max(max_diff, float(np.abs(expected - got).max()))
        agree += int((expected.argmax(1) == got.argmax(1)).sum())
    return ParityReport(
        images=len(images),
        max_abs_diff=max_diff,
        argmax_agreement=agree / max(len(images), 1),
        atol=atol,
    )


def require_parity(report: ParityReport) -> None:
    """Raise ParityError naming the numbers when the export is not faithful."""
    if not report.passed:
        raise ParityError(
            f"ONNX export differs from PyTorch on {report.images} images: max |logit diff| "
            f"{report.max_abs_diff:.3g} (allowed {report.atol:.0e}), same class on "
            f"{100 * report.argmax_agreement:.2f}% (need 100%)"
        )


def onnx_latency_ms(
    onnx_path: Path, batch_sizes: tuple[int, ...] = (1, 256), repeats: int = 20
) -> dict[int, float]:
    """Median onnxruntime latency (ms) per call at each batch size, after a warm-up call."""
    session = onnx_session(onnx_path)
    out = {}
    for bs in batch_sizes:
        x = np.random.default_rng(0).standard_normal((bs, 3, 32, 32), dtype=np.float32)
        session.run(None, {INPUT_NAME: x})
        times = []
        for _ in range(repeats if bs < 64 else max(3, repeats // 4)):
            t0 = time.perf_counter()
            session.run(None, {INPUT_NAME: x})
            times.append(1000 * (time.perf_counter() - t0))
        out[bs] = statistics.median(times)
    return out


def model_input(images: torch.Tensor) -> np.ndarray:
    """uint8 images (N, 3, 32, 32) as the exported file takes them (normalised float32): made
    once for a set that several files are run on (the served file and its int8 twin)."""
    return normalize(images, torch.device("cpu")).numpy()


def _as_model_input(images: torch.Tensor | np.ndarray):
    """A function giving the exported file's input for a slice of `images`: uint8 images are
    normalised per slice; an ndarray must already be the input (`model_input`)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.float32 or images.shape[1:] != (3, 32, 32):
            raise ValueError(
                f"expected the model's input, float32 (N, 3, 32, 32) from "
                f"model_input(), got {images.dtype} {images.shape}"
            )
        return np.asarray

    def prepare(x: torch.Tensor) -> np.ndarray:
        return normalize(x, torch.device("cpu")).numpy()

    return prepare


def onnx_logits(
    onnx_path: Path, images: torch.Tensor | np.ndarray, batch_size: int = 1000
) -> np.ndarray:
    """onnxruntime logits (N, 10) float32 of an exported file for uint8 images (N, 3, 32, 32),
    or for images already made its input (`model_input`)."""
    prepare = _as_model_input(images)
    session = onnx_session(onnx_path)
    out = [
        session.run([OUTPUT_NAME], {INPUT_NAME: prepare(images[start : start + batch_size])})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.empty((0, 10), np.float32)


def evaluate_onnx(
    onnx_path: Path, images: torch.Tensor | np.ndarray, labels: torch.Tensor
) -> EvalResult:
    """Loss, accuracy, per-class accuracy and confusion of the exported file itself (images
    uint8, or already its input: `model_input`); the logits are kept on the result."""
    logits = onnx_logits(onnx_path, images)
    result = score(torch.from_numpy(logits), labels)
    result.logits = logits
    return result


def evaluate_onnx_per_core(
    onnx_path: Path,
    sets: Sequence[tuple[torch.Tensor | np.ndarray, torch.Tensor]],
    batch_size: int = 1000,
    workers: int | None = None,
) -> list[EvalResult]:
    """`evaluate_onnx` of each (images, labels) set, on a single-threaded session per core
    (`workers`: default `usable_cores()`) taking the sets' batches in turn, instead of one
    session spreading each batch over the cores. For a graph whose kernels spread over the
    cores poorly, as the int8 twin's do on a CPU without int8 dot-product instructions:
    benchmarks/int8_bench.py times both ways (`val_test_evaluation_seconds`)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    prepares = [_as_model_input(images) for images, _ in sets]  # refuse a bad set up front
    jobs = [
        (i, start)
        for i, (images, _) in enumerate(sets)
        for start in range(0, len(images), batch_size)
    ]
    local = threading.local()

    def run(job: tuple[int, int]) -> np.ndarray:
        if not hasattr(local, "session"):
            local.session = onnx_session(onnx_path, threads=1)
        i, start = job
        x = prepares[i](sets[i][0][start : start + batch_size])
        return local.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    # onnxruntime releases the GIL while it computes: the sessions really run side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(workers or usable_cores(), len(jobs)))) as pool:
        outs = list(pool.map(run, jobs))  # in the order of `jobs`
    results = []
    for i, (_, labels) in enumerate(sets):
        mine = [out for (j, _), out in zip(jobs, outs) if j == i]
        logits = np.concatenate(mine) if mine else np.empty((0, 10), np.float32)
        results.append(score(torch.from_numpy(logits), labels))
    return results
