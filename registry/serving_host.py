"""What a serving host runs: `cifar-import-champion` (registry/import_champion.py) and, with it,
the shipping of the service's prediction log to the tracking server (registry/ship_records.py).

    cifar-import-champion [--root DIR] [--tracking-uri URI] [--alias champion]
    cifar-import-champion --follow 60       import each new champion, ship the log, every 60 s
    cifar-import-champion --ship-records    ship the closed prediction-log files, once
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from registry.import_champion import PROJECT_ROOT, ImportFailed, bentoml_home, import_champion


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-import-champion", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=PROJECT_ROOT,
        help="project folder holding mlflow.db (and bentoml/ unless $BENTOML_HOME)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db)",
    )
    parser.add_argument("--alias", default="champion", help="registry alias to import")
    parser.add_argument(
        "--follow",
        type=float,
        default=0,
        metavar="SECONDS",
        help="keep going: check the registry every SECONDS and import each new "
        "champion (a serving host's running service swaps it in), and ship the closed "
        "prediction-log files",
    )
    parser.add_argument(
        "--ship-records",
        action="store_true",
        help="only ship the service's closed prediction-log files to the tracking server",
    )
    parser.add_argument(
        "--records-dir",
        type=Path,
        default=None,
        help="the service's prediction log (default: $CIFAR_PREDICTION_LOG_DIR, else "
        "$BENTOML_HOME/prediction-log)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.follow < 0:
        parser.error(f"--follow {args.follow}: must be a number of seconds >= 0")
    from registry.tracking import tracking_uri

    uri = args.tracking_uri or tracking_uri(args.root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(
            f"error: no MLflow store at {uri.removeprefix('sqlite:///')}: train a model first "
            "(make run)",
            file=sys.stderr,
        )
        return 2
    home = bentoml_home(args.root)
    records = args.records_dir or _records_dir(home)
    if args.ship_records:
        return _ship(args.root, records, uri)
    if args.follow:
        return _follow(uri, home, args.alias, args.follow, Shipper(args.root, records, uri))
    try:
        result = import_champion(uri, bentoml_home(args.root), alias=args.alias)
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = "imported" if result.created else "already in the store"
    print(
        f"{result.tag}: {result.registered_model} v{result.version} (run {result.run_id}, "
        f"validation accuracy {result.val_accuracy}) {state}"
    )
    for key, value in asdict(result).items():
        print(f"  {key}: {value}")
    return 0


def _records_dir(home: Path) -> Path:
    os.environ.setdefault("BENTOML_HOME", str(home))  # the service's default: beside its store
    from serving.logfiles import default_folder

    return default_folder()


@dataclass
class Shipper:
    root: Path
    folder: Path
    uri: str
    warned: bool = False

    def __call__(self) -> None:
        from registry.ship_records import ship_records

        if not self.folder.is_dir():
            if not self.warned:
                print(f"no prediction log at {self.folder} yet: nothing to ship", flush=True)
                self.warned = True
            return
        shipped = ship_records(self.root, self.folder, self.uri)
        if shipped is not None:
            print(
                f"shipped {len(shipped.files)} prediction-log files to run {shipped.run_id}",
                flush=True,
            )


def _ship(root: Path, folder: Path, uri: str) -> int:
    from mlflow.exceptions import MlflowException

    from registry.tracking import TrackingUnavailable, display_uri

    if not folder.is_dir():
        print(f"error: no prediction log at {folder}", file=sys.stderr)
        return 2
    try:
        Shipper(root, folder, uri)()
    except (TrackingUnavailable, MlflowException, OSError) as exc:
        print(f"error: shipping {folder} to {display_uri(uri)}: {exc}", file=sys.stderr)
        return 2
    return 0


def _import(uri: str, home: Path, alias: str, last: str | None) -> str:
    result = import_champion(uri, home, alias=alias)
    if result.created or result.tag != last:
        state = "imported" if result.created else "already in the store"
        print(f"{result.tag}: {result.registered_model} v{result.version} ({state})", flush=True)
    return result.tag


def _attempt(step: Callable[..., Any], every: float, *args: Any) -> Any:
    """One step of a check; a failure is reported and the step tried again at the next."""
    try:
        return step(*args)
    except Exception as exc:  # noqa: BLE001 - keep following
        print(
            f"error (trying again in {every:g} s): {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return None


def _follow(uri: str, home: Path, alias: str, every: float, ship: Shipper) -> int:
    """Import the champion now and whenever it changes, until stopped (Ctrl-C or SIGTERM).
    A registry that does not answer, or a champion that cannot be imported, is reported and
    tried again at the next check; the store keeps what it has. Each check also ships the
    service's closed prediction-log files."""
    import signal
    import time

    from registry.tracking import display_uri

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"following {alias} of {display_uri(uri)} every {every:g} s into {home}", flush=True)
    last = None
    try:
        while True:
            last = _attempt(_import, every, uri, home, alias, last) or last
            _attempt(ship, every)
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
