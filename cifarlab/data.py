"""Get CIFAR-10 onto disk, verified (cifarlab.arrays loads it into tensors).

A *source* is one string, from the `source` argument or else the `CIFAR10_SOURCE` environment
variable, else the official URL:

- an http(s) URL of a `cifar-10-python.tar.gz`-style archive (the official one by default),
- a path to such an archive on disk,
- a folder holding the extracted `cifar-10-batches-py` files (a "mirror", read in place).

Every file is checked against its md5 before anything trains on it (again whenever it changed,
see below). Downloads go to a `.part` file and extraction to a temporary folder that is renamed into place only once every file
verified, so a killed download never leaves a folder that passes as complete.

Reading once: a folder that verified is remembered in a stamp file (under the caller's data
folder, never in a mirror) keyed by each file's size, inode, modification and change times, so
the next run only `stat`s it; a file written, replaced or touched since is hashed again (the
change time cannot be set back by a user).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from http.client import HTTPException
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
SOURCE_ENV = "CIFAR10_SOURCE"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"

# md5 of every file of the official archive (the same values torchvision checks).
OFFICIAL_FILE_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


class DataError(RuntimeError):
    """The data set is missing, incomplete or not the expected bytes."""


class DownloadError(DataError):
    """Fetching the archive failed after every retry."""


class UnsafePickleError(DataError):
    """A data file's pickle refers to a global the CIFAR-10 files never use: it is refused
    unloaded, since unpickling it could run code."""


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_folder(
    folder: Path, checksums: Mapping[str, str] = OFFICIAL_FILE_MD5, *, stamps: Path | None = None
) -> None:
    """Raise DataError naming the first missing or altered file and its expected md5.

    With `stamps` (a folder of ours), a folder whose files have the size, inode, modification
    and change times they had when they last verified against these checksums is not hashed
    again. (On file systems without real inodes or change times, such as vfat or some network
    mounts, a copy that keeps size and mtime would pass: keep mirrors on a local disk.)
    """
    if not folder.is_dir():
        raise DataError(f"CIFAR-10 folder {folder} does not exist")
    for name, expected in checksums.items():
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} is missing (expected md5 {expected})")
    stamp = _stamp_path(stamps, folder) if stamps is not None else None
    before = _stamp(folder, checksums)
    if stamp is not None and _read_stamp(stamp) == before:
        return
    for name, expected in checksums.items():
        actual = md5_of(folder / name)
        if actual != expected:
            raise DataError(
                f"{folder / name} has md5 {actual}, expected {expected}: the file is "
                "truncated or altered"
            )
    # Stamped only if nothing changed while it was hashed, and no file changed within the last
    # seconds (a write in the same clock tick as the stat would not move its times): the stamp
    # vouches for exactly these bytes.
    if stamp is not None and _stamp(folder, checksums) == before and not _recent(before):
        _write_stamp(stamp, before)


def _file_keys(folder: Path, names) -> dict[str, list[int]]:
    """Size, inode, modification and change time (ns) of each named file: what writing,
    replacing or touching it moves (a copy that keeps the mtime still gets a new ctime)."""
    keys = {}
    for name in sorted(names):
        st = (folder / name).stat()
        keys[name] = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    return keys


def _stamp(folder: Path, checksums: Mapping[str, str]) -> dict[str, object]:
    return {
        "folder": str(folder.resolve()),
        "checksums": dict(sorted(checksums.items())),
        "files": _file_keys(folder, checksums),
    }


def _recent(stamp: Mapping[str, Any], seconds: float = 1.0, now_ns: int | None = None) -> bool:
    """Whether a file of the stamp was modified or changed less than `seconds` before `now_ns`
    (default: now)."""
    now = time.time_ns() if now_ns is None else now_ns
    return any(now - max(key[2], key[3]) < seconds * 1e9 for key in stamp["files"].values())


def _stamp_path(stamps: Path, folder: Path) -> Path:
    name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return stamps / f"verified-{name}.json"


def _read_stamp(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, stamp: dict[str, object]) -> None:
    """Record a folder that just verified (written atomically; a failure only costs a re-hash
    next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(stamp) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not record the verification of %s (%s)", stamp["folder"], exc)


def data_fingerprint(checksums: Mapping[str, str]) -> str:
    """One short hash naming the exact data set (over the per-file md5s)."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(checksums.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def resolve_source(source: str | None = None) -> str:
    """The source to use: the argument, else $CIFAR10_SOURCE, else the official URL."""
    return source or os.environ.get(SOURCE_ENV) or OFFICIAL_URL


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "file://"))


def download(
    url: str,
    dest: Path,
    *,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    expected_md5: str | None = None,
) -> Path:
    """Stream `url` to `dest` atomically, retrying network faults with exponential back-off.

    The bytes land in `dest.part` and are renamed to `dest` only when the transfer is complete
    (Content-Length honoured) and, if given, the md5 matches. A checksum mismatch on a complete
    transfer is not retried: the server has the wrong file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    last_error: Exception | None = None
    for attempt in range(1, retries + 2):
        try:
            digest = hashlib.md5()
            received = 0
            with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(part, "wb") as out:
                length = resp.headers.get("Content-Length")
                while block := resp.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
            if length is not None and received != int(length):
                raise HTTPException(f"got {received} of {length} bytes")
            if expected_md5 is not None and digest.hexdigest() != expected_md5:
                part.unlink(missing_ok=True)
                raise DataError(
                    f"archive from {url} has md5 {digest.hexdigest()}, expected {expected_md5}"
                )
            os.replace(part, dest)
            return dest
        except DataError:
            raise
        except (urllib.error.URLError, HTTPException, OSError, TimeoutError) as exc:
            last_error = exc
            part.unlink(missing_ok=True)
            if attempt <= retries:
                wait = backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "download of %s failed (%s); retry %d/%d in %.1f s",
                    url,
                    exc,
                    attempt,
                    retries,
                    wait,
                )
                time.sleep(wait)
    raise DownloadError(f"could not download {url} after {retries + 1} attempts: {last_error}")


