"""The verified CIFAR-10 files as uint8 tensors: unpickled with a restricted unpickler, kept for
the process, and written once per root as `.npy` files that later runs memory-map (their pages
shared through the operating system's cache)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:  # numpy 2 (the array reconstructor's home); numpy 1 kept it in numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]  # numpy 1's path

from cifarlab.constants import CLASS_NAMES
from cifarlab.data import (
    META_FILE,
    TEST_FILE,
    TRAIN_FILES,
    DataError,
    UnsafePickleError,
    _file_keys,
    _folder_lock,
    _recent,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cifar10:
    """The whole data set in memory: images uint8 (N, 3, 32, 32), labels int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]


# The only globals the official files reference (they hold dicts, lists, bytes and uint8 arrays):
# numpy's array reconstruction, under its numpy 1 module path (the official files) and its
# numpy 2 path (files pickled again by numpy 2, like the test fixtures).
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; any other global (os.system, builtins.eval, ...) raises
    before it is imported or called. Numpy object arrays cannot smuggle objects in either: their
    items are unpickled through this same `find_class`."""

    def __init__(self, fh, path: Path) -> None:
        super().__init__(fh, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.path} refers to {module}.{name}, which a CIFAR-10 file never does; "
                "refusing to load it (only dicts, lists, bytes and numpy arrays are allowed)"
            ) from None


def load_pickle(path: Path) -> object:
    """Unpickle one CIFAR-10 file (Python 2 pickles, hence encoding="bytes") with the restricted
    unpickler; UnsafePickleError for a foreign global, DataError for an unreadable file."""
    with open(path, "rb") as fh:
        try:
            return _CifarUnpickler(fh, path).load()
        except DataError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
        ) as exc:
            raise DataError(f"{path} is not a readable CIFAR-10 pickle: {exc}") from exc


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(
            f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'"
        )
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"{path} has data of shape {data.shape} and {len(labels)} labels; "
            "expected (N, 3072) and N labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{path} has labels outside 0..{len(CLASS_NAMES) - 1}")
    return data.reshape(-1, 3, 32, 32), labels


# The last data set loaded in this process, by folder and its files' sizes and times.
_LOADED: dict[tuple[str, str], Cifar10] = {}
_ALL_FILES = (*TRAIN_FILES, TEST_FILE, META_FILE)
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _cache_key(folder: Path) -> tuple[str, str] | None:
    """What `load_cifar10` keeps its arrays under: the folder and each file's size, inode and
    times; None when a file is missing."""
    try:
        return str(folder.resolve()), json.dumps(_file_keys(folder, _ALL_FILES))
    except OSError:
        return None


def load_cifar10(folder: Path, cache: Path | None = None) -> Cifar10:
    """Read the pickled batches of a (verified) folder into tensors.

    The result is kept for the process (one data set at a time) and returned again while the
    files keep their size, inode and times (as for the stamps): callers index it, they never
    write into it. With `cache` (a folder of ours), the arrays are also written there once as
    `.npy` files and memory-mapped by every later process: reading them costs page faults on
    pages the operating system already holds, instead of a second of unpickling per run.
    """
    folder = Path(folder)
    key = _cache_key(folder)
    cached = _LOADED.get(key) if key is not None else None
    if cached is not None:
        return cached
    data = None
    if cache is not None and key is not None:
        data = _mapped(Path(cache), key) or _write_mapped(folder, Path(cache), key)
    if data is None:
        data = _read_cifar10(folder)
    if key is not None:
        _LOADED.clear()
        _LOADED[key] = data
    return data


def _source_digest() -> str:
    """SHA-256 of the code that turns the files into arrays (this module and the class names
    it checks labels against): arrays written by other code are not taken."""
    here = Path(__file__)
    digest = hashlib.sha256()
    for path in (here, here.with_name("constants.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


_LOADER = _source_digest()  # fixed at import: the code this process runs


def _cache_dir(cache: Path, key: tuple[str, str]) -> Path:
    """One folder per data folder, files' state and loader: other versions never collide."""
    folder = hashlib.sha256(key[0].encode()).hexdigest()[:16]
    state = hashlib.sha256(f"{key[1]}\n{_LOADER}".encode()).hexdigest()[:16]
    return cache / f"{folder}-{state}"


def _mapped(cache: Path, key: tuple[str, str]) -> Cifar10 | None:
    """The arrays cached for exactly these files by this very loader, memory-mapped; None
    otherwise."""
    where = _cache_dir(cache, key)
    try:
        meta = json.loads((where / "key.json").read_text())
        if meta["key"] != list(key) or meta["loader"] != _LOADER:
            return None
        # Copy-on-write pages: shared with every process that maps them until one writes
        # (nobody does), and writable as torch.from_numpy wants.
        arrays = {n: torch.from_numpy(np.load(where / f"{n}.npy", mmap_mode="c")) for n in _ARRAYS}
    except (OSError, ValueError, KeyError):
        return None
    return Cifar10(**arrays, class_names=tuple(meta["class_names"]))


def _write_mapped(folder: Path, cache: Path, key: tuple[str, str]) -> Cifar10 | None:
    """Read the files, write the arrays into the cache (a new folder renamed into place, so a
    reader sees all of it or nothing) and map them; the arrays read, uncached, when the cache
    cannot be written or the files changed within the last second (a write may still be under
    way in the same clock tick: their times would not vouch for their bytes)."""
    data = _read_cifar10(folder)
    if _recent({"files": json.loads(key[1])}) or _cache_key(folder) != key:
        return data
    where = _cache_dir(cache, key)
    tmp = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _folder_lock(cache / ".lock"):
            if (done := _mapped(cache, key)) is not None:  # another process wrote it meanwhile
                return done
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".writing-"))
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(data, name).numpy())
            meta = {"key": list(key), "loader": _LOADER, "class_names": list(data.class_names)}
            (tmp / "key.json").write_text(json.dumps(meta))
            os.replace(tmp, where)
            tmp = None
            _drop_older(cache, where)
    except OSError as exc:
        log.warning("could not cache the CIFAR-10 arrays in %s (%s)", cache, exc)
        return data
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return _mapped(cache, key) or data


def _drop_older(cache: Path, kept: Path) -> None:
    """Other copies of the same data folder (older file states or loaders); a process that has
    them mapped keeps its pages until it exits."""
    prefix = kept.name.split("-")[0] + "-"
    for other in cache.glob(prefix + "*"):
        if other != kept:
            shutil.rmtree(other, ignore_errors=True)


def _read_cifar10(folder: Path) -> Cifar10:
    parts = [_read_batch(folder / name) for name in TRAIN_FILES]
    test_x, test_y = _read_batch(folder / TEST_FILE)
    meta = load_pickle(folder / META_FILE)
    if not isinstance(meta, dict) or b"label_names" not in meta:
        raise DataError(f"{folder / META_FILE} has no b'label_names'")
    names = tuple(n.decode() for n in meta[b"label_names"])
    return Cifar10(
        train_images=torch.from_numpy(np.concatenate([p[0] for p in parts])),
        train_labels=torch.from_numpy(np.concatenate([p[1] for p in parts])),
        test_images=torch.from_numpy(test_x),
        test_labels=torch.from_numpy(test_y),
        class_names=names,
    )
