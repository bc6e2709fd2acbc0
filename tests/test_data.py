"""Download, verification and loading: real files, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import pickle
import pickletools
import shutil
import threading

import pytest

from cifarlab.arrays import load_cifar10, load_pickle
from cifarlab.data import (
    DataError,
    DownloadError,
    UnsafePickleError,
    md5_of,
    prepare_cifar10,
    verify_folder,
)


class _Server:
    """A tiny HTTP server on 127.0.0.1 whose behaviour per request is set by the test."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.requests = 0
        self.fail_first = 0  # this many requests answer 503
        self.truncate_first = 0  # this many requests send half the bytes then hang up
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                outer.requests += 1
                if outer.requests <= outer.fail_first:
                    self.send_error(503, "busy")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                if outer.requests <= outer.fail_first + outer.truncate_first:
                    self.wfile.write(outer.payload[: len(outer.payload) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(outer.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar-10-python.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(synthetic_archive):
    srv = _Server(synthetic_archive.read_bytes())
    yield srv
    srv.close()


def test_download_extracts_and_verifies(server, synthetic_cifar, tmp_path):
    _, sums = synthetic_cifar
    folder = prepare_cifar10(tmp_path, server.url, checksums=sums, backoff_s=0.01)
    assert folder == tmp_path / "cifar-10-batches-py"
    verify_folder(folder, sums)
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".extract-*"))


def test_verified_copy_is_not_fetched_again(server, synthetic_cifar, tmp_path):
    _, sums = synthetic_cifar
    prepare_cifar10(tmp_path, server.url, checksums=sums, backoff_s=0.01)
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    prepare_cifar10(tmp_path, server.url, checksums=sums, backoff_s=0.01)
    assert server.requests == 1


def test_first_time_fetches_into_one_folder_at_once_do_not_collide(
    server, synthetic_cifar, tmp_path
):
    """Four flow runs on one host start together on an empty data folder: one downloads and
    extracts, the others wait and use its verified copy; nobody sees a half-written file."""
    _, sums = synthetic_cifar
    results, errors = [], []

    def fetch():
        try:
            results.append(prepare_cifar10(tmp_path, server.url, checksums=sums, backoff_s=0.01))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(results) == 4
    assert set(results) == {tmp_path / "cifar-10-batches-py"}
    verify_folder(results[0], sums)
    assert server.requests == 1
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".extract-*"))


def test_flaky_server_is_retried(server, synthetic_cifar, tmp_path):
    _, sums = synthetic_cifar
    server.fail_first, server.truncate_first = 1, 1
    folder = prepare_cifar10(tmp_path, server.url, checksums=sums, retries=3, backoff_s=0.01)
    verify_folder(folder, sums)
    assert server.requests == 3


def test_killed_download_never_looks_complete(server, synthetic_cifar, tmp_path):
    _, sums = synthetic_cifar
    server.truncate_first = 10  # every attempt is cut off half-way
    with pytest.raises(DownloadError, match="after 3 attempts"):
        prepare_cifar10(tmp_path, server.url, checksums=sums, retries=2, backoff_s=0.01)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()
    # A leftover partial file from a killed process is ignored and replaced on the next run.
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(b"half an archive")
    server.truncate_first = 0
    server.requests = 0
    verify_folder(prepare_cifar10(tmp_path, server.url, checksums=sums, backoff_s=0.01), sums)


