"""How well `ood_score` tells CIFAR-10 from other images, against maximum softmax probability.

    python benchmarks/ood_bench.py [--presets seed-baseline fast-cpu-quick] [--epochs 5 2]

Each preset is trained on the real CIFAR-10 (40,000/10,000 split) exactly as a run is
(cifarlab.experiment.run_experiment: export, evaluation, and the out-of-distribution reference
fitted as at registration). The served path then scores every set: serving.engine.Engine with
that reference, on the images as the service makes them its input. Sets (benchmarks/ood_sets.py,
built offline): the CIFAR-10 test set (in-distribution) against scikit-learn's digits upscaled,
solid colours, uniform and Gaussian noise, rendered text, CIFAR-10 test images under heavy blur
and under JPEG quality 5 (the union of these is the target: AUROC >= 0.90), plus two extra sets
and six mild changes of CIFAR-10 images that should not be flagged.

Reported per set: AUROC (OOD as the positive class) and the false positive rate at 95 % true
positive rate (the share of the set the registered threshold, which keeps 95 % of the
validation images in, lets through), for ood_score and for 1 - max softmax probability (its
threshold likewise from the validation split). Saved to benchmarks/results/ood.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from machine_info import cpu_model  # beside this script
from ood_sets import BENIGN, BINDING, EXTRA, build_all, load_cifar_test

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "cifar10" / "cifar-10-batches-py"


def _auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def served_scores(onnx_path: Path, ref, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ood_score, 1 - max softmax probability) of uint8 (N, 32, 32, 3) images, by the
    service's own engine and input code."""
    from serving.engine import Engine
    from serving.preprocess import to_model_input

    engine = Engine(onnx_path, threads=os.cpu_count() or 1, ood=ref)
    out = np.concatenate(
        [engine.infer(to_model_input(images[s : s + 256])) for s in range(0, len(images), 256)]
    )
    return out[:, -1], 1 - out[:, :-1].max(axis=1)


def bench_preset(name: str, epochs: int, source: Path, sets: dict, test: np.ndarray) -> dict:
    from cifarlab.config import preset
    from cifarlab.experiment import run_experiment

    config = preset(
        name,
        data={"source": str(source), "train_size": 40000, "val_size": 10000},
        train={"epochs": epochs, "device": "cpu", "tta": "none"},
    )
    with tempfile.TemporaryDirectory(prefix="ood-bench-") as tmp:
        t0 = time.perf_counter()
        outcome = run_experiment(config, Path(tmp))
        train_s = time.perf_counter() - t0
        ref = outcome.evaluation.ood
        assert ref is not None and outcome.val.logits is not None
        z = outcome.val.logits.astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        msp_threshold = float(np.quantile(1 - (p / p.sum(1, keepdims=True)).max(1), 0.95))
        scored = {k: served_scores(outcome.exported.path, ref, x) for k, x in sets.items()}
        in_ood, in_msp = served_scores(outcome.exported.path, ref, test)
        t0 = time.perf_counter()
        served_scores(outcome.exported.path, ref, test[:2000])
        score_s = time.perf_counter() - t0

    def row(ood: np.ndarray, msp: np.ndarray, binding: bool = True) -> dict:
        return {
            "ood_score": {
                "auroc": _auroc(in_ood, ood),
                "fpr_at_95tpr": float(np.mean(ood <= ref.threshold)),
            },
            "msp": {
                "auroc": _auroc(in_msp, msp),
                "fpr_at_95tpr": float(np.mean(msp <= msp_threshold)),
            },
            "images": len(ood),
        }

    union = [k for k in BINDING if k in scored]
    result = {
        "preset": name,
        "epochs": epochs,
        "test_accuracy": outcome.test.accuracy,
        "train_and_fit_seconds": round(train_s, 1),
        "threshold": ref.threshold,
        "validation_kept": ref.kept,
        "test_kept": float(np.mean(in_ood <= ref.threshold)),
        "union": row(
            np.concatenate([scored[k][0] for k in union]),
            np.concatenate([scored[k][1] for k in union]),
        ),
        "sets": {k: row(*scored[k]) for k in scored if k not in BENIGN},
        "benign_flagged": {
            k: {
                "ood_score": float(np.mean(scored[k][0] > ref.threshold)),
                "msp": float(np.mean(scored[k][1] > msp_threshold)),
            }
            for k in BENIGN
            if k in scored
        },  # fmt: skip
        "engine_seconds_per_1000_images": round(score_s / 2, 3),
    }
    print(json.dumps({k: result[k] for k in ("preset", "test_accuracy", "union")}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["seed-baseline", "fast-cpu-quick"])
    parser.add_argument("--epochs", nargs="+", type=int, default=[5, 2])
    parser.add_argument(
        "--source", type=Path, default=Path(os.environ.get("CIFAR10_SOURCE") or DEFAULT_SOURCE)
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ood.json")
    args = parser.parse_args()
    if len(args.epochs) != len(args.presets):
        parser.error("--epochs: one number per preset")
    if not (args.source / "test_batch").is_file():
        sys.exit(f"error: no CIFAR-10 at {args.source} (set --source or CIFAR10_SOURCE)")
    test, _ = load_cifar_test(args.source)
    t0 = time.perf_counter()
    sets = build_all(test, BINDING + EXTRA + BENIGN)
    build_s = time.perf_counter() - t0
    results = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/ood_bench.py --presets "
        + " ".join(args.presets) + " --epochs " + " ".join(map(str, args.epochs)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model()},
        "convention": "AUROC with the OOD set as positive class and the CIFAR-10 test set as "
        "negative; fpr_at_95tpr: share of an OOD set under the threshold that keeps 95 % of the "
        "validation split in (ood_score: the registered threshold; msp: 1 - max softmax "
        "probability, its validation 95th percentile); benign_flagged: share of mildly changed "
        "CIFAR-10 images over the threshold (5 % is what clean images get)",
        "union_of": list(BINDING),
        "sets_built_seconds": round(build_s, 1),
        "set_sizes": {k: len(v) for k, v in sets.items()},
        "nets": {p: bench_preset(p, e, args.source, sets, test) for p, e in zip(args.presets, args.epochs)},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
