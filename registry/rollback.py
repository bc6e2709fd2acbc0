"""Move `champion` back: to the champion the current one replaced, or to a named version.

    cifar-rollback --reason "v7 misreads night photos" [--to 5]        (flows/rollback.py)

Under the registry lock, like a registration: the alias never moves while a run is being judged
against it. Who, when and why go on both versions as tags (`rollback.from.*` on the version
left, `rollback.to.*` on the one that is champion again). The endpoint follows as it follows any new
champion: the champion is imported into the BentoML store (on one machine by the rollback
itself, on a team by the serving host's `cifar-import-champion --follow`) and each worker swaps
it in under load (serving/live.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from registry import tracking, versions


class RollbackRefused(RuntimeError):
    """Nothing to roll back to, or a target that cannot be champion; nothing was changed."""


@dataclass(frozen=True)
class RolledBack:
    name: str
    from_version: str
    to_version: str
    who: str
    when: str
    reason: str


def previous_champion(version: Any) -> str | None:
    """The champion `version` replaced (the one it was judged against when it was promoted)."""
    if version.tags.get("promotion") != "champion":
        return None
    return version.tags.get("compared_with_version")


def _target(client: Any, name: str, current: Any, to: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    wanted = to or previous_champion(current)
    if wanted is None:
        raise RollbackRefused(
            f"{name} v{current.version} replaced no earlier champion (it was the first, or "
            "was promoted without a comparison): name the version to go back to (--to)"
        )
    try:
        target = client.get_model_version(name, str(wanted))
    except MlflowException:
        raise RollbackRefused(f"{name} has no version {wanted!r}") from None
    if str(target.version) == str(current.version):
        raise RollbackRefused(f"{name} v{target.version} is the champion already")
    if target.tags.get(versions.REGISTRATION_TAG) != "complete":
        raise RollbackRefused(
            f"{name} v{target.version} never finished its registration: it cannot be champion"
        )
    return target


def rollback(
    store: tracking.Store,
    *,
    reason: str,
    who: str,
    lock: AbstractContextManager[Any],
    to: str | None = None,
    name: str = tracking.REGISTERED_MODEL,
) -> RolledBack:
    """Point `champion` at `to` (default: the champion the current one replaced)."""
    if not reason.strip():
        raise RollbackRefused("say why (--reason): it is recorded on both versions")
    client = store.client
    with lock:
        current = versions.champion_version(store, name)
        if current is None:
            raise RollbackRefused(f"{name} has no champion to roll back from")
        target = _target(client, name, current, to)
        when = datetime.now(UTC).isoformat(timespec="seconds")
        src, dst = str(current.version), str(target.version)
        for version, direction, other in ((src, "from", dst), (dst, "to", src)):
            for key, value in (("at", when), ("by", who), ("reason", reason[:4000])):
                client.set_model_version_tag(name, version, f"rollback.{direction}.{key}", value)
            client.set_model_version_tag(
                name, version, f"rollback.{direction}.{'to' if direction == 'from' else 'from'}",
                other,
            )  # fmt: skip
        client.set_registered_model_alias(name, tracking.CHAMPION, dst)
    return RolledBack(name, src, dst, who, when, reason)
