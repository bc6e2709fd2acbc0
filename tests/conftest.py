"""Shared fixtures: small synthetic CIFAR-10 files in the real on-disk format, and telemetry off."""

from __future__ import annotations

import atexit
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cifarlab.constants import CLASS_NAMES

for _var, _value in {
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_var, _value)
# Never the user's BentoML store: one throw-away store per test session (tests that start servers
# give them their own).
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="cifar-test-bentoml-")
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)

REAL_CIFAR = (
    Path(__file__).resolve().parents[1].parent / "shared" / "cifar10" / "cifar-10-batches-py"
)


def _pattern_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Learnable images: each class is a coloured bar at its own position, plus noise."""
    n = len(labels)
    img = rng.integers(0, 60, size=(n, 3, 32, 32), dtype=np.int64)
    for i, y in enumerate(labels):
        row = 3 * int(y)
        img[i, int(y) % 3, row : row + 3, :] += 180
    return img.clip(0, 255).astype(np.uint8)


def write_synthetic_cifar(folder: Path, per_batch: int = 60, seed: int = 0) -> dict[str, str]:
    """Write data_batch_1..5, test_batch and batches.meta like the official files; return md5s."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = np.arange(per_batch) % 10
        rng.shuffle(labels)
        images = _pattern_images(labels, rng)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": images.reshape(per_batch, -1),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(
            {
                b"label_names": [c.encode() for c in CLASS_NAMES],
                b"num_cases_per_batch": per_batch,
                b"num_vis": 3072,
            },
            fh,
        )
    return {
        p.name: hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="session")
def synthetic_cifar(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder `cifar-10-batches-py` of 300 train + 60 test synthetic images, and its md5s."""
    folder = tmp_path_factory.mktemp("synthetic") / "cifar-10-batches-py"
    return folder, write_synthetic_cifar(folder)


@pytest.fixture(scope="session")
def synthetic_archive(synthetic_cifar, tmp_path_factory) -> Path:
    """The synthetic folder packed like the official `cifar-10-python.tar.gz`."""
    folder, _ = synthetic_cifar
    archive = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API for the session (about 15 s to start): flows, and the locks
    that registration takes (flows/locks.py), talk to it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def real_cifar() -> Path:
    """The genuine CIFAR-10 from $CIFAR10_SOURCE or ../shared; skipped where neither exists.
    An empty $CIFAR10_SOURCE counts as unset (it is not the current folder)."""
    candidate = Path(os.environ.get("CIFAR10_SOURCE") or REAL_CIFAR)
    if not (candidate / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 not found at {candidate}")
    return candidate


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory):
    """An untrained seed-baseline net exported to ONNX, put into the session's BentoML store as
    the importer does and loaded as the service loads it (serving.live.Loaded): for the tests
    of request handling, which need a real model but not a good one."""
    import bentoml
    import torch

    from cifarlab.constants import MEAN, STD
    from cifarlab.export import export_onnx
    from models import build_model
    from serving.live import load

    torch.manual_seed(0)
    onnx_path = export_onnx(
        build_model("seed-baseline").eval(), tmp_path_factory.mktemp("untrained") / "model.onnx"
    )
    with bentoml.models.create(
        "cifar10-classifier-inprocess",
        labels={"source": "test"},
        metadata={
            "class_names": list(CLASS_NAMES),
            "mean": list(MEAN),
            "std": list(STD),
            "onnx_file": "model.onnx",
            "mlflow_version": "1",
        },
    ) as bm:
        Path(bm.path_of("model.onnx")).write_bytes(onnx_path.read_bytes())
    return load(bentoml.models.get(bm.tag), threads=1, batch_size=64, wait_ms=0, on_batch=None)


def missing(what: str, why: str) -> None:
    """A tool or server a test needs is not on this machine: skipped on a developer's machine,
    a failure under CI (CI=true), where .ci/run installs it, so that nothing passes unchecked."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing under CI ({why}); .ci/run installs it", pytrace=False)
    pytest.skip(f"{what} is not installed ({why})")


def bento_model_store(home: Path):
    """The BentoML model store under `home`, whatever home this process's BentoML uses (the
    tests read stores of servers they started; BentoML's public API knows one home a process,
    so this reaches into its internals, which the product itself never does)."""
    from bentoml._internal.models import ModelStore

    return ModelStore(Path(home) / "models")


class DataClock:
    """cifarlab.data's clock, moved forward by hand instead of sleeping it out (files changed
    within the last second are never stamped: `advance(1.1)` makes them a second old)."""

    def __init__(self, monkeypatch) -> None:
        import time
        import types

        from cifarlab import data

        self.offset_ns = 0
        clock = types.SimpleNamespace(
            time_ns=lambda: time.time_ns() + self.offset_ns,
            time=lambda: time.time() + self.offset_ns / 1e9,
            sleep=time.sleep,
            monotonic=time.monotonic,
            perf_counter=time.perf_counter,
        )
        monkeypatch.setattr(data, "time", clock)

    def advance(self, seconds: float) -> None:
        self.offset_ns += int(seconds * 1e9)


@pytest.fixture
def data_clock(monkeypatch) -> DataClock:
    return DataClock(monkeypatch)