def _extract_verified(
    archive: Path, target: Path, checksums: Mapping[str, str], stamps: Path
) -> Path:
    """Extract the archive next to `target`, verify it, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{archive} is not a readable tar archive: {exc}") from exc
        found = [p.parent for p in tmp.rglob(TEST_FILE)]
        if not found:
            raise DataError(f"{archive} holds no {FOLDER_NAME}/{TEST_FILE}")
        verify_folder(found[0], checksums)
        if target.exists():  # a stale, unverifiable folder from an older run
            shutil.rmtree(target)
        os.replace(found[0], target)
        _write_stamp(_stamp_path(stamps, target), _stamp(target, checksums))
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_cifar10(
    data_dir: Path,
    source: str | None = None,
    *,
    checksums: Mapping[str, str] | None = None,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
) -> Path:
    """Return a folder of verified CIFAR-10 files, fetching them from the source if needed.

    A mirror folder is verified and used in place (nothing is copied). Archives and URLs are
    extracted into `data_dir/cifar-10-batches-py`; an already verified copy there is reused.
    Verification stamps live in `data_dir/.verified`. `retries` network faults are retried here
    (the flow passes 0: its task retries instead).
    """
    sums = dict(checksums or OFFICIAL_FILE_MD5)
    src = resolve_source(source)
    local = _local_path(src)
    stamps = Path(data_dir) / ".verified"
    if local is not None and local.is_dir():
        verify_folder(local, sums, stamps=stamps)
        return local

    target = Path(data_dir) / FOLDER_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # One fetch per folder at a time (several flow runs on one host starting together): the
    # second waits, then finds the verified copy the first left.
    with _folder_lock(target.parent / ".cifar10.lock"):
        return _fetch_into(target, src, local, sums, retries, backoff_s, timeout_s, stamps)


def _local_path(src: str) -> Path | None:
    """The file or folder a source names on this machine; None for an http(s) URL."""
    return Path(src.removeprefix("file://")).expanduser() if not src.startswith("http") else None


def data_folder(data_dir: Path, source: str | None = None) -> Path:
    """The folder `prepare_cifar10` reads for this source (nothing checked): a local source
    folder in place, else the one it extracts or downloads into under `data_dir`."""
    local = _local_path(resolve_source(source))
    return local if local is not None and local.is_dir() else Path(data_dir) / FOLDER_NAME


@contextlib.contextmanager
def _folder_lock(path: Path):
    """An exclusive advisory lock (flock) on `path`, held for the block."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_into(
    target: Path,
    src: str,
    local: Path | None,
    sums: dict[str, str],
    retries: int,
    backoff_s: float,
    timeout_s: float,
    stamps: Path,
) -> Path:
    data_dir = target.parent
    if target.is_dir():
        try:
            verify_folder(target, sums, stamps=stamps)
            log.info("using verified CIFAR-10 in %s", target)
            return target
        except DataError as exc:
            log.warning("cached copy is not valid (%s); fetching again", exc)

    if local is not None:
        if not local.is_file():
            raise DataError(
                f"CIFAR-10 source {src!r} is neither a folder, an archive file nor an http(s) URL"
            )
        archive = local
    else:
        archive_md5 = OFFICIAL_ARCHIVE_MD5 if src == OFFICIAL_URL else None
        archive = download(
            src,
            Path(data_dir) / "cifar-10-python.tar.gz",
            retries=retries,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
            expected_md5=archive_md5,
        )
    return _extract_verified(archive, target, sums, stamps)
