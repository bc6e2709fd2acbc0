"""The images clients labelled through /feedback, gathered for a retraining run.

`train-cifar -p feedback_images=auto` (what the drift trigger in prefect.yaml passes) uses:
  - this host's prediction log, `<log>/feedback-images/<label>/*.png`, when the service here
    keeps them (CIFAR_KEEP_FEEDBACK_IMAGES=true);
  - the ones serving hosts shipped to the tracking server (`cifar-import-champion --follow`
    ships them with the records), for a training host that serves nothing.
A folder path instead of `auto` reads that folder (`<label>/*.png`). The images are packed into
one content-named file under `<root>/data/labelled/` (cifarlab/labelled.py), which the run's
config names, so a run's identity says which images it learned from.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cifarlab import labelled
from registry import tracking

FEEDBACK_DIR = "feedback-images"
PLAIN = (
    "no feedback images were kept: a plain retrain "
    "(CIFAR_KEEP_FEEDBACK_IMAGES=true on the service keeps them)"
)


def _sources(spec: str, root: Path, tmp: Path) -> list[Path]:
    from flows.monitor import local_log
    from registry.ship_records import download_feedback_images

    if spec != "auto":
        if not Path(spec).is_dir():
            raise ValueError(f"feedback_images={spec!r}: expected 'auto' or a folder")
        return [Path(spec)]
    found = []
    log = local_log()
    if log is not None and (log / FEEDBACK_DIR).is_dir():
        found.append(log / FEEDBACK_DIR)
    store = tracking.open_store(root)
    found += download_feedback_images(root, tmp, store.uri)
    return found


def gather(spec: str, root: Path) -> tuple[str | None, str]:
    """(the packed file's name in <root>/data/labelled/ or None, what was found)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = labelled.read_folder(_sources(spec, root, Path(tmp)))
    if not len(data):
        return None, PLAIN
    path = labelled.pack(data, root / "data" / "labelled")
    skipped = (
        f", {data.skipped} files skipped (not a 32x32 image of a class)" if data.skipped else ""
    )
    return path.name, f"{len(data)} labelled images found{skipped}"


def summary_line(s: dict[str, Any]) -> str | None:
    """The run summary's feedback row: what the run learned from (None: not asked)."""
    found = s.get("learns_from")
    if found is None or s.get("feedback_images") is None:
        return found  # not asked, or the plain retrain's note
    return (f"{s['feedback_images']} images labelled through /feedback added to the training "
            f"split ({found}; {s['feedback_images_dropped']} left out: also a validation or "
            "test image)")  # fmt: skip
