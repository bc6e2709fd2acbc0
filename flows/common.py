"""What both flows share: the root a run writes under, whether this host serves, and the task
that imports the registry's champion into this host's BentoML store (`cifar-import-champion`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from registry import tracking

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_root(root: str | None) -> Path:
    """The folder a run writes under: the argument, else $CIFAR_ROOT, else the project folder."""
    return Path(root or os.environ.get("CIFAR_ROOT") or PROJECT_ROOT).resolve()


def serves_here(store: tracking.Store) -> bool:
    """Whether this host fills a BentoML store with the champion: $CIFAR_IMPORT_CHAMPION
    (true/false) when set; else yes with a local tracking store (one machine does everything)
    and no with a tracking server (serving hosts import the champion from it themselves)."""
    setting = os.environ.get("CIFAR_IMPORT_CHAMPION", "").strip().lower()
    if not setting and os.environ.get("CIFAR_PUBLISH_BENTOML"):  # its name before
        get_run_logger().warning("CIFAR_PUBLISH_BENTOML is now CIFAR_IMPORT_CHAMPION: read it")
        setting = os.environ["CIFAR_PUBLISH_BENTOML"].strip().lower()
    if setting in ("1", "true", "yes"):
        return True
    if setting in ("0", "false", "no"):
        return False
    if setting:
        raise ValueError(f"CIFAR_IMPORT_CHAMPION={setting!r}: expected true or false")
    return not store.uri.startswith(("http://", "https://"))


@task(cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=2)
def import_champion(store: tracking.Store, root: str) -> dict[str, Any]:
    """Copy the registry's champion into the BentoML model store (a no-op when it is already the
    newest model there), so that `bentoml serve` / `bentoml build` pick it up."""
    from registry.import_champion import bentoml_home
    from registry.import_champion import import_champion as into_bentoml_store

    home = bentoml_home(Path(root))
    result = into_bentoml_store(store.uri, home)
    get_run_logger().info(
        "BentoML store %s: %s = %s v%s (%s)",
        home,
        result.tag,
        result.registered_model,
        result.version,
        "imported" if result.created else "already the newest",
    )
    return {
        "tag": result.tag,
        "version": result.version,
        "created": result.created,
        "bentoml_home": str(home),
    }
