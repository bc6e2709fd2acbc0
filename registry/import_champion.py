"""Copy the MLflow registry's `champion` ONNX model into the BentoML model store.

    cifar-import-champion [--root DIR] [--tracking-uri URI] [--alias champion] [--follow S]

(also `make import-champion` and the last task of `train-cifar`). The BentoML model
`cifar10-classifier:<version>` holds `model.onnx`, the MLmodel file and the version's model card
(served at GET /model), with the registry version, run id, accuracies, class names and the
preprocessing constants as metadata. Importing the same version again is a no-op. MLflow as in
training (`MLFLOW_TRACKING_URI`, else `sqlite:///<root>/mlflow.db`); BentoML at `$BENTOML_HOME`,
else `<root>/bentoml`. The service never talks to MLflow: it follows its store (serving/live.py);
a serving host runs `cifar-import-champion --follow 60`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarlab.constants import CLASS_NAMES, IMAGE_SIZE, MEAN, RESIZE_FILTER, STD

BENTO_MODEL = "cifar10-classifier"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ImportFailed(RuntimeError):
    """No champion, or one the service could not serve correctly."""


@dataclass(frozen=True)
class Imported:
    tag: str
    registered_model: str
    version: str
    run_id: str
    val_accuracy: float | None
    test_accuracy: float | None
    created: bool  # False: this registry version was already in the store


def bentoml_home(root: Path | None = None) -> Path:
    """$BENTOML_HOME, else `<root>/bentoml`."""
    if os.environ.get("BENTOML_HOME"):
        return Path(os.environ["BENTOML_HOME"]).expanduser().resolve()
    return (Path(root or PROJECT_ROOT) / "bentoml").resolve()


_HOME_IN_USE: list[Path] = []  # the BentoML home this process has used (at most one)


def use_bentoml_home(home: Path) -> None:
    """Point BentoML's public API at the store under `home`. BentoML reads $BENTOML_HOME once
    per process, when its store is first used: a process that has used another home cannot
    switch (ImportFailed names both; run `cifar-import-champion` in a process of its own)."""
    home = Path(home).resolve()
    if _HOME_IN_USE and _HOME_IN_USE[0] != home:
        raise ImportFailed(
            f"this process already uses the BentoML store {_HOME_IN_USE[0]}; "
            f"importing into {home} needs a process of its own"
        )
    (home / "models").mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(home)
    if not _HOME_IN_USE:
        _HOME_IN_USE.append(home)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def import_champion(
    tracking_uri: str,
    home: Path,
    registered_model: str | None = None,
    alias: str | None = None,
    bento_model: str = BENTO_MODEL,
) -> Imported:
    """Import `models:/<registered_model>@<alias>` into the BentoML store at `home`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from registry.tracking import (
        CHAMPION,
        REGISTERED_MODEL,
        Store,
        display_uri,
        files_through_the_server,
    )
    from registry.versions import download_onnx, version_uri

    files_through_the_server()
    registered_model = registered_model or REGISTERED_MODEL
    alias = alias or CHAMPION
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(registered_model, alias)
    except MlflowException as exc:
        raise ImportFailed(
            f"no model version {registered_model}@{alias} in {tracking_uri}: "
            f"train one first (make run) ({exc.message})"
        ) from None
    use_bentoml_home(home)
    there = _already_imported(bento_model, registered_model, mv, display_uri(tracking_uri))
    if there is not None:
        return there
    with tempfile.TemporaryDirectory() as tmp:
        try:
            registry = Store(tracking_uri, "")
            onnx_file = download_onnx(registry, version_uri(registry, mv), Path(tmp))
        except (FileNotFoundError, MlflowException) as exc:
            raise ImportFailed(f"{registered_model} v{mv.version}: {exc}") from None
        tag, metadata = _store_model(
            client, mv, registered_model, alias, tracking_uri, onnx_file, bento_model
        )
    return Imported(
        tag,
        registered_model,
        str(mv.version),
        str(mv.run_id),
        metadata.get("val_accuracy"),
        metadata.get("test_accuracy"),
        created=True,
    )


