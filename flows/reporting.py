"""What a training run tells a person: the closing lines at the terminal and the summary
artifact in the Prefect UI."""

from __future__ import annotations

from typing import Any

from cifarlab.config import RunConfig
from flows import feedback_data
from registry import tracking


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def closing_line(
    config: RunConfig,
    s: dict[str, Any],
    store: tracking.Store,
    run_id: str,
    reg: Any,
    bento: dict[str, Any] | None,
) -> str:
    """What a person at the terminal wants at the end: how well, where to look, what next."""
    exp = store.experiment_id
    if store.uri.startswith(("http://", "https://")):
        where = f"{tracking.display_uri(store.uri)}/#/experiments/{exp}/runs/{run_id}"
    else:
        where = f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id} (after `make mlflow-ui`)"
    lines = [
        f"trained {config.preset} ({config.model.name}) in {s['train_seconds']:.0f} s: "
        f"validation {100 * s['val_accuracy']:.2f} %, test {100 * s['test_accuracy']:.2f} % "
        "(the served ONNX file)",
        f"MLflow run: {where}",
    ]
    if reg is not None:
        lines.append(f"registry: {reg.name} version {reg.version} is {reg.alias} ({reg.reason})")
    if bento is not None:
        lines.append(
            f"serve it: make serve, then curl -F image=@cat.png "
            f"http://127.0.0.1:3000/classify (BentoML model {bento['tag']})"
        )
    elif reg is not None and reg.alias == tracking.CHAMPION:
        lines.append("serve it: cifar-import-champion, then make serve")
    return "\n".join(lines)


def summary_markdown(
    config: RunConfig,
    summary: dict[str, Any],
    done: Any | None,
    store: tracking.Store,
    run_id: str,
    bento: dict[str, Any] | None = None,
) -> str:
    """The run's summary as a Prefect markdown artifact: accuracies of the served file,
    registry, BentoML store, per-class accuracy and the resolved config."""
    s = summary
    rows = "\n".join(
        f"| {k} | {100 * s['val_per_class_accuracy'][k]:.2f} % | {100 * v:.2f} % |"
        for k, v in s["test_per_class_accuracy"].items()
    )
    parity = s["parity"]
    reg = done.registration if done else None
    tta = (
        f"| unserved {s['tta']} TTA (reported only) | validation "
        f"{100 * s['tta_val_accuracy']:.2f} %, test {100 * s['tta_test_accuracy']:.2f} % |"
        if s["tta_val_accuracy"] is not None
        else None
    )
    lines = [
        f"# train-cifar: {config.preset} ({config.model.name})",
        "",
        "Accuracies are those of the exported ONNX model, the file the endpoint serves "
        f"(TTA in its graph: {s['served_tta']}).",
        "",
        "| | |",
        "|---|---|",
        f"| validation accuracy | **{100 * s['val_accuracy']:.2f} %** ({s['val_images']} images) |",
        f"| test accuracy (reported, not used to choose) | {100 * s['test_accuracy']:.2f} % |",
        *([tta] if tta else []),
        f"| epochs / training time | {s['epochs_completed']} / {s['train_seconds']:.1f} s on {s['device']} |",
        f"| ONNX parity | max abs diff {parity['max_abs_diff']:.2e}, same class "
        f"{100 * parity['argmax_agreement']:.2f} % |",
        f"| registry | {reg.name} v{reg.version} -> `{reg.alias}`: {reg.reason} |"
        if reg
        else "| registry | not registered |",
        f"| BentoML store | `{bento['tag']}` (v{bento['version']}, the champion) |"
        if bento
        else "| BentoML store | not updated |",
        f"| MLflow | run `{run_id}` in `{tracking.display_uri(store.uri)}` |",
        f"| split | `{s['split_sha256'][:16]}` ({s['trained_on']}) |",
        *([f"| feedback | {feedback_data.summary_line(s)} |"] if s.get("learns_from") else []),
        "",
        "## Per-class accuracy",
        "",
        "| class | validation | test |",
        "|---|---|---|",
        rows,
        "",
        "## Config",
        "",
        "```json",
        config.model_dump_json(indent=2),
        "```",
    ]
    return "\n".join(lines)
