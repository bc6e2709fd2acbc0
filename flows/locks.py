"""Locks shared by every host of a team: Prefect global concurrency limits of 1.

Several runs finish at once when several workers train. Two steps must not interleave:
registering a version (judge it against the champion, create it, move the alias) and claiming
an unfinished MLflow run to resume it. Each is wrapped in a global concurrency limit of one
slot on the Prefect server every worker already talks to: the slot is a lease the server
holds (renewed while the block runs, released by the server if its holder dies), so no extra
lock service, no file on a shared disk and no sleep. The team stack keeps the leases on the
Prefect server's disk, so a restarted server still expires them; an embedded (in-memory)
server that dies takes its leases along, and a slot held then stays taken until the limit is
deleted (`prefect gcl delete cifar-registry-<model>`; it is recreated on next use). A lease
renewal that fails does not abort the block (a registration interrupted half way is what the
registry's `unfinished` tag exists for, and is rolled back by the run's next registration).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

LEASE_SECONDS = 60  # the server's minimum; renewed while the block runs
WAIT_SECONDS = 900  # a registration takes seconds: waiting this long means something is stuck


class LockTimeout(RuntimeError):
    """The lock was not free within the wait."""


def lock_name(kind: str, key: str) -> str:
    """A concurrency-limit name for one lock (letters, digits, '-', '_', '.')."""
    return f"cifar-{kind}-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", key)[:100]


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit `name` with `limit` slots unless it exists (another
    host creating it at the same moment is fine)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            found = None
        if found is None:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )


@contextlib.contextmanager
def exclusive(kind: str, key: str, wait_s: float = WAIT_SECONDS) -> Iterator[None]:
    """Hold the one slot of lock `kind`/`key` for the duration of the block."""
    from prefect.concurrency.sync import concurrency

    name = lock_name(kind, key)
    ensure_limit(name)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(
                    name,
                    occupy=1,
                    timeout_seconds=wait_s,
                    lease_duration=LEASE_SECONDS,
                    strict=True,
                    # A missed renewal (server restarting) must not
                    # abort a registration half way: the block takes
                    # seconds, the lease a minute.
                    raise_on_lease_renewal_failure=False,
                )
            )
        except TimeoutError as exc:
            raise LockTimeout(
                f"lock {name} (Prefect global concurrency limit) still held by "
                f"another run after {wait_s:.0f} s"
            ) from exc
        yield
