"""The prediction log's folder: which files are open, closed or shipped, reading them back,
and pruning by age and size (serving/records.py writes them)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving import env

if TYPE_CHECKING:
    from serving.feedback import Ledger
    from serving.records import LogSettings

log = logging.getLogger("cifar10.serving")

OPEN_SUFFIX = ".part"
SHIPPED = "shipped"  # the subfolder closed files move to once they reached the tracking server


def default_folder() -> Path:
    """Where the service writes its log: $CIFAR_PREDICTION_LOG_DIR, else beside the BentoML
    store ($BENTOML_HOME/prediction-log)."""
    home = Path(env.text("BENTOML_HOME", str(Path.home() / "bentoml"))).expanduser()
    return Path(env.text("CIFAR_PREDICTION_LOG_DIR", str(home / "prediction-log")))


def closed_files(folder: Path) -> list[Path]:
    """The closed log files not shipped yet, oldest first (names start with the time they
    were opened)."""
    return sorted(Path(folder).glob("predictions-*.jsonl"), key=lambda p: p.name)


def shipped_files(folder: Path) -> list[Path]:
    """Closed files already sent to the tracking server (registry/ship_records.py), kept here
    until the retention period or the size cap removes them."""
    return sorted((Path(folder) / SHIPPED).glob("predictions-*.jsonl"), key=lambda p: p.name)


def _kept_images(folder: Path) -> list[Path]:
    return [p for sub in ("images", "feedback-images") for p in (folder / sub).rglob("*.*")]


def prune(folder: Path, settings: LogSettings, now: float, ledger: Ledger | None) -> list[Path]:
    """Delete closed files and kept images past the retention period, then, oldest first and
    files already shipped before the others, what passes the size cap; then forget the request
    ids whose records are gone."""
    shipped = set(shipped_files(folder))
    files = [
        (st.st_mtime, st.st_size, p)
        for p in [*shipped, *closed_files(folder), *_kept_images(folder)]
        if (st := _stat(p)) is not None
    ]
    cutoff = now - settings.retention_seconds
    total = sum(size for _, size, _ in files)
    gone = []
    for mtime, size, path in sorted(
        files, key=lambda f: (f[0] >= cutoff, path_rank(f[2], shipped), f[0])
    ):
        if mtime >= cutoff and total <= settings.max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        gone.append(path)
    if ledger is not None:
        ledger.expire(
            max(cutoff, oldest_record(folder, default=cutoff)),
            pixels_before=now - settings.feedback_image_seconds,
        )
    if gone:
        log.info("prediction log: deleted %d old files in %s", len(gone), folder)
    return gone


def path_rank(path: Path, shipped: set[Path]) -> int:
    """Under the size cap: shipped files go first, then kept images, then unshipped files."""
    if path in shipped:
        return 0
    return 2 if path.name.startswith("predictions-") else 1


def oldest_record(folder: Path, default: float) -> float:
    """When the oldest log file still here was opened (its name says): ids answered before it
    have no record left."""
    names = [p.name for p in Path(folder).glob("predictions-*")]
    names += [p.name for p in (Path(folder) / SHIPPED).glob("predictions-*")]
    stamps = []
    for name in names:
        try:
            stamps.append(
                datetime.strptime(name.split("-")[1], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
            )
        except (IndexError, ValueError):
            continue
    # (less a minute: a file opened at a flush holds the answers queued just before it)
    return min(stamps).timestamp() - 60 if stamps else default


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:  # another worker pruned it meanwhile
        return None


def lock_open_file(f: Any) -> None:
    """A writer holds an exclusive lock on its open file for as long as it writes it."""
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def recover_orphans(folder: Path) -> list[Path]:
    """Close the open files nobody writes any more (a crashed or killed worker): a file whose
    lock can be taken has no writer. (A lock, not the process id: a restarted container's
    workers get the same ids back.)"""
    closed = []
    for part in sorted(Path(folder).glob(f"predictions-*.jsonl{OPEN_SUFFIX}")):
        try:
            with open(part, "rb") as f:  # (never "a": that would make a new empty file)
                try:
                    lock_open_file(f)
                except BlockingIOError:
                    continue  # a live writer has it
                part.rename(part.with_name(part.name[: -len(OPEN_SUFFIX)]))
                closed.append(part)
        except FileNotFoundError:  # another worker starting beside this one closed it first
            continue
    return closed


def opened_at(path: Path) -> float | None:
    """When a log file was opened, from its name (`predictions-<YYYYmmddTHHMMSS>-...`)."""
    try:
        stamp = datetime.strptime(path.name.split("-")[1], "%Y%m%dT%H%M%S")
    except (IndexError, ValueError):
        return None
    return stamp.replace(tzinfo=UTC).timestamp()


def read_records(
    folder: Path,
    include_open: bool = True,
    kind: str | None = None,
    opened_after: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Every line of the log (shipped and closed files, and the open ones unless told not to),
    in the order the files were opened. A line cut short by a crash is skipped. A folder that
    is not a log folder (records downloaded from several hosts) is read at every depth. With
    `opened_after`, files opened before that time are skipped."""
    paths = shipped_files(folder) + closed_files(folder)
    if include_open:
        paths += list(Path(folder).glob(f"predictions-*.jsonl{OPEN_SUFFIX}"))
    if not paths:
        paths = [p for p in Path(folder).rglob("predictions-*.jsonl*") if p.is_file()]
    for path in sorted(paths, key=lambda p: p.name):
        opened = opened_at(path)
        if opened_after is not None and opened is not None and opened < opened_after:
            continue  # (a file opened earlier holds only earlier answers)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if kind is None or record.get("kind") == kind:
                yield record