def _store_model(
    client: Any,
    mv: Any,
    registered_model: str,
    alias: str,
    tracking_uri: str,
    onnx_file: Path,
    bento_model: str,
) -> tuple[str, dict[str, Any]]:
    """Check the downloaded file with the serving engine, then create the BentoML model from
    it, its int8 twin, MLmodel file and model card; returns (tag, metadata)."""
    import bentoml
    import yaml

    from serving.engine import Engine

    local = onnx_file.parent
    mlmodel_file = local / "MLmodel"
    mlmodel = yaml.safe_load(mlmodel_file.read_text()) if mlmodel_file.is_file() else {}
    logged = mlmodel.get("metadata") or {}
    class_names = list(logged.get("class_names") or CLASS_NAMES)
    _check_normalisation(logged, f"{registered_model} v{mv.version}")
    engine = Engine(onnx_file, {"class_names": class_names}, threads=1)  # loads + checks shapes
    engine.warm_up((1, 2))
    int8_file = _int8_file(client, mv, onnx_file.parent / "int8-twin", class_names)
    ood_file, ood_meta = _ood_reference(client, mv, onnx_file.parent / "ood", engine)
    metadata = _metadata(mv, registered_model, alias, tracking_uri, logged, class_names,
                         engine.input_name, int8_file is not None)  # fmt: skip
    metadata = {k: v for k, v in {**metadata, **ood_meta}.items() if v is not None}  # no None
    labels = {
        "registered_model": registered_model,
        "mlflow_version": str(mv.version),
        "mlflow_run_id": mv.run_id,
        "source": "mlflow",
    }
    with bentoml.models.create(bento_model, labels=labels, metadata=metadata) as bm:
        shutil.copyfile(onnx_file, bm.path_of("model.onnx"))
        if int8_file:
            shutil.copyfile(int8_file, bm.path_of("model_int8.onnx"))
        if ood_file:
            shutil.copyfile(ood_file, bm.path_of("ood_reference.json"))
        if mlmodel_file.is_file():
            shutil.copyfile(mlmodel_file, bm.path_of("MLmodel"))
        if mv.description:  # the version's model card (registry/modelcard.py)
            Path(bm.path_of("model_card.md")).write_text(mv.description)
    home = Path(os.environ["BENTOML_HOME"]).resolve()  # set by use_bentoml_home
    stored = Path(bentoml.models.get(bm.tag).path).resolve()  # (bm.path: where it was built)
    if not stored.is_relative_to(home):
        raise ImportFailed(
            f"BentoML put {bm.tag} in {stored}, outside {home}: this process's "
            "BentoML had its store set before; run cifar-import-champion alone"
        )
    return str(bm.tag), metadata


def _already_imported(
    bento_model: str, registered_model: str, mv: Any, tracking_uri: str
) -> Imported | None:
    """The store's newest model (what the service serves now), if it is this very version."""
    import bentoml

    try:
        latest = bentoml.models.get(f"{bento_model}:latest")
    except bentoml.exceptions.NotFound:
        return None
    if (
        not all(
            latest.info.labels.get(k) == v
            for k, v in (
                ("registered_model", registered_model),
                ("mlflow_version", str(mv.version)),
                ("mlflow_run_id", mv.run_id),
            )
        )
        or latest.info.metadata.get("tracking_uri") != tracking_uri
    ):
        return None
    meta = latest.info.metadata
    return Imported(
        str(latest.tag),
        registered_model,
        str(mv.version),
        mv.run_id,
        _float(meta.get("val_accuracy")),
        _float(meta.get("test_accuracy")),
        created=False,
    )


def _check_normalisation(logged: dict[str, Any], what: str) -> None:
    """The model must expect the service's normalisation (cifarlab/constants.py)."""
    for key, shared in (("mean", MEAN), ("std", STD)):
        if key in logged and [round(float(v), 6) for v in logged[key]] != [
            round(v, 6) for v in shared
        ]:
            raise ImportFailed(
                f"{what} was trained with {key} {logged[key]}, but the service "
                f"normalises with {list(shared)} (cifarlab/constants.py): "
                "refusing to serve it wrongly"
            )


