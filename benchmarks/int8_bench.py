"""int8 vs fp32: accuracy and onnxruntime speed of the same trained model on real CIFAR-10.

    python benchmarks/int8_bench.py [--preset seed-baseline] [--epochs 4] [--train-size 20000]

Trains the preset on the real data (a short run: the point is the fp32/int8 gap, not a record),
exports it, builds the int8 twin exactly as train-cifar does (cifarlab/quantize.py: static,
calibrated on 512 training images), evaluates both with onnxruntime on the validation and the
10,000 test images, and times both at batch 1 and 256 (median of 3 timings of 20 calls each,
with 1 and with all onnxruntime threads) and over the validation and test sets, on one session
or on a single-threaded session per core (`val_test_evaluation_seconds`). Saves
benchmarks/results/int8-<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine_info import cpu_flags, cpu_model  # beside this script

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "cifar10" / "cifar-10-batches-py"


def timed(path: Path, batch: int, threads: int, calls: int = 20) -> float:
    """Median ms per call over 3 timings of `calls` calls."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            session.run(None, {name: x})
        runs.append(1000 * (time.perf_counter() - t0) / calls)
    return statistics.median(runs)


def val_test_evaluation_seconds(path: Path, sets: list, repeats: int = 5) -> dict[str, object]:
    """Seconds to evaluate all `sets` with `path` on one session (onnxruntime's threads over
    each batch) and on a single-threaded session per core (median of `repeats`, the two ways
    alternating, sessions made inside the timing both ways), and whether both ways give the
    same predictions."""
    import numpy as np

    from cifarlab.export import evaluate_onnx, evaluate_onnx_per_core

    times: dict[str, list[float]] = {"one_session": [], "session_per_core": []}
    results = {}
    for _ in range(repeats):
        for way in times:
            t0 = time.perf_counter()
            results[way] = (
                [evaluate_onnx(path, x, y) for x, y in sets]
                if way == "one_session"
                else evaluate_onnx_per_core(path, sets)
            )
            times[way].append(time.perf_counter() - t0)
    out: dict[str, object] = {way: round(statistics.median(t), 3) for way, t in times.items()}
    out["images"] = sum(len(y) for _, y in sets)
    out["same_predictions"] = all(
        np.array_equal(a.predictions, b.predictions)
        for a, b in zip(results["one_session"], results["session_per_core"])
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed-baseline")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--source", default=os.environ.get("CIFAR10_SOURCE", str(DEFAULT_SOURCE)))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from cifarlab.config import preset
    from cifarlab.experiment import run_experiment
    from cifarlab.export import model_input
    from cifarlab.quantize import MAX_DROP, build_int8, calibration_set

    config = preset(
        args.preset,
        data={"source": args.source, "train_size": args.train_size, "val_size": args.val_size},
        train={"epochs": args.epochs, "device": "cpu"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        outcome = run_experiment(config, Path(tmp))
        train_s = time.perf_counter() - t0
        run, d = outcome.run, outcome.run.data.data
        t0 = time.perf_counter()
        report = build_int8(
            outcome.exported.path,
            outcome.val,
            calibration_set(d.train_images, run.split.train_idx),
            run.val_images,
            run.val_labels,
            d.test_images,
            d.test_labels,
            Path(tmp) / "model_int8.onnx",
        )
        int8_s = time.perf_counter() - t0
        cores = os.cpu_count() or 1
        import onnxruntime

        ort_version = onnxruntime.__version__
        sets = [
            (model_input(run.val_images), run.val_labels),
            (model_input(d.test_images), d.test_labels),
        ]
        set_seconds = {
            kind: val_test_evaluation_seconds(path, sets)
            for kind, path in (("fp32", outcome.exported.path), ("int8", report.path))
        }
        speed = {
            f"{kind}_batch{b}_threads{t}_ms": round(timed(path, b, t), 3)
            for kind, path in (("fp32", outcome.exported.path), ("int8", report.path))
            for b in (1, 256)
            for t in sorted({1, cores})
        }
        sizes = {
            "fp32_bytes": outcome.exported.path.stat().st_size,
            "int8_bytes": report.path.stat().st_size,
        }
    result = {
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(),
            "cores": cores,
            "platform": platform.platform(),
            "onnxruntime": ort_version,
        },
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "preset": args.preset,
        "epochs": args.epochs,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "train_and_export_seconds": round(train_s, 1),
        "int8_build_and_evaluate_seconds": round(int8_s, 1),
        "fp32": {"val_accuracy": outcome.val.accuracy, "test_accuracy": outcome.test.accuracy},
        "int8": {
            "val_accuracy": report.val.accuracy,
            "test_accuracy": report.test.accuracy,
            "calibration_images": report.calibration_images,
            "weight_bits": report.weight_bits,
        },
        # How often the two files name the same class, and how many test images each gets right.
        "test_same_class_fraction": float(
            (outcome.test.predictions == report.test.predictions).mean()
        ),
        "test_correct": {
            "fp32": int((outcome.test.predictions == d.test_labels.numpy()).sum()),
            "int8": int((report.test.predictions == d.test_labels.numpy()).sum()),
        },
        "val_drop_points": round(100 * report.val_drop, 3),
        "test_drop_points": round(100 * (outcome.test.accuracy - report.test.accuracy), 3),
        "servable_rule": f"val drop <= {100 * MAX_DROP:.1f} points",
        "servable": report.servable,
        "speed_ms_per_call": speed,
        # Validation and test evaluated on one session spreading each batch over the cores, or
        # on a single-threaded session per core taking the batches of both sets in turn
        # (cifarlab.export.evaluate_onnx_per_core).
        "val_test_evaluation_seconds": set_seconds,
        "int8_speedup": {
            k.removeprefix("fp32_").removesuffix("_ms"): round(
                speed[k] / speed[k.replace("fp32", "int8")], 2
            )
            for k in speed
            if k.startswith("fp32")
        },
        **sizes,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"int8-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
