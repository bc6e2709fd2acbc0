"""Roll the champion back (registry/rollback.py), and import it here when this host serves.

    cifar-rollback --reason "v7 misreads night photos" [--to 5] [--who alice]
    prefect deployment run rollback-cifar/default -p reason="..." [-p to_version=5]

The command takes the registry lock on the Prefect server named by `PREFECT_API_URL` (the one
`make stack` and the team stack run), like every registration; with no server named it says
that it is not serialised with the registrations of a running stack. On one machine the
rolled-back champion is imported into the BentoML store at once (`make serve` swaps it in at
its next poll); a team's serving hosts import it with `cifar-import-champion --follow`.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import locks
from flows.common import PROJECT_ROOT, import_champion, serves_here
from registry import tracking
from registry.rollback import RollbackRefused, rollback


def default_who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


@flow(name="rollback-cifar", log_prints=True)
def rollback_cifar(reason: str, to_version: str | None = None, who: str | None = None) -> dict:
    """Move `champion` back to the champion it replaced, or to `to_version`, saying why."""
    store = tracking.open_store(PROJECT_ROOT)
    done = rollback(
        store,
        reason=reason,
        who=who or default_who(),
        to=to_version,
        lock=locks.exclusive("registry", tracking.REGISTERED_MODEL),
    )
    get_run_logger().info("champion: v%s -> v%s (%s)", done.from_version, done.to_version, reason)
    out: dict[str, Any] = asdict(done)
    if serves_here(store):
        out["imported"] = import_champion(store, str(PROJECT_ROOT))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cifar-rollback", description=__doc__.split("\n")[0])
    parser.add_argument("--reason", required=True, help="why: recorded on both versions")
    parser.add_argument("--to", help="the version to make champion (default: the one replaced)")
    parser.add_argument("--who", default=None, help="who rolls back (default: user@host)")
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT, help="project folder")
    parser.add_argument("--tracking-uri", help="MLflow store (default: as training)")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or tracking.tracking_uri(args.root)
    lock: contextlib.AbstractContextManager[Any]
    if os.environ.get("PREFECT_API_URL"):
        lock = locks.exclusive("registry", tracking.REGISTERED_MODEL)
    else:
        print(
            "note: no PREFECT_API_URL: this rollback is not serialised with registrations of a "
            "running stack (export PREFECT_API_URL=http://127.0.0.1:4200/api when one runs)",
            file=sys.stderr,
        )
        lock = contextlib.nullcontext()
    try:
        store = tracking.open_store(args.root, uri=uri)
        done = rollback(store, reason=args.reason, who=args.who or default_who(), to=args.to,
                        lock=lock)  # fmt: skip
    except (RollbackRefused, tracking.TrackingUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{done.name}: champion v{done.from_version} -> v{done.to_version} "
          f"({done.who}, {done.when}): {done.reason}")  # fmt: skip
    if serves_here(store):
        from registry.import_champion import ImportFailed, bentoml_home
        from registry.import_champion import import_champion as into_bentoml_store

        try:
            result = into_bentoml_store(store.uri, bentoml_home(args.root))
        except ImportFailed as exc:
            print(f"error: the registry is rolled back, the BentoML store is not: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(f"BentoML store: {result.tag} = v{result.version} (the service swaps it in)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
