"""Does the drift monitor see a shifted input stream? Windows through a real `bentoml serve`.

    python benchmarks/drift_bench.py [--preset fast-cpu-quick] [--epochs 2] [--alpha 0.01]

One model is trained on the real CIFAR-10 (40,000/10,000 split) as a run is
(cifarlab.experiment.run_experiment: export, evaluation, out-of-distribution reference), put in
a temporary BentoML store with its reference (as cifar-import-champion does) and served by
`bentoml serve serving.service:CifarClassifier` with its prediction log on. The monitor's
reference is that model's answers on its validation split (cifarlab.drift.reference, as
flows/train_tasks.py logs it).

Per condition, ONE pass of 10,000 images goes through POST /classify_batch (PNG uploads,
100 per request); the records the service wrote are cut into 20 windows of 500 images (each
image in exactly one window; with one pass per condition instead of one per window, since the
windows never share a request) and each window is tested with cifarlab.drift.window_arrays +
compare, exactly what the monitor flow runs per window. Conditions (CIFAR-10 test images):
clean (the 10,000 test images, disjoint windows), brightness x1.4, Gaussian noise, Gaussian
blur, JPEG quality 10, greyscale, two classes (each window 250 + 250 test images of one pair of
classes, a different pair per window) and half digits (each window 250 test images + 250
scikit-learn digits, benchmarks/ood_sets.py). Targets: clean at most 1 window of 20 flagged,
every shift at least 19 of 20. Saved to benchmarks/results/drift.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from machine_info import cpu_model  # beside this script
from ood_sets import digits, load_cifar_test
from PIL import Image, ImageFilter
from serve_bench import multipart, save_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "cifar10" / "cifar-10-batches-py"
WINDOWS, WINDOW = 20, 500
BRIGHTNESS = 1.4
NOISE_SIGMA = 0.08 * 255
BLUR_RADIUS = 1.0
JPEG_QUALITY = 10
CONDITIONS = {
    "clean": "the 10,000 CIFAR-10 test images, unchanged (disjoint windows)",
    "brightness_up_40pct": f"pixels x {BRIGHTNESS}, rounded and clipped to 255",
    "gaussian_noise": f"i.i.d. Gaussian pixel noise, sigma {NOISE_SIGMA:.1f} (0.08 x 255), clipped",
    "blur": f"Pillow GaussianBlur, radius {BLUR_RADIUS}",
    "jpeg_q10": f"JPEG quality {JPEG_QUALITY} (Pillow, 4:2:0), decoded, sent as PNG",
    "greyscale": 'Pillow convert("L") and back to RGB',
    "two_classes": "per window 250 + 250 test images of one pair of classes, 20 different pairs",
    "half_digits": "per window 250 test images + 250 scikit-learn digits (32x32 RGB, drawn "
    "without replacement per window; the 1,797 digits recur across windows)",
}


def _per_image(x: np.ndarray, fn) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(im)).convert("RGB")) for im in x])


def _jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    return Image.open(buf)


def _two_classes(test: np.ndarray, labels: np.ndarray, rng) -> tuple[np.ndarray, list]:
    """Per window 250 test images of each class of one pair, a different pair per window."""
    pairs = list(itertools.combinations(range(10), 2))
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[:WINDOWS]]
    picks = [
        rng.choice(np.flatnonzero(labels == c), WINDOW // 2, replace=False)
        for pair in pairs
        for c in pair
    ]
    return test[np.concatenate(picks)], [[int(c) for c in p] for p in pairs]


def _half_digits(test: np.ndarray, rng) -> np.ndarray:
    """Per window 250 test images (disjoint across windows) and 250 digits."""
    dig, half = digits(), WINDOW // 2
    cifar = test[rng.permutation(len(test))[: WINDOWS * half]]
    parts = []
    for w in range(WINDOWS):
        parts += [cifar[w * half : (w + 1) * half], dig[rng.choice(len(dig), half, replace=False)]]
    return np.concatenate(parts)


def build_conditions(test: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[dict, list]:
    """Condition -> uint8 (WINDOWS * WINDOW, 32, 32, 3), window w being rows [w*500, (w+1)*500);
    and the two-classes condition's pairs."""
    rng = np.random.default_rng(seed)
    clean = test[: WINDOWS * WINDOW]
    noisy = clean.astype(np.float32) + NOISE_SIGMA * rng.standard_normal(clean.shape)
    two, pairs = _two_classes(test, labels, rng)
    mixed = _half_digits(test, rng)
    return {
        "clean": clean,
        "brightness_up_40pct": np.clip(np.rint(clean * BRIGHTNESS), 0, 255).astype(np.uint8),
        "gaussian_noise": np.clip(np.rint(noisy), 0, 255).astype(np.uint8),
        "blur": _per_image(clean, lambda im: im.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))),
        "jpeg_q10": _per_image(clean, _jpeg),
        "greyscale": _per_image(clean, lambda im: im.convert("L")),
        "two_classes": two,
        "half_digits": mixed,
    }, pairs


