"""Extra labelled training images: the 32x32 inputs the service kept for answers that clients
labelled through /feedback (`<folder>/<label>/<request id>.png`, serving/records.py).

`read_folder` reads such folders; `pack` stores the images as one content-named `.npz`, so a
run's config names exactly the images it trained on (same images, same file name, same config
hash); `load` reads it back for training, without any image that is also a validation or test
image (the champion rule judges on images neither model trained on, and the test set stays
unseen).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarlab.constants import CLASS_NAMES, IMAGE_SIZE


@dataclass(frozen=True)
class Labelled:
    images: np.ndarray  # uint8 (N, 3, 32, 32), as the training arrays
    labels: np.ndarray  # int64 (N,)
    skipped: int = 0  # files that were not a 32x32 image of a known class
    dropped: int = 0  # images also found among the validation or test images
    path: Path | None = None  # the packed file they were loaded from

    def __len__(self) -> int:
        return len(self.labels)


def read_folder(folders: Iterable[Path], names: Sequence[str] = CLASS_NAMES) -> Labelled:
    """Every `<label>/*.png` under the folders, each distinct image once (sorted by content)."""
    from PIL import Image, UnidentifiedImageError

    ids = {n: i for i, n in enumerate(names)}
    seen: dict[bytes, int] = {}
    skipped = 0
    for folder in folders:
        for path in sorted(Path(folder).glob("*/*.png")):
            label = ids.get(path.parent.name)
            try:
                with Image.open(path) as img:
                    ok = label is not None and img.size == (IMAGE_SIZE, IMAGE_SIZE)
                    px = np.asarray(img.convert("RGB"), dtype=np.uint8) if ok else None
            except (OSError, UnidentifiedImageError):
                px = None
            if px is None or label is None:
                skipped += 1
                continue
            seen.setdefault(px.transpose(2, 0, 1).tobytes(), label)
    keys = sorted(seen)
    images = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.array([seen[k] for k in keys], dtype=np.int64)
    return Labelled(images.copy(), labels, skipped)


def pack(data: Labelled, folder: Path) -> Path:
    """The images as `<folder>/labelled-<n>-<sha>.npz` (written once; the name is the content)."""
    digest = hashlib.sha256(data.images.tobytes() + data.labels.tobytes()).hexdigest()[:16]
    path = Path(folder) / f"labelled-{len(data)}-{digest}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.savez(f, images=data.images, labels=data.labels)  # two runs may pack at once
        os.replace(f.name, path)
    return path


def resolve(name: str, root: Path) -> Path:
    """A config's `extra_train`: a packed file's name in `<root>/data/labelled/` (what the flow
    writes, the same on every host), or a path."""
    p = Path(name).expanduser()
    return p if p.is_absolute() or p.parent != Path(".") else Path(root) / "data" / "labelled" / p


def load(path: Path, held_out: Sequence[np.ndarray] = ()) -> Labelled:
    """The packed images, less any that equals an image of `held_out` (uint8 N,3,32,32 arrays:
    the validation and test images)."""
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    if (
        images.ndim != 4
        or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE)
        or len(images) != len(labels)
    ):
        raise ValueError(f"{path}: expected images (N, 3, 32, 32) and N labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"{path}: labels must be class ids 0-{len(CLASS_NAMES) - 1}")
    forbidden = {
        bytes(im) for arr in held_out for im in np.ascontiguousarray(arr).reshape(len(arr), -1)
    }
    keep = np.array([bytes(im) not in forbidden for im in images.reshape(len(images), -1)], bool)
    return Labelled(images[keep], labels[keep].astype(np.int64), dropped=int((~keep).sum()),
                    path=Path(path))  # fmt: skip
