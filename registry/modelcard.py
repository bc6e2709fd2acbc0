"""The model card of a registered version: what it is, what it was trained and measured on, and
what it is not for. Built from what the run recorded in MLflow (params, metrics, tags), so a card
says only what the tracking store can back; it becomes the version's description and the run's
artifact `model_card.md`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from cifarlab.constants import CLASS_NAMES, IMAGE_SIZE, MEAN, STD

CARD_FILE = "model_card.md"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _config(params: Mapping[str, str]) -> dict[str, Any]:
    """Flattened MLflow params back into the nested resolved config."""
    out: dict[str, Any] = {}
    for key, value in sorted(params.items()):
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _masked(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with credentials masked in its data source."""
    from registry.tracking import display_uri

    out = json.loads(json.dumps(config, default=str))
    data = out.get("data") or {}
    if isinstance(data.get("source"), str):
        data["source"] = display_uri(data["source"])
    return out


def model_card(
    run: Any,
    *,
    name: str,
    version: str,
    alias: str,
    verdict: str,
    extra: Sequence[tuple[str, str]] = (),
    config: Mapping[str, Any] | None = None,
) -> str:
    """Markdown card for registry version `version` of `name`, trained by MLflow run `run`;
    `config` is its resolved config (else rebuilt from the run's params, as strings)."""
    p, m = run.data.params, run.data.metrics
    config = config or _config({k: v for k, v in p.items() if "." in k})
    per_class = "\n".join(
        f"| {c} | {_pct(m.get(f'val_accuracy.{c}'))} | {_pct(m.get(f'test_accuracy.{c}'))} |"
        for c in CLASS_NAMES
    )
    rows = [
        ("registry", f"`{name}` version {version}; alias at registration `{alias}`"),
        ("promotion", verdict),
        *_facts(run, config),
        *extra,
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return _CARD.format(
        name=name,
        version=version,
        table=table,
        per_class=per_class,
        config=json.dumps(_masked(config), indent=2),
    )


def _facts(run: Any, config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The card's table rows about the run: model, accuracies, parity, speed, data, training."""
    from registry.tracking import display_uri

    p, m, t = run.data.params, run.data.metrics, run.data.tags
    options = json.dumps((config.get("model") or {}).get("options") or {})
    served_tta = t.get("served_tta", "none")  # set by the evaluate task
    tta_row = (
        (f"unserved TTA ({p.get('train.tta')}), reported only",
         f"validation {_pct(m.get('tta_val_accuracy'))}, test {_pct(m.get('tta_test_accuracy'))}")
        if "tta_val_accuracy" in m else None
    )  # fmt: skip
    return [
        (
            "preset / architecture",
            f"`{p.get('preset')}` / `{p.get('model.name')}`, options `{options}`",
        ),
        (
            "validation accuracy (served ONNX model)",
            f"**{_pct(m.get('final_val_accuracy'))}** on {p.get('data.val_size')} images",
        ),
        ("test accuracy (served ONNX model, reported only)", _pct(m.get("test_accuracy"))),
        *([tta_row] if tta_row else []),
        ("test-time augmentation in the served graph", served_tta),
        ("out-of-distribution threshold", _ood_fact(t)),
        (
            "ONNX parity with PyTorch",
            f"max abs logit diff {m.get('onnx_max_abs_diff', float('nan')):.2e}, "
            f"same class on {_pct(m.get('onnx_argmax_agreement'))} of the parity images",
        ),
        (
            "onnxruntime latency (CPU)",
            f"{m.get('onnx_latency_ms_batch1', float('nan')):.2f} ms at batch 1, "
            f"{m.get('onnx_latency_ms_batch256', float('nan')):.1f} ms at batch 256",
        ),
        (
            "data",
            f"source `{display_uri(p.get('data.source') or '-')}`, fingerprint "
            f"`{t.get('data_fingerprint', '-')}`",
        ),
        (
            "split",
            f"{p.get('data.train_size')} train / {p.get('data.val_size')} validation of "
            f"the 50,000 training images, seed {p.get('data.split_seed')}, sha256 "
            f"`{t.get('split_sha256', '-')}`; the 10,000 official test images",
        ),
        (
            "training",
            f"{int(m.get('epochs_completed', 0))} epochs, "
            f"{m.get('train_seconds', float('nan')):.1f} s on {t.get('device', '-')}, "
            f"seed {p.get('train.seed')}",
        ),
        ("code", f"git `{t.get('code_version', 'unknown')}`"),
        ("MLflow run", f"`{run.info.run_id}`"),
    ]


def _ood_fact(tags: Mapping[str, str]) -> str:
    if "ood_threshold" not in tags:
        return "none recorded: answers say `in_distribution: null`"
    return (
        f'`ood_score` > {float(tags["ood_threshold"]):.3f}: "not a CIFAR-10 image" (keeps '
        f"95 % of the validation images in; {tags.get('ood_method')})"
    )


_CARD = f"""# {{name}} v{{version}}

A CIFAR-10 image classifier exported to ONNX: normalised float32 input (N, 3, {IMAGE_SIZE}, \
{IMAGE_SIZE}) named `image`, `(pixel/255 - mean) / std` with mean {list(MEAN)} and std \
{list(STD)}; output `logits` (N, 10) over {", ".join(CLASS_NAMES)}.

| | |
|---|---|
{{table}}

## Per-class accuracy (served model)

| class | validation | test |
|---|---:|---:|
{{per_class}}

## Intended use and limits

- For 32x32 colour photographs of the ten CIFAR-10 classes, centred and at CIFAR-10's scale.
  The endpoint shrinks larger uploads (central square, bicubic) to 32x32; fine detail is lost.
- Anything else is out of domain and still gets one of the ten labels, often with a high
  probability: the model has no "none of these" answer. Do not read the probability as a
  measure of whether the image belongs to CIFAR-10; the answer's `in_distribution` (from
  `ood_score` and the threshold above) is the service's guess at that, and it misses some.
- Accuracies were measured on CIFAR-10's own validation and test images; photos from other
  cameras, crops or lighting will do worse. Per-class accuracy differs (table above).
- Not for decisions about people, safety or anything with consequences: a teaching and
  benchmarking model.

## Resolved config

```json
{{config}}
```
"""


DESCRIPTION_LIMIT = 5000  # MLflow's description column (VARCHAR(5000) on PostgreSQL/MySQL)


def registry_description(card: str) -> str:
    """The card as a registry version's description: without the resolved config (that stays
    in the run's model_card.md), within the registry's column size."""
    head = card.split("\n## Resolved config", 1)[0].rstrip()
    note = f"\n\n(The resolved config is in the run's artifact `{CARD_FILE}`.)\n"
    if len(head) + len(note) > DESCRIPTION_LIMIT:
        head = head[: DESCRIPTION_LIMIT - len(note) - 4] + " ..."
    return head + note
