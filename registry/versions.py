"""The MLflow model registry: versions of the registered model, the `champion` alias, and the
registered ONNX file. A registration that fails half way leaves its version tagged
`registration=unfinished`, which the run's next registration removes."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.tracking import CHAMPION, REGISTERED_MODEL, Store, display_uri


@dataclass
class Registration:
    """What registering a run did."""

    name: str
    version: str
    alias: str  # champion or challenger
    previous_champion: str | None
    reason: str  # why the alias went where it did


def champion_version(store: Store, name: str = REGISTERED_MODEL) -> Any | None:
    """The version holding the `champion` alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return store.client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # Only "no such model / alias" means no champion; a server error must not crown the
        # next version unjudged.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


REGISTRATION_TAG = "registration"  # "unfinished" from creation until its alias is set


def _create_registered_model(client: Any, name: str) -> None:
    """Create the registered model; another host having just created it is not an error."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            description=(
                "CIFAR-10 classifiers exported to ONNX. The alias `champion` marks the version the "
                "endpoint serves: a new version takes it only by beating the champion's ONNX model "
                "on validation images held out from both (see each version's tags and model card)."
            ),
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def drop_unfinished_versions(store: Store, run_id: str, name: str = REGISTERED_MODEL) -> list[str]:
    """Delete the versions an earlier, failed registration of this run left unfinished (created,
    alias never set), so a retry registers the run once, not twice."""
    from mlflow.exceptions import MlflowException

    client = store.client
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return []
    dropped = []
    for v in versions:
        if v.tags.get(REGISTRATION_TAG) != "unfinished":
            continue
        # (search results carry no aliases: read the version itself)
        if CHAMPION in client.get_model_version(name, v.version).aliases:
            # It failed after taking the alias, before recording it: give the alias back to
            # the champion it was judged against (or to nobody), then register again.
            previous = v.tags.get("compared_with_version")
            if previous and _version_exists(client, name, previous):
                client.set_registered_model_alias(name, CHAMPION, previous)
            else:
                client.delete_registered_model_alias(name, CHAMPION)
        client.delete_model_version(name, v.version)  # its other aliases go with it
        dropped.append(str(v.version))
    return dropped


def _version_exists(client: Any, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
        return True
    except MlflowException:
        return False


def create_version(
    store: Store,
    run_id: str,
    model_uri: str,
    tags: Mapping[str, str],
    name: str = REGISTERED_MODEL,
    model_id: str | None = None,
) -> str:
    """A new version of `name` (created on first use) from a logged model; returns its number."""
    from mlflow.exceptions import MlflowException

    client = store.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        _create_registered_model(client, name)
    tags = {**tags, REGISTRATION_TAG: "unfinished"}
    if model_id is None:
        return str(
            client.create_model_version(name, model_uri, run_id=run_id, tags=dict(tags)).version
        )
    # From the LoggedModel (`models:/<id>`, which the UI links as the version's source model).
    # MLflow's SQL registry resolves that URI with a default client, i.e. from the environment:
    # point it at this store for this one call only.
    with _scoped_env("MLFLOW_TRACKING_URI", store.uri):
        version = client.create_model_version(
            name, f"models:/{model_id}", run_id=run_id, tags=dict(tags), model_id=model_id
        )
    # What the fluent API would add: the model's page lists the versions made from it.
    client.set_logged_model_tags(
        model_id,
        {"mlflow.modelVersions": json.dumps([{"name": name, "version": int(version.version)}])},
    )
    return str(version.version)


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _scoped_env(key: str, value: str):
    """Set an environment variable for one block, one thread at a time, then restore it."""
    with _ENV_LOCK:
        old = os.environ.get(key)
        os.environ[key] = value
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def set_alias(
    store: Store, run_id: str, version: str, alias: str, name: str = REGISTERED_MODEL
) -> None:
    """Point `alias` at `version` and record it on the run."""
    client = store.client
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, REGISTRATION_TAG, "complete")
    client.set_tag(run_id, "registered", "true")
    client.set_tag(run_id, "registry.version", version)
    client.set_tag(run_id, "registry.alias", alias)


def version_uri(store: Store, version: Any) -> str:
    """Where a registry version's files can be downloaded from (its model's artifact location)."""
    return store.client.get_model_version_download_uri(version.name, version.version)


def download_onnx(store: Store, artifact_uri: str, dest: Path) -> Path:
    """The single `.onnx` file under `artifact_uri`, downloaded into `dest` (MLmodel beside it)."""
    import mlflow.artifacts

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(dest), tracking_uri=store.uri
        )
    )
    found = sorted(local.rglob("*.onnx"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{artifact_uri}: expected one .onnx file, found {[p.name for p in found]}"
        )
    return found[0]


class ArtifactStoreDown(RuntimeError):
    """The tracking server's artifact store does not answer: nothing may be registered."""


ARTIFACT_STORE_WAIT_S = 30.0
REGISTRATION_RETRIES = "4"  # MLflow's back-off: some 30 s per request, not 4 minutes (7)


def require_artifact_store(
    store: Store, run_id: str, wait_s: float = ARTIFACT_STORE_WAIT_S
) -> None:
    """On a tracking server with proxied artifacts (its object store behind it), the run's
    artifact folder must list within `wait_s` seconds, asked without MLflow's own retries
    (some 4 minutes per request). A registration that fails here has created nothing."""
    from urllib.parse import urlparse

    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    artifact_uri = urlparse(store.client.get_run(run_id).info.artifact_uri)
    if artifact_uri.scheme != "mlflow-artifacts" or not store.uri.startswith("http"):
        return
    if artifact_uri.netloc:  # a separate artifacts server (not the team stack's layout)
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            answer = http_request(
                get_default_host_creds(store.uri), "/api/2.0/mlflow-artifacts/artifacts", "GET",
                params={"path": artifact_uri.path.lstrip("/")}, max_retries=0,
                retry_codes=frozenset(), raise_on_status=False, timeout=10,
            )  # fmt: skip
            if answer.status_code == 200:
                return
            why = f"HTTP {answer.status_code}: {answer.text[:200]}"
            retry = answer.status_code >= 500  # a refusal (401, 403, 404) is not an outage
        except Exception as exc:  # noqa: BLE001 - no answer at all (connection, timeout)
            why, retry = f"{type(exc).__name__}: {exc}"[:300], True
        if not retry or time.monotonic() >= deadline:
            raise ArtifactStoreDown(
                f"MLflow tracking server {display_uri(store.uri)}: its artifact store does not "
                f"answer for run {run_id}'s files ({why}): nothing registered, no alias moved"
            )
        time.sleep(3)


_RETRIES_LOCK = threading.Lock()
_brief_holders = 0


@contextlib.contextmanager
def brief_retries() -> Iterator[None]:
    """While a registration runs, MLflow's client backs off for some 30 s per failed request,
    not 4 minutes (unless MLFLOW_HTTP_REQUEST_MAX_RETRIES is set): an artifact store that dies
    mid-registration fails it in minutes, not tens, and the registry lock is released. The
    setting is the process's: it stays while any thread is inside."""
    global _brief_holders
    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    with _RETRIES_LOCK:
        if _brief_holders == 0 and key in os.environ:
            mine = False  # the user's setting: leave it alone
        else:
            mine, _brief_holders = True, _brief_holders + 1
            os.environ[key] = REGISTRATION_RETRIES
    try:
        yield
    finally:
        if mine:
            with _RETRIES_LOCK:
                _brief_holders -= 1
                if _brief_holders == 0:
                    os.environ.pop(key, None)
