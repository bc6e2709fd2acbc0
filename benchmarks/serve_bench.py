"""Speed of the BentoML service: real PNG uploads over HTTP vs the same work in-process.

    python benchmarks/serve_bench.py [--seconds 5] [--repeats 3] [--concurrency 1 8 32] [--store]
    python benchmarks/serve_bench.py --recording [--repeats 7] [--seconds 5]

The model: by default the architecture of the default preset on this machine (`fast`: fast-cpu
without CUDA) with freshly initialised weights, exported to ONNX and put in a temporary BentoML
store (speed does not depend on the weights); `--store` serves the newest model already in
$BENTOML_HOME instead. The images: the first 1,000 CIFAR-10 test images as PNG (random images
where the data is absent).

Measured in one run, on one machine (server, load generator and in-process loop share its CPUs):
  - in-process, one image at a time: decode + preprocess + onnxruntime at batch 1, no HTTP;
  - in-process, batched: decode + preprocess each image, onnxruntime on batches of 64;
  - HTTP /classify at each concurrency: requests/s, p50/p90/p99 latency; clients send the next
    upload as soon as they have an answer, over keep-alive connections, then again with a new
    connection per request as curl does (one asyncio loop drives them all);
  - HTTP /classify_batch with 64 images per request at concurrency 2: images/s.
Saves JSON under benchmarks/results/.

`--recording` measures instead what the prediction log costs (serving/records.py): two servers
of the same model, one recording and one with CIFAR_PREDICTION_LOG=false, loaded in turn
(/classify, multipart, keep-alive, the highest --concurrency; --repeats times each, interleaved), medians
and their ratio; and in-process, the CPU time per record of the handler's part (an `Answer`
appended to the queue) and of the writer's (lines, index rows, file), measured on 20,000 records.
Saved to benchmarks/results/recording-cost.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import statistics
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from machine_info import cpu_model  # beside this script
from PIL import Image

from serving.engine import Engine
from serving.preprocess import decode_image, to_model_input
from stacks.processes import BentoServer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "cifar10" / "cifar-10-batches-py"


def model_store(home: Path):
    """The BentoML model store under `home` (a benchmark may reach into BentoML: any home)."""
    from bentoml._internal.models import ModelStore

    return ModelStore(Path(home) / "models")


def load_pngs(source: Path, n: int) -> list[bytes]:
    if (source / "test_batch").is_file():
        with open(source / "test_batch", "rb") as f:
            raw = pickle.load(f, encoding="bytes")[b"data"][:n]
        pixels = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    out = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def save_model(home: Path, onnx: Path, meta: dict, ood=None) -> None:
    """An ONNX file in the BentoML store at `home`, with the metadata (and out-of-distribution
    reference file) the service reads, as registry/import_champion.py stores them."""
    import bentoml

    from cifarlab.constants import CLASS_NAMES, MEAN, STD

    meta = {"class_names": list(CLASS_NAMES), "mean": list(MEAN), "std": list(STD),
            "onnx_file": "model.onnx", **meta}  # fmt: skip
    if ood is not None:
        meta.update(ood_file="ood_reference.json", ood_threshold=ood.threshold,
                    ood_method=ood.method)  # fmt: skip
    with bentoml.models.create(
        "cifar10-classifier",
        labels={"source": "benchmark"},
        metadata=meta,
        _model_store=model_store(home),
    ) as bm:
        Path(bm.path_of("model.onnx")).write_bytes(Path(onnx).read_bytes())
        if ood is not None:
            Path(bm.path_of("ood_reference.json")).write_text(ood.to_json())


def default_model(home: Path, pngs: list[bytes] | None = None) -> str:
    """Export the default preset's net to ONNX and put it in the BentoML store at `home`, with
    an out-of-distribution reference fitted on `pngs` (so that answers are scored as a
    registered champion's are; the reference of untrained weights means nothing else)."""
    import torch

    from cifarlab import ood
    from cifarlab.config import preset
    from cifarlab.export import export_onnx, onnx_logits
    from models import build_model

    config = preset("fast")
    torch.manual_seed(0)
    model = build_model(config.model.name, **config.model.options).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx")
        meta = {
            "preset": config.preset,
            "note": "benchmark model: default architecture, untrained weights",
        }
        ref = None
        if pngs:
            x = to_model_input(np.stack([decode_image(b).pixels for b in pngs[:1000]]))
            logits = onnx_logits(path, x)
            ref = ood.fit(logits[:500], x[:500], logits[500:], x[500:])
        save_model(home, path, meta, ref)
    return config.preset


def median_of(repeats: list[dict]) -> dict:
    """The repeat with the median throughput, with every repeat's throughput and p99 kept."""
    key = "images_per_s"
    ordered = sorted(repeats, key=lambda r: r[key])
    mid = dict(ordered[len(ordered) // 2])
    mid["repeats"] = [
        {k: r.get(k) for k in (key, "p99_ms", "mean_batch_size") if k in r} for r in repeats
    ]
    return mid


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_process(engine: Engine, pngs: list[bytes], seconds: float, batch: int) -> dict:
    latencies, done, i = [], 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        chunk = [pngs[(i + k) % len(pngs)] for k in range(batch)]
        x = to_model_input(np.stack([decode_image(b).pixels for b in chunk]))
        out = engine.infer(x)  # probabilities and ood_score, as the service computes them
        [engine.answer(p, 3) for p in out[:, :-1]]
        latencies.append(time.perf_counter() - t0)
        done += batch
        i += batch
    elapsed = time.perf_counter() - start
    return {
        "batch": batch,
        "images": done,
        "seconds": elapsed,
        "images_per_s": done / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


def multipart(files: list[bytes], field: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, content in enumerate(files):
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{k}.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + content
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load(
    port: int,
    path: str,
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    seconds: float,
    images_per_request: int = 1,
    keep_alive: bool = True,
) -> dict:
    """Closed-loop load: `concurrency` clients, each sending the next upload as soon as it has
    its answer, over one keep-alive connection each, or (keep_alive=False) a new connection per
    request, as `curl` does.

    asyncio with raw sockets and requests built in advance: the generator shares the CPU with
    the server, so it does as little per request as it can (a few tens of microseconds)."""
    import asyncio

    close = "" if keep_alive else "Connection: close\r\n"
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"{close}Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body, ctype in bodies
    ]
    latencies: list[float] = []
    errors = 0

    async def connection(w: int, stop_at: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = w
        while time.perf_counter() < stop_at:
            request = requests[k % len(requests)]
            k += concurrency
            t0 = time.perf_counter()
            if not keep_alive:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not keep_alive:
                writer.close()
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
        writer.close()

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(connection(w, start + seconds) for w in range(concurrency)))
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    return {
        "path": path,
        "concurrency": concurrency,
        "keep_alive": keep_alive,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "images_per_s": len(latencies) * images_per_request / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p90_ms": 1000 * percentile(latencies, 90),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


class PeakMemory:
    """Samples the resident memory of a process and its descendants every 50 ms."""

    def __init__(self, pid: int):
        import threading

        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def palette_png(side: int = 6000) -> bytes:
    """36 megapixels in a few KB: cheap to send, about half a second to decode."""
    img = Image.new("P", (side, side), 3)
    img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def hostile(port: int, seconds: float) -> dict:
    """What a hostile crowd sends at once: 24 clients posting 4 MiB bodies of noise (each one
    answered 400 or, past the upload budget, 503) and 2 clients posting batches of twelve
    36-megapixel palette PNGs; meanwhile one ordinary client's latency is measured."""
    import asyncio

    noise = os.urandom(4 * 1024 * 1024)
    heavy_body, heavy_type = multipart([palette_png()] * 12, "images")
    small = load_png_32()
    statuses: dict[int, int] = {}
    ordinary: list[float] = []

    async def post(path: str, body: bytes, ctype: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        try:
            writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        return int(head[9:12])

    async def crowd(path: str, body: bytes, ctype: str, stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            try:
                status = await post(path, body, ctype)
            except (ConnectionError, asyncio.IncompleteReadError):
                status = 0
            statuses[status] = statuses.get(status, 0) + 1

    async def ordinary_client(stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await post("/classify", small, "image/png")
            ordinary.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)

    async def run() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(
            *[crowd("/classify", noise, "application/octet-stream", stop_at) for _ in range(24)],
            *[crowd("/classify_batch", heavy_body, heavy_type, stop_at) for _ in range(2)],
            ordinary_client(stop_at),
        )

    asyncio.run(run())
    return {
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "ordinary_requests": len(ordinary),
        "ordinary_p50_ms": 1000 * percentile(ordinary, 50),
        "ordinary_max_ms": 1000 * max(ordinary) if ordinary else None,
    }


def load_png_32() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 80, 200)).save(buf, "PNG")
    return buf.getvalue()


def batch_sizes(port: int) -> dict:
    """Mean images per onnxruntime call since the last reading, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("cifar_inference_batch_size_sum")
    )
    calls = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("cifar_inference_batch_size_count")
    )
    return {"images": total, "calls": calls}


def record_cost(engine: Engine, pngs: list[bytes], n: int = 20_000) -> dict:
    """CPU microseconds per record: the request handler's part and the writer thread's part."""
    from serving.preprocess import Decoded
    from serving.records import Answer, LogSettings, PredictionLog

    decoded: list[Decoded] = [decode_image(b) for b in pngs[:200]]
    probs = engine.probabilities(to_model_input(np.stack([d.pixels for d in decoded])))
    info = {"version": "1", "bento_tag": "cifar10-classifier:bench", "precision": "fp32"}
    with tempfile.TemporaryDirectory(prefix="record-cost-") as tmp:
        plog = PredictionLog(LogSettings(Path(tmp)), engine.class_names)  # not started: no thread
        handler = writer = 0.0
        for i in range(n):
            k = i % len(decoded)
            t0 = time.process_time()
            plog.add(
                Answer(
                    time.time(),
                    uuid.uuid4().hex,
                    False,
                    info,
                    probs[k : k + 1],
                    decoded[k].pixels[None],
                    [decoded[k]],
                    [(1.0, True)],
                    0.0015,
                )
            )
            handler += time.process_time() - t0
            if (i + 1) % 500 == 0:  # ~what 0.5 s brings at 1,000 answers/s
                t0 = time.process_time()
                plog.flush()
                writer += time.process_time() - t0
        size = sum(p.stat().st_size for p in Path(tmp).glob("predictions-*"))
        plog.close()
    return {
        "records": n,
        "flush_every": 500,
        "handler_us_per_record": 1e6 * handler / n,
        "writer_us_per_record": 1e6 * writer / n,
        "bytes_per_record": size / n,
        "note": "handler: a request id and the Answer queued, as serving/http.py does; writer: "
        "the log thread's flushes of 500 records (lines, SQLite index rows, file writes)",
    }


def recording_ab(args: argparse.Namespace, pngs: list[bytes], home: Path, tmp: Path) -> dict:
    """Recording on and off, two servers loaded in turn; medians of `args.repeats` each. At
    concurrency 32 (the highest of --concurrency): with 8 keep-alive connections the kernel's
    split of them over the two workers swings throughput by 40 % from one measurement to the
    next, with or without recording."""
    c = max(args.concurrency)
    single = [multipart([p], "image") for p in pngs]
    on_env = {"CIFAR_PREDICTION_LOG_DIR": str(tmp / "prediction-log")}
    off_env = {"CIFAR_PREDICTION_LOG": "false"}
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with (
        BentoServer(home, tmp / "on.log", on_env) as on_url,
        BentoServer(home, tmp / "off.log", off_env) as off_url,
    ):
        ports = {"on": int(on_url.rsplit(":", 1)[1]), "off": int(off_url.rsplit(":", 1)[1])}
        for port in ports.values():
            load(port, "/classify", single, 8, 2.0)  # warm-up
        for i in range(args.repeats):
            for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                r = load(ports[name], "/classify", single, c, args.seconds)
                runs[name].append(r)
                print(name, json.dumps({k: r[k] for k in ("requests_per_s", "p99_ms")}), flush=True)
    from serving.logfiles import read_records

    recorded = sum(1 for _ in read_records(tmp / "prediction-log"))
    med = {k: statistics.median(r["requests_per_s"] for r in v) for k, v in runs.items()}
    p99 = {k: statistics.median(r["p99_ms"] for r in v) for k, v in runs.items()}
    return {
        "load": f"POST /classify multipart, keep-alive, concurrency {c}, "
        f"{args.seconds:g} s per measurement, on/off interleaved",
        "repeats": args.repeats,
        "requests_per_s_on": [r["requests_per_s"] for r in runs["on"]],
        "requests_per_s_off": [r["requests_per_s"] for r in runs["off"]],
        "median_requests_per_s_on": med["on"],
        "median_requests_per_s_off": med["off"],
        "median_p99_ms_on": p99["on"],
        "median_p99_ms_off": p99["off"],
        "throughput_cost_pct": 100 * (1 - med["on"] / med["off"]),
        "records_written": recorded,
        "answers_given_on": sum(r["requests"] for r in runs["on"]),
        "errors": sum(r["errors"] for v in runs.values() for r in v),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recording", action="store_true", help="the prediction log's cost (see above)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measurements per setting, each on new connections; the median is "
        "reported (keep-alive results depend on how the kernel happens to spread "
        "the connections over the worker processes)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--store",
        action="store_true",
        help="serve the newest model in $BENTOML_HOME instead of a fresh one",
    )
    parser.add_argument(
        "--source", type=Path, default=Path(os.environ.get("CIFAR10_SOURCE") or DEFAULT_SOURCE)
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server (e.g. CIFAR_BATCH_MAX_SIZE=32)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve-cpu.json"
    )
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

    pngs = load_pngs(args.source, 1000)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if args.store:
            home = Path(os.environ.get("BENTOML_HOME", ROOT / "bentoml"))
            model_desc = "newest model in " + str(home)
        else:
            home = Path(tmp) / "bentoml"
            model_desc = (
                f"preset {default_model(home, pngs)} architecture, untrained weights, with an "
                "out-of-distribution reference (answers scored as a champion's are)"
            )

        stored = model_store(home).get("cifar10-classifier:latest")
        # The in-process limit, in onnxruntime's best setting for a lone loop: all cores, and
        # worker threads spinning (the server turns spinning off, it needs the CPU for HTTP).
        os.environ["CIFAR_ORT_SPIN"] = "1"
        from serving.live import ood_reference

        ref, _ = ood_reference(stored, dict(stored.info.metadata))
        engine = Engine(Path(stored.path_of("model.onnx")), stored.info.metadata, ood=ref)
        del os.environ["CIFAR_ORT_SPIN"]
        engine.warm_up()
        machine = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
        }
        if args.recording:
            out = ROOT / "benchmarks" / "results" / "recording-cost.json"
            result = {
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine,
                "model": model_desc,
                "command": "python benchmarks/serve_bench.py --recording "
                f"--repeats {args.repeats} --seconds {args.seconds:g} "
                f"--concurrency {max(args.concurrency)}",
                "in_process": record_cost(engine, pngs),
            }
            print(json.dumps(result["in_process"]), flush=True)
            del engine
            result["http"] = recording_ab(args, pngs, home, Path(tmp))
            print(json.dumps(result, indent=1))
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"saved {out}")
            return
        results: dict = {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "cpu_model": cpu_model(),
            },
            "model": model_desc,
            "bento_tag": str(stored.tag),
            "in_process_ort": {"threads": engine.threads, "spinning": True},
            "images": f"{len(pngs)} PNG uploads of 32x32 "
            f"({statistics.mean(map(len, pngs)):.0f} bytes on average)",
            "server_env": args.env,
        }
        results["in_process_batch1"] = median_of(
            [in_process(engine, pngs, args.seconds, 1) for _ in range(args.repeats)]
        )
        results["in_process_batch64"] = median_of(
            [in_process(engine, pngs, args.seconds, 64) for _ in range(args.repeats)]
        )
        print(
            json.dumps(
                {k: results[k] for k in ("in_process_batch1", "in_process_batch64")}, indent=1
            ),
            flush=True,
        )
        del engine

        server = BentoServer(home, Path(tmp) / "serve.log", dict(e.split("=", 1) for e in args.env))
        with (
            server,
            PeakMemory(server.services.procs[next(iter(server.services.procs))].pid) as mem,
        ):
            port = server.port
            single = [multipart([p], "image") for p in pngs]
            raw = [(p, "image/png") for p in pngs]
            load(port, "/classify", single, 8, 2.0)  # warm-up
            results["http_classify"] = []
            runs = (
                [(True, c, "multipart", single) for c in args.concurrency]
                + [(False, c, "multipart", single) for c in args.concurrency if c == 8]
                + [(True, c, "raw", raw) for c in args.concurrency]
            )
            for keep_alive, c, body, bodies in runs:
                repeats = []
                for _ in range(args.repeats):
                    before = batch_sizes(port)
                    r = load(port, "/classify", bodies, c, args.seconds, keep_alive=keep_alive)
                    after = batch_sizes(port)
                    calls = after["calls"] - before["calls"]
                    r["mean_batch_size"] = (
                        (after["images"] - before["images"]) / calls if calls else 0
                    )
                    r["body"] = body
                    repeats.append(r)
                r = median_of(repeats)
                r["body"] = body
                results["http_classify"].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "repeats"}), flush=True)
            batches = [multipart(pngs[i : i + 64], "images") for i in range(0, len(pngs) - 63, 64)]
            results["http_classify_batch"] = median_of(
                [
                    load(port, "/classify_batch", batches, 2, args.seconds, images_per_request=64)
                    for _ in range(args.repeats)
                ]
            )
            print(json.dumps(results["http_classify_batch"]), flush=True)
            results["peak_rss_mb_under_load"] = round(mem.peak / 2**20, 1)
            mem.peak = 0
            results["hostile"] = hostile(port, args.seconds * 2)
            results["hostile"]["peak_rss_mb"] = round(mem.peak / 2**20, 1)
            print(json.dumps(results["hostile"]), flush=True)

    base1 = results["in_process_batch1"]["images_per_s"]
    base64 = results["in_process_batch64"]["images_per_s"]
    at8 = {
        (r["body"], r["keep_alive"]): r for r in results["http_classify"] if r["concurrency"] == 8
    }
    summary = {
        "cpu_model": results["machine"]["cpu_model"],
        "in_process_images_per_s_batch1": base1,
        "in_process_images_per_s_batch64": base64,
    }
    for (body, keep_alive), r in at8.items():
        name = f"http_c8_{body}_{'keepalive' if keep_alive else 'new_connection'}"
        summary[f"{name}_requests_per_s"] = r["requests_per_s"]
        summary[f"{name}_p99_ms"] = r["p99_ms"]
        summary[f"{name}_vs_in_process_batch1"] = r["requests_per_s"] / base1
    summary["batch_endpoint_images_per_s"] = results["http_classify_batch"]["images_per_s"]
    summary["batch_endpoint_vs_in_process_batch64"] = (
        results["http_classify_batch"]["images_per_s"] / base64
    )
    summary["peak_rss_mb_under_load"] = results["peak_rss_mb_under_load"]
    summary["peak_rss_mb_hostile"] = results["hostile"]["peak_rss_mb"]
    summary["targets"] = (
        "c8 multipart >= 75 % and raw >= 85 % of in-process batch 1, p99 < "
        "50 ms; batch endpoint >= 90 % of in-process batch 64"
    )
    results["summary"] = summary
    print(json.dumps(results["summary"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
