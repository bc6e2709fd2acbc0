"""The int8 twin of a served ONNX file: built by cifarlab.quantize, logged to the run, and
described by registry version tags. Used by train-cifar (a champion's twin) and sweep-cifar
(the twin of the run a sweep promotes)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger

from registry import tracking

if TYPE_CHECKING:
    from cifarlab.quantize import Int8Report


def int8_twin(
    onnx_path: Path,
    fp32_val: Any,
    data: Any,
    split: Any,
    out_path: Path,
    store: tracking.Store,
    run_id: str,
    fp32_latency_ms: dict[int, float] | None = None,
    inputs: Any = None,
) -> Any:
    """The statically quantised copy of the served file `onnx_path` (cifarlab/quantize.py),
    calibrated on the split's training images, evaluated on its validation images and the test
    set (`inputs`: both normalised, cifarlab.experiment.EvalInputs, or None to make them) and
    timed beside it (`fp32_val`: the file's own validation result), logged to MLflow run
    `run_id` as `int8/model_int8.onnx` with its figures; None (with a warning) if onnxruntime
    cannot quantise this graph: the fp32 model is what counts."""
    from cifarlab.experiment import split_inputs
    from cifarlab.quantize import build_int8, calibration_set

    inputs = inputs or split_inputs(data, split)
    try:
        report = build_int8(
            onnx_path,
            fp32_val,
            calibration_set(data.train_images, split.train_idx),
            inputs.val,
            data.train_labels[split.val_idx],
            inputs.test,
            data.test_labels,
            out_path,
            fp32_latency_ms,
        )
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        get_run_logger().warning(
            "no int8 model: onnxruntime could not quantise it (%s: %s)", type(exc).__name__, exc
        )
        return None
    _log_twin(store, run_id, report)
    return report


def _log_twin(store: tracking.Store, run_id: str, report: Int8Report) -> None:
    """The twin's file (`int8/model_int8.onnx`), figures and verdict on the run; a log line."""
    from cifarlab.quantize import MAX_DROP

    metrics = {
        "int8_val_accuracy": report.val.accuracy, "int8_test_accuracy": report.test.accuracy,
        "int8_val_drop": report.val_drop,
        **{f"int8_latency_ms_batch{b}": ms for b, ms in report.latency_ms.items()},
    }  # fmt: skip
    tracking.log_metrics(store, run_id, metrics)
    tracking.log_files(store, run_id, {"model_int8": report.path}, folder="int8")
    store.client.set_tag(run_id, "int8_servable", str(report.servable).lower())
    store.client.set_tag(
        run_id, "int8_judged_with_dot_product", tracking.bool_tag(report.judged_with_dot_product)
    )
    store.client.set_tag(run_id, "int8_weight_bits", str(report.weight_bits))
    get_run_logger().info(
        "int8 model: validation %.2f%% (%+.2f points vs fp32; servable if within %.1f: %s), "
        "test %.2f%%, %.3f ms vs %.3f ms at batch 1",
        100 * report.val.accuracy, -100 * report.val_drop, 100 * MAX_DROP,
        "yes" if report.servable else "no", 100 * report.test.accuracy, report.latency_ms[1],
        report.fp32_latency_ms[1],
    )  # fmt: skip


def int8_version_tags(report: Any) -> dict[str, str]:
    """An int8 twin's figures as registry version tags (none without a twin)."""
    if report is None:
        return {}
    return {
        "int8_val_accuracy": f"{report.val.accuracy:.6f}",
        "int8_test_accuracy": f"{report.test.accuracy:.6f}",
        "int8_servable": str(report.servable).lower(),
        "int8_judged_with_dot_product": tracking.bool_tag(report.judged_with_dot_product),
    }