def train(preset_name: str, epochs: int, source: Path, root: Path) -> dict:
    """Train, export and evaluate one preset; its ONNX file, OOD reference and the monitor's
    reference (the served file's answers on the validation split)."""
    from cifarlab.config import preset
    from cifarlab.drift import reference
    from cifarlab.experiment import run_experiment
    from cifarlab.export import model_input

    config = preset(
        preset_name,
        data={"source": str(source), "train_size": 40000, "val_size": 10000},
        train={"epochs": epochs, "device": "cpu", "tta": "none"},
    )
    t0 = time.perf_counter()
    outcome = run_experiment(config, root)
    seconds = time.perf_counter() - t0
    ood = outcome.evaluation.ood
    assert ood is not None and outcome.val.logits is not None
    ref = reference(outcome.val.logits, model_input(outcome.run.val_images), ood)
    return {
        "onnx": outcome.exported.path,
        "ood": ood,
        "reference": ref,
        "preset": config.preset,
        "val_accuracy": float(outcome.val.accuracy),
        "test_accuracy": float(outcome.test.accuracy),
        "train_and_evaluate_seconds": round(seconds, 1),
    }


def store_model(home: Path, model: dict) -> None:
    """The model in the BentoML store at `home`, with its OOD reference, as the service reads it."""
    meta = {"preset": model["preset"], "val_accuracy": model["val_accuracy"],
            "test_accuracy": model["test_accuracy"], "note": "drift benchmark model"}  # fmt: skip
    save_model(home, Path(model["onnx"]), meta, model["ood"])


def to_pngs(images: np.ndarray) -> list[bytes]:
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def send_pass(port: int, name: str, pngs: list[bytes], batch: int, clients: int) -> float:
    """POST every image once to /classify_batch, `batch` per request, `clients` keep-alive
    connections; request ids `<name>-<offset>` (records: `<name>-<offset>.<index>`)."""
    local = threading.local()

    def post(start: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body, ctype = multipart(pngs[start : start + batch], "images")
        headers = {"Content-Type": ctype, "X-Request-Id": f"{name}-{start:05d}"}
        local.conn.request("POST", "/classify_batch", body=body, headers=headers)
        resp = local.conn.getresponse()
        text = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{name} at {start}: HTTP {resp.status} {text[:300]!r}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post, range(0, len(pngs), batch)))
    return time.perf_counter() - t0


def wait_records(folder: Path, expected: int, timeout: float = 300) -> list[dict]:
    """The service's prediction records, once all `expected` are written (0.5 s flushes)."""
    from serving.logfiles import read_records

    deadline = time.monotonic() + timeout
    while True:
        records = list(read_records(folder, kind="prediction"))
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(1)