def test_corrupted_archive_is_a_clear_error(synthetic_cifar, tmp_path):
    _, sums = synthetic_cifar
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b this is not a tar archive")
    with pytest.raises(DataError, match="not a readable tar archive"):
        prepare_cifar10(tmp_path / "data", str(bad), checksums=sums)
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_archive_with_altered_file_names_file_and_checksum(synthetic_cifar, tmp_path):
    folder, sums = synthetic_cifar
    altered = tmp_path / "src" / "cifar-10-batches-py"
    shutil.copytree(folder, altered)
    with open(altered / "data_batch_3", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    import tarfile

    archive = tmp_path / "altered.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(altered, arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match=f"data_batch_3.*expected {sums['data_batch_3']}"):
        prepare_cifar10(tmp_path / "data", str(archive), checksums=sums)
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_mirror_folder_with_bad_file_fails(synthetic_cifar, tmp_path, damage):
    folder, sums = synthetic_cifar
    mirror = tmp_path / "mirror"
    shutil.copytree(folder, mirror)
    target = mirror / "test_batch"
    if damage == "missing":
        target.unlink()
        match = f"test_batch is missing \\(expected md5 {sums['test_batch']}\\)"
    else:
        target.write_bytes(target.read_bytes()[:500])
        match = f"test_batch has md5 .* expected {sums['test_batch']}"
    with pytest.raises(DataError, match=match):
        prepare_cifar10(tmp_path / "data", str(mirror), checksums=sums)


def test_a_verified_mirror_is_stamped_outside_it_and_damage_after_the_stamp_is_caught(
    synthetic_cifar, tmp_path, data_clock
):
    folder, sums = synthetic_cifar
    mirror = tmp_path / "mirror"
    shutil.copytree(folder, mirror)
    listing = sorted(p.name for p in mirror.iterdir())
    # Files changed within the last second are hashed but never stamped: a write in the same
    # clock tick as the check would not have moved their times.
    prepare_cifar10(tmp_path / "data", str(mirror), checksums=sums)
    assert not list((tmp_path / "data" / ".verified").glob("verified-*.json"))
    data_clock.advance(1.1)
    prepare_cifar10(tmp_path / "data", str(mirror), checksums=sums)
    assert sorted(p.name for p in mirror.iterdir()) == listing  # nothing written into a mirror
    assert len(list((tmp_path / "data" / ".verified").glob("verified-*.json"))) == 1
    # Same size, other bytes, later mtime: hashed again and refused.
    target = mirror / "data_batch_3"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="data_batch_3 has md5"):
        prepare_cifar10(tmp_path / "data", str(mirror), checksums=sums)
    # Other checksums are another stamp: a folder stamped for these sums is hashed again and
    # refused under those.
    prepare_cifar10(tmp_path / "data", str(folder), checksums=sums)
    assert len(list((tmp_path / "data" / ".verified").glob("verified-*.json"))) == 2
    with pytest.raises(DataError, match="test_batch has md5"):
        prepare_cifar10(tmp_path / "data", str(folder), checksums={**sums, "test_batch": "0" * 32})
    # A file replaced by a copy that keeps its size and mtime (cp -p) is hashed again: the
    # stamp also holds the inode and the change time.
    import os

    victim = folder_copy = tmp_path / "mirror2"
    shutil.copytree(folder, folder_copy)
    data_clock.advance(1.1)
    prepare_cifar10(tmp_path / "data", str(folder_copy), checksums=sums)
    assert len(list((tmp_path / "data" / ".verified").glob("verified-*.json"))) == 3
    target = victim / "batches.meta"
    st = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    replacement = victim / "batches.meta.new"
    replacement.write_bytes(bytes(raw))
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, target)
    with pytest.raises(DataError, match="batches.meta has md5"):
        prepare_cifar10(tmp_path / "data", str(folder_copy), checksums=sums)


def test_source_from_environment_and_bad_source(synthetic_cifar, tmp_path, monkeypatch):
    folder, sums = synthetic_cifar
    monkeypatch.setenv("CIFAR10_SOURCE", str(folder))
    assert prepare_cifar10(tmp_path, checksums=sums) == folder  # mirror used in place
    with pytest.raises(DataError, match="neither a folder, an archive file nor an http"):
        prepare_cifar10(tmp_path, str(tmp_path / "nowhere"), checksums=sums)


def test_load_gives_uint8_tensors(synthetic_cifar):
    folder, _ = synthetic_cifar
    data = load_cifar10(folder)
    assert data.train_images.shape == (300, 3, 32, 32)
    assert str(data.train_images.dtype) == "torch.uint8"
    assert data.test_images.shape == (60, 3, 32, 32)
    assert data.train_labels.shape == (300,) and int(data.train_labels.max()) == 9
    assert data.class_names[3] == "cat"


@pytest.mark.realdata
def test_real_mirror_matches_official_checksums(real_cifar):
    verify_folder(real_cifar)  # the official per-file md5s
    assert md5_of(real_cifar / "batches.meta") == "5ff9c542aee3614f3951f8cda6e48888"
    data = load_cifar10(real_cifar)
    assert data.train_images.shape == (50_000, 3, 32, 32)
    assert data.test_images.shape == (10_000, 3, 32, 32)
    assert data.train_labels.bincount().tolist() == [5000] * 10


# ---------------------------------------------------------------------------------------------
# Restricted unpickling: a data file cannot run code
# ---------------------------------------------------------------------------------------------


class _RunsShell:
    """Unpickling this would call os.system (the classic pickle exploit)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsEval:
    """Unpickling this would call builtins.eval on Python source."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload,refused", [(_RunsShell, "system"), (_RunsEval, "builtins.eval")])