def _metadata(
    mv: Any,
    registered_model: str,
    alias: str,
    tracking_uri: str,
    logged: dict[str, Any],
    class_names: list[str],
    input_name: str,
    has_int8: bool,
) -> dict[str, Any]:
    """The BentoML model's metadata: what the service and GET /model say about the version."""
    from registry.tracking import display_uri, tag_bool

    version = str(mv.version)
    return {
        "registered_model": registered_model,
        "mlflow_version": version,
        "mlflow_alias_at_import": alias,
        "mlflow_run_id": mv.run_id,
        "mlflow_source": mv.source,
        "tracking_uri": display_uri(tracking_uri),
        "val_accuracy": _float(mv.tags.get("val_accuracy", logged.get("val_accuracy"))),
        "test_accuracy": _float(mv.tags.get("test_accuracy", logged.get("test_accuracy"))),
        "preset": logged.get("preset") or mv.tags.get("preset"),
        "class_names": class_names,
        "mean": list(MEAN),
        "std": list(STD),
        "image_size": IMAGE_SIZE,
        "resize_filter": RESIZE_FILTER,
        "input_name": input_name,
        "onnx_file": "model.onnx",
        "served_tta": mv.tags.get("served_tta") or logged.get("served_tta"),
        "promotion_reason": mv.tags.get("promotion_reason"),
        "model_card": "model_card.md" if mv.description else None,
        **(
            {
                "int8_file": "model_int8.onnx",
                "int8_val_accuracy": _float(mv.tags.get("int8_val_accuracy")),
                "int8_test_accuracy": _float(mv.tags.get("int8_test_accuracy")),
                "int8_servable": mv.tags.get("int8_servable") == "true",
                # (None, dropped below: unknown, or a version from before it was recorded)
                "int8_judged_with_dot_product": tag_bool(
                    mv.tags.get("int8_judged_with_dot_product")
                ),
            }
            if has_int8
            else {}
        ),
    }


def _ood_reference(
    client: Any, mv: Any, dest: Path, engine: Any
) -> tuple[Path | None, dict[str, Any]]:
    """The version's out-of-distribution reference (run artifact `ood/ood_reference.json`),
    checked by scoring images with it; or, for a version registered without one, the note the
    service gives at GET /model (its answers then say `in_distribution: null`)."""
    import numpy as np
    from mlflow.exceptions import MlflowException

    from cifarlab.ood import OodReference
    from registry.run_logging import OOD_ARTIFACT

    if "ood_threshold" not in mv.tags:
        return None, {
            "ood_note": f"{mv.name} v{mv.version} was registered without an out-of-distribution "
            "reference (before this service scored images for it): answers carry "
            "in_distribution: null"
        }
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(client.download_artifacts(mv.run_id, OOD_ARTIFACT, str(dest)))
        ref = OodReference.from_json(path.read_text())
    except (MlflowException, OSError, ValueError, TypeError) as exc:
        raise ImportFailed(
            f"{mv.name} v{mv.version} has an out-of-distribution threshold, but {OOD_ARTIFACT} "
            f"of run {mv.run_id} cannot be used: {exc}"
        ) from None
    engine.ood = ref
    scores = engine.infer(
        np.random.default_rng(0).standard_normal((4, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    )[:, -1]
    if not np.isfinite(scores).all():
        raise ImportFailed(
            f"{mv.name} v{mv.version}: its out-of-distribution reference gives {scores}"
        )
    return path, {
        "ood_file": "ood_reference.json",
        "ood_threshold": ref.threshold,
        "ood_method": ref.method,
    }


def _int8_file(client: Any, mv: Any, dest: Path, class_names: list[str]) -> Path | None:
    """The version's int8 twin (run artifact `int8/model_int8.onnx`), loaded once to check it;
    None when the run built none."""
    from mlflow.exceptions import MlflowException

    from serving.engine import Engine

    if "int8_servable" not in mv.tags:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(client.download_artifacts(mv.run_id, "int8/model_int8.onnx", str(dest)))
    except (MlflowException, OSError) as exc:
        raise ImportFailed(
            f"{mv.name} v{mv.version} says it has an int8 model, but "
            f"int8/model_int8.onnx of run {mv.run_id} cannot be fetched: {exc}"
        ) from None
    Engine(path, {"class_names": class_names}, threads=1).warm_up((1,))
    return path


if __name__ == "__main__":  # python -m registry.import_champion: the command's old spelling
    from registry.serving_host import main

    sys.exit(main())