def windows_of(records: list[dict], name: str) -> list[list[dict]]:
    """A condition's records cut into its windows, by the image's place in the pass."""
    out: list[list[dict]] = [[] for _ in range(WINDOWS)]
    for r in records:
        head, index = r["request_id"].rsplit(".", 1)
        cond, start = head.rsplit("-", 1)
        if cond == name:
            out[(int(start) + int(index)) // WINDOW].append(r)
    return out


def judge(ref: dict, windows: list[list[dict]], alpha: float) -> dict:
    """Every window through the monitor's test; what fired and how often."""
    from cifarlab.constants import CLASS_NAMES
    from cifarlab.drift import compare, window_arrays

    fired: Counter = Counter()
    top: Counter = Counter()
    flagged, min_q, ood_rates, conf = [], [], [], []
    by = Counter()  # windows in which a test of each kind fired
    for w, recs in enumerate(windows):
        if len(recs) != WINDOW:
            raise RuntimeError(f"window {w}: {len(recs)} records, expected {WINDOW}")
        verdict = compare(ref, window_arrays(recs), CLASS_NAMES, alpha=alpha)
        fired.update(verdict.fired)
        by["image_statistics"] += any(t.startswith("image_") for t in verdict.fired)
        by["model_outputs"] += any(not t.startswith("image_") for t in verdict.fired)
        best = min(verdict.tests, key=lambda t: t.p_corrected)
        top[best.name] += 1
        min_q.append(best.p_corrected)
        ood_rates.append(verdict.summary["ood_rate"])
        conf.append(verdict.summary["confidence_mean"])
        if verdict.drift:
            flagged.append(w)
    return {
        "flagged": len(flagged),
        "flagged_windows": flagged,
        "flagged_by": {k: by[k] for k in ("model_outputs", "image_statistics")},
        "tests": len(verdict.tests),
        "mean_tests_fired": sum(fired.values()) / len(windows),
        "fired": dict(fired.most_common()),
        "median_min_p_corrected": float(statistics.median(min_q)),
        "most_significant_test": dict(top.most_common()),
        "mean_ood_rate": float(np.mean(ood_rates)),
        "mean_confidence": float(np.mean(conf)),
    }


def run_service(model: dict, sets: dict, tmp: Path, batch: int, clients: int) -> tuple:
    """Serve the model, send every condition's pass; the records and the seconds per pass."""
    from stacks.processes import BentoServer

    home, log_dir = tmp / "bentoml", tmp / "prediction-log"
    store_model(home, model)
    env = {"CIFAR_PREDICTION_LOG_DIR": str(log_dir), "CIFAR_MODEL_POLL_SECONDS": "0"}
    pngs = {name: to_pngs(x) for name, x in sets.items()}
    seconds = {}
    with BentoServer(home, tmp / "serve.log", env) as url:
        port = int(url.rsplit(":", 1)[1])
        send_pass(port, "warmup", pngs["clean"][:400], batch, clients)
        for name, files in pngs.items():
            seconds[name] = send_pass(port, name, files, batch, clients)
            print(f"{name}: {len(files)} images in {seconds[name]:.1f} s", flush=True)
        records = wait_records(log_dir, 400 + sum(len(v) for v in pngs.values()))
    return records, seconds


def table(conditions: dict) -> str:
    lines = [
        f"{'condition':<20}{'flagged':>8}{'target':>7}{'med. min q':>11}{'OOD rate':>9}"
        f"{'img/s':>7}{'by outputs':>11}{'by pixels':>10}{'fired':>9}  most significant test"
    ]
    for name, c in conditions.items():
        top = max(c["most_significant_test"].items(), key=lambda kv: kv[1])
        lines.append(
            f"{name:<20}{c['flagged']:>5}/{WINDOWS}{c['target']:>7}"
            f"{c['median_min_p_corrected']:>11.1e}{c['mean_ood_rate']:>9.3f}"
            f"{c['images_per_s']:>7.0f}{c['flagged_by']['model_outputs']:>11}"
            f"{c['flagged_by']['image_statistics']:>10}"
            f"  {c['mean_tests_fired']:>4.1f}/{c['tests']}  {top[0]} ({top[1]}/{WINDOWS})"
        )
    return "\n".join(lines)


def assess(ref: dict, records: list[dict], sets: dict, seconds: dict, alpha: float) -> dict:
    """Per condition: its windows judged, against its target, with the pass's speed."""
    conditions = {}
    for name in sets:
        t0 = time.perf_counter()
        result = judge(ref, windows_of(records, name), alpha)
        clean = name == "clean"
        conditions[name] = {
            "description": CONDITIONS[name],
            "target": "<= 1" if clean else f">= {WINDOWS - 1}",
            "meets_target": result["flagged"] <= 1 if clean else result["flagged"] >= WINDOWS - 1,
            **result,
            "pass_seconds": round(seconds[name], 2),
            "images_per_s": round(len(sets[name]) / seconds[name], 1),
            "monitor_seconds": round(time.perf_counter() - t0, 2),
        }
    return conditions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fast-cpu-quick")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=100, help="images per request")
    parser.add_argument("--clients", type=int, default=2, help="concurrent connections")
    parser.add_argument(
        "--source", type=Path, default=Path(os.environ.get("CIFAR10_SOURCE") or DEFAULT_SOURCE)
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/drift.json")
    args = parser.parse_args()
    if not (args.source / "test_batch").is_file():
        sys.exit(f"error: no CIFAR-10 at {args.source} (set --source or CIFAR10_SOURCE)")
    if WINDOW % args.batch:
        parser.error(f"--batch must divide the window size {WINDOW}")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    started = time.perf_counter()
    test, labels = load_cifar_test(args.source)
    sets, pairs = build_conditions(test, labels)
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        model = train(args.preset, args.epochs, args.source, Path(tmp) / "run")
        print(json.dumps({k: v for k, v in model.items() if isinstance(v, (str, float))}))
        records, seconds = run_service(model, sets, Path(tmp), args.batch, args.clients)
    conditions = assess(model["reference"], records, sets, seconds, args.alpha)
    conditions["two_classes"]["class_pairs"] = pairs
    print(table(conditions))
    results = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/drift_bench.py --preset {args.preset} "
        f"--epochs {args.epochs} --alpha {args.alpha:g}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model()},
        "method": "one pass of 10,000 images per condition through a real `bentoml serve` "
        f"(POST /classify_batch, {args.batch} PNGs per request, {args.clients} connections); "
        f"its prediction records cut into {WINDOWS} windows of {WINDOW} images, each tested "
        "with cifarlab.drift.window_arrays + compare against the model's validation answers",
        "model": {k: v for k, v in model.items() if k not in ("onnx", "ood", "reference")}
        | {"epochs": args.epochs, "reference_images": len(model["reference"]["probabilities"])},
        "alpha": args.alpha,
        "window": WINDOW,
        "windows": WINDOWS,
        "records": len(records),
        "all_targets_met": all(c["meets_target"] for c in conditions.values()),
        "conditions": conditions,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
