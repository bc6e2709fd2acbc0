"""A serving host's closed prediction-log files -> artifacts of a run on the tracking server.

    cifar-import-champion --ship-records        once
    cifar-import-champion --follow 60           every check, after importing the champion

The service writes its records on its own disk (serving/records.py); the monitor runs on other
hosts. The files travel through the MLflow tracking server the serving host already reaches, with
the credentials it imports the champion with: no shared disk, nothing else to open. They land in
the experiment `cifar10-monitoring`, in one run per serving host (`prediction-log <host>`, tag
`cifar.records_host`), as `prediction-log/<day>/<file>`; kept feedback images go beside them as
`feedback-images/<label>/<id>.png` (a retraining run learns from them: flows/feedback_data.py). A shipped file moves to the log's
`shipped/` folder (still read locally, and pruned by the log's retention and size cap); one the
server did not take stays where it is and goes with the next call.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from registry.tracking import Store, open_store
from serving.logfiles import SHIPPED, closed_files

MONITORING_EXPERIMENT = "cifar10-monitoring"
MONITORING_PREFIX = "monitoring"  # its folder in a tracking server's artifact store (bucket)
HOST_TAG = "cifar.records_host"
ARTIFACT_DIR = "prediction-log"
IMAGES_DIR = "feedback-images"  # the inputs clients labelled (CIFAR_KEEP_FEEDBACK_IMAGES=true)
IMAGES_SHIPPED = "feedback-images.txt"  # in shipped/: the ones already sent


@dataclass(frozen=True)
class Shipped:
    run_id: str
    files: list[Path]  # where they are now (the shipped/ folder)


def host_run(store: Store, host: str) -> str:
    """The monitoring run of this serving host, created the first time."""
    found = store.client.search_runs(
        [store.experiment_id], filter_string=f"tags.`{HOST_TAG}` = '{host}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = store.client.create_run(
        store.experiment_id,
        run_name=f"prediction-log {host}",
        tags={HOST_TAG: host, "cifar.kind": "prediction-log"},
    )
    store.client.set_terminated(run.info.run_id, "FINISHED")  # artifacts may still be added
    return run.info.run_id


def ship_records(
    root: Path, folder: Path, uri: str | None = None, host: str | None = None
) -> Shipped | None:
    """Upload the closed files of `folder` not shipped yet; None when there are none.
    `uri`: the tracking server (default: registry.tracking.tracking_uri(root))."""
    files = closed_files(folder)
    images = _unshipped_images(Path(folder))
    if not files and not images:
        return None
    host = host or socket.gethostname()
    store = open_store(root, MONITORING_EXPERIMENT, uri, MONITORING_PREFIX)
    run_id = host_run(store, host)
    (Path(folder) / SHIPPED).mkdir(exist_ok=True)
    _ship_images(store, run_id, Path(folder), images)
    moved = []
    for path in files:
        day = path.name.split("-")[1][:8]  # predictions-<YYYYmmddTHHMMSS>-...
        store.client.log_artifact(run_id, str(path), f"{ARTIFACT_DIR}/{day}")
        dest = Path(folder) / SHIPPED / path.name
        path.rename(dest)
        moved.append(dest)
    return Shipped(run_id, moved)


def download_records(
    root: Path, dest: Path, uri: str | None = None, days: set[str] | None = None
) -> list[Path]:
    """Every host's shipped files, downloaded into `dest` (what a monitor host reads); with
    `days` (YYYYmmdd), only the files opened on those days."""
    store = open_store(root, MONITORING_EXPERIMENT, uri, MONITORING_PREFIX)
    runs = store.client.search_runs([store.experiment_id], filter_string=f"tags.`{HOST_TAG}` != ''")
    got: list[Path] = []
    for run in runs:
        host_dir = Path(dest) / run.data.tags[HOST_TAG]
        (host_dir / ARTIFACT_DIR).mkdir(parents=True, exist_ok=True)
        for day in store.client.list_artifacts(run.info.run_id, ARTIFACT_DIR):
            if days is None or Path(day.path).name in days:  # into <host>/prediction-log/<day>
                store.client.download_artifacts(
                    run.info.run_id, day.path, str(host_dir / ARTIFACT_DIR)
                )
        got += sorted((host_dir / ARTIFACT_DIR).rglob("predictions-*.jsonl"))
    return got


def _unshipped_images(folder: Path) -> list[Path]:
    done_list = folder / SHIPPED / IMAGES_SHIPPED
    done = set(done_list.read_text().split()) if done_list.exists() else set()
    return [p for p in sorted((folder / IMAGES_DIR).glob("*/*.png"))
            if f"{p.parent.name}/{p.name}" not in done]  # fmt: skip


def _ship_images(store: Store, run_id: str, folder: Path, images: list[Path]) -> None:
    if not images:
        return
    with (folder / SHIPPED / IMAGES_SHIPPED).open("a") as done:
        for path in images:
            store.client.log_artifact(run_id, str(path), f"{IMAGES_DIR}/{path.parent.name}")
            done.write(f"{path.parent.name}/{path.name}\n")
            done.flush()


def download_feedback_images(root: Path, dest: Path, uri: str | None = None) -> list[Path]:
    """Every host's shipped feedback images, downloaded into `dest`: a folder per host."""
    store = open_store(root, MONITORING_EXPERIMENT, uri, MONITORING_PREFIX)
    runs = store.client.search_runs([store.experiment_id], filter_string=f"tags.`{HOST_TAG}` != ''")
    got = []
    for run in runs:
        if not store.client.list_artifacts(run.info.run_id, IMAGES_DIR):
            continue
        host_dir = Path(dest) / run.data.tags[HOST_TAG]
        host_dir.mkdir(parents=True, exist_ok=True)
        store.client.download_artifacts(run.info.run_id, IMAGES_DIR, str(host_dir))
        got.append(host_dir / IMAGES_DIR)
    return got
