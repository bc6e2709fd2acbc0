"""The prediction log's folder: which files are open, closed or shipped, reading them back,
and pruning by age and size (serving/records.py writes them)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.feedback import Ledger
    from serving.records import LogSettings

log = logging.getLogger("cifar10.serving")

OPEN_SUFFIX = ".part"
SHIPPED = "shipped"  # the subfolder closed files move to once they reached the tracking server


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def default_folder() -> Path:
    """Where the service writes its log: $CIFAR_PREDICTION_LOG_DIR, else beside the BentoML
    store ($BENTOML_HOME/prediction-log)."""
    home = Path(_env("BENTOML_HOME", str(Path.home() / "bentoml"))).expanduser()
    return Path(_env("CIFAR_PREDICTION_LOG_DIR", str(home / "prediction-log")))


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
    files = [
        (st.st_mtime, st.st_size, p)
        for p in shipped_files(folder) + closed_files(folder) + _kept_images(folder)
        if (st := _stat(p)) is not None
    ]
    files.sort(key=lambda f: f[0])
    gone = []
    total = sum(size for _, size, _ in files)
    for mtime, size, path in files:
        if mtime >= now - settings.retention_seconds and total <= settings.max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        gone.append(path)
    if ledger is not None:
        ledger.expire(now - settings.retention_seconds)
    if gone:
        log.info("prediction log: deleted %d old files in %s", len(gone), folder)
    return gone


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:  # another worker pruned it meanwhile
        return None


def recover_orphans(folder: Path, host: str) -> list[Path]:
    """Close the open files of this host's processes that are gone (a crash or a kill)."""
    closed = []
    for part in Path(folder).glob(f"predictions-*-{host}-*.jsonl{OPEN_SUFFIX}"):
        pid = part.name.split("-")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            part.rename(part.with_name(part.name[: -len(OPEN_SUFFIX)]))
            closed.append(part)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_records(
    folder: Path, include_open: bool = True, kind: str | None = None
) -> Iterator[dict[str, Any]]:
    """Every line of the log (shipped and closed files, and the open ones unless told not to),
    in the order the files were opened. A line cut short by a crash is skipped."""
    paths = shipped_files(folder) + closed_files(folder)
    if include_open:
        paths += list(Path(folder).glob(f"predictions-*.jsonl{OPEN_SUFFIX}"))
    for path in sorted(paths, key=lambda p: p.name):
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
