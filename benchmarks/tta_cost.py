"""What baking test-time augmentation into the exported model costs at serving time.

    python benchmarks/tta_cost.py [--preset fast-cpu] [--threads 1] [--note "..."]

Exports the preset's net (weights untrained: speed does not depend on them) three times, with
no TTA, flip (2 views) and flip_translate (6 views) in the ONNX graph (`train.serve_tta`), and
times onnxruntime per call at batch 1 and 256 with the serving setting of one thread per worker.
Prints a table and saves JSON under benchmarks/results/. What TTA buys in accuracy comes from
the training benchmark (benchmarks/results/train-cpu-*.json: last-epoch validation accuracy
without TTA against the final one with it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine_info import cpu_model  # beside this script

from cifarlab.config import preset
from cifarlab.export import INPUT_NAME, check_parity, export_onnx
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}


def time_calls(path: Path, batch: int, threads: int, seconds: float = 3.0) -> list[float]:
    """Milliseconds per onnxruntime call at `batch`, repeated for about `seconds` after a warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as served
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    session.run(None, {INPUT_NAME: x})
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        session.run(None, {INPUT_NAME: x})
        times.append(1000 * (time.perf_counter() - t0))
    return times


def main() -> None:
    """Export with each TTA, time it, print and save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast-cpu")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (served: 1)")
    parser.add_argument("--note", default="", help="anything about the machine's load")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "tta-cost.json"
    )
    args = parser.parse_args()

    config = preset(args.preset)
    torch.manual_seed(0)
    model = build_model(config.model.name, **config.model.options).eval()
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    if hasattr(model, "init_from_data"):
        model.init_from_data(images.float() / 255)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tta, views in VIEWS.items():
            path = export_onnx(model, Path(tmp) / f"{tta}.onnx", tta=tta)
            parity = check_parity(model, path, images[:64], tta=tta)
            row = {
                "tta": tta,
                "views": views,
                "parity_max_abs_diff": parity.max_abs_diff,
                "onnx_bytes": path.stat().st_size,
            }
            for batch in (1, 256):
                ms = statistics.median(time_calls(path, batch, args.threads))
                row[f"ms_per_call_batch{batch}"] = round(ms, 3)
                row[f"ms_per_image_batch{batch}"] = round(ms / batch, 4)
            rows.append(row)
    base = rows[0]
    for row in rows:
        for batch in (1, 256):
            row[f"cost_vs_none_batch{batch}"] = round(
                row[f"ms_per_call_batch{batch}"] / base[f"ms_per_call_batch{batch}"], 2
            )
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "preset": args.preset,
        "model_options": config.model.options,
        "ort_threads": args.threads,
        "note": args.note,
        "command": "python benchmarks/tta_cost.py "
        + " ".join(f"--{k} {v!r}" for k, v in (("preset", args.preset), ("threads", args.threads))),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.preset} on {result['machine']['cpu']}, {args.threads} onnxruntime thread(s)")
    print(
        "| TTA in the graph | views | ms/image at batch 1 | ms/image at batch 256 | x none (1 / 256) |"
    )
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tta']} | {r['views']} | {r['ms_per_image_batch1']:.3f} | "
            f"{r['ms_per_image_batch256']:.4f} | {r['cost_vs_none_batch1']} / "
            f"{r['cost_vs_none_batch256']} |"
        )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