@pytest.mark.parametrize("victim", ["data_batch_3", "test_batch", "batches.meta"])
def test_file_that_would_run_code_is_refused_unrun(
    synthetic_cifar, tmp_path, payload, refused, victim
):
    folder, _ = synthetic_cifar
    bad = tmp_path / "cifar-10-batches-py"
    shutil.copytree(folder, bad)
    marker = tmp_path / "pwned"
    with open(bad / victim, "wb") as fh:
        pickle.dump({b"data": payload(marker), b"labels": [0], b"label_names": [b"x"]}, fh)
    with pytest.raises(UnsafePickleError, match=rf"{victim} refers to \S*{refused}") as info:
        load_cifar10(bad)
    assert str(bad / victim) in str(info.value)
    assert isinstance(info.value, DataError)
    assert not marker.exists()  # refused before anything was called


def test_garbage_file_is_a_data_error_naming_it(synthetic_cifar, tmp_path):
    folder, _ = synthetic_cifar
    bad = tmp_path / "cifar-10-batches-py"
    shutil.copytree(folder, bad)
    (bad / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10(bad)
    with open(bad / "data_batch_1", "wb") as fh:
        pickle.dump([1, 2, 3], fh)  # a harmless pickle, but not a batch
    with pytest.raises(DataError, match="data_batch_1 is not a CIFAR-10 batch"):
        load_cifar10(bad)


def test_synthetic_files_load_through_the_restricted_unpickler(synthetic_cifar):
    folder, _ = synthetic_cifar
    batch = load_pickle(folder / "data_batch_1")
    assert batch[b"data"].dtype.name == "uint8" and len(batch[b"labels"]) == 60
    assert load_pickle(folder / "batches.meta")[b"label_names"][0] == b"airplane"


def _globals_of(path) -> set[str]:
    """The module.name globals a pickle refers to (protocol 2: GLOBAL opcodes only)."""
    return {
        arg.replace(" ", ".")
        for op, arg, _ in pickletools.genops(path.read_bytes())
        if op.name == "GLOBAL"
    }


@pytest.mark.realdata
def test_real_files_need_only_numpy_array_globals(real_cifar):
    assert _globals_of(real_cifar / "data_batch_1") == {
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
    }
    assert _globals_of(real_cifar / "batches.meta") == set()
    batch = load_pickle(real_cifar / "test_batch")  # Python 2 pickles, encoding="bytes"
    assert batch[b"data"].shape == (10_000, 3072) and batch[b"batch_label"].startswith(b"testing")


def test_arrays_are_cached_once_and_mapped_by_later_processes_while_the_files_are_unchanged(
    synthetic_cifar, tmp_path, monkeypatch, data_clock
):
    """load_cifar10 with a cache writes the arrays as .npy once; a later process maps them
    instead of unpickling, until a file changes (size, inode or times)."""
    import torch

    from cifarlab import arrays as data

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(synthetic_cifar[0], folder)
    cache = tmp_path / "arrays"
    monkeypatch.setattr(data, "_LOADED", {})
    data.load_cifar10(folder, cache)  # files written a moment ago: read, not cached yet
    assert not list(cache.glob("*/*.npy"))
    data_clock.advance(1.1)
    monkeypatch.setattr(data, "_LOADED", {})
    first = data.load_cifar10(folder, cache)
    assert len(list(cache.glob("*/*.npy"))) == 4

    def unpickling(_folder):
        raise AssertionError("read the pickles although the cache holds these files' arrays")

    read = data._read_cifar10
    monkeypatch.setattr(data, "_read_cifar10", unpickling)
    monkeypatch.setattr(data, "_LOADED", {})  # a new process
    mapped = data.load_cifar10(folder, cache)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(mapped, name), getattr(first, name))
    assert mapped.class_names == first.class_names

    os.utime(folder / "data_batch_3")  # touched: the cached arrays no longer vouch for it
    monkeypatch.setattr(data, "_LOADED", {})
    with pytest.raises(AssertionError, match="read the pickles"):
        data.load_cifar10(folder, cache)
    monkeypatch.setattr(data, "_read_cifar10", read)
    again = data.load_cifar10(folder, cache)
    assert torch.equal(again.train_images, first.train_images)
    assert len(list(cache.glob("*/key.json"))) == 1  # the old copy replaced, not kept beside

    # Arrays another version of the loader wrote are not taken: read again, and replaced.
    monkeypatch.setattr(data, "_LOADED", {})
    monkeypatch.setattr(data, "_LOADER", "another version of cifarlab/arrays.py")
    monkeypatch.setattr(data, "_read_cifar10", unpickling)
    with pytest.raises(AssertionError, match="read the pickles"):
        data.load_cifar10(folder, cache)
    monkeypatch.setattr(data, "_read_cifar10", read)
    assert torch.equal(data.load_cifar10(folder, cache).train_labels, first.train_labels)
    assert len(list(cache.glob("*/key.json"))) == 1

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(data, "_LOADED", {})
    assert torch.equal(data.load_cifar10(folder, blocked).test_labels, first.test_labels)
