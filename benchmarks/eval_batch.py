"""Evaluation speed against batch size: why `cifarlab.evaluate.eval_batch_size` picks what it does.

    python benchmarks/eval_batch.py [--images 5000] [--repeats 3]

Times `predict_logits` (PyTorch, channels_last, inference mode) of the seed-baseline and
fast-cpu nets (untrained weights: speed does not depend on them) and onnxruntime on the exported
seed-baseline file, on random uint8 images, at several batch sizes; the median of `repeats`
passes each. Saves JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine_info import cpu_flags, cpu_model  # beside this script

from cifarlab.evaluate import predict_logits
from cifarlab.export import export_onnx, onnx_logits
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (128, 256, 512, 1000)
NETS = {"seed-baseline": ("seed-baseline", {}), "fast-cpu": ("fast", {"widths": (64, 128, 128)})}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval-batch-cpu.json"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    results: dict[str, object] = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "images": args.images,
        "pytorch": {},
        "onnxruntime": {},
    }
    for label, (name, options) in NETS.items():
        model = build_model(name, **options).eval().to(memory_format=torch.channels_last)
        results["pytorch"][label] = {
            str(b): round(
                args.images
                / median_seconds(
                    lambda b=b: predict_logits(
                        model, images, device=cpu, batch_size=b, channels_last=True
                    ),
                    args.repeats,
                )
            )
            for b in BATCHES
        }
        print(label, "PyTorch images/s by batch:", results["pytorch"][label], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(build_model("seed-baseline"), Path(tmp) / "seed.onnx")
        results["onnxruntime"]["seed-baseline"] = {
            str(b): round(
                args.images / median_seconds(lambda b=b: onnx_logits(path, images, b), args.repeats)
            )
            for b in BATCHES
        }
    print("seed-baseline onnxruntime images/s by batch:", results["onnxruntime"]["seed-baseline"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
