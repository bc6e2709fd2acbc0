"""`cifar-train`: train a preset from the command line, with a progress bar, and print the results.

cifar-train --preset seed-baseline --set train.epochs=4 --set data.train_size=36000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cifarlab.config import DEFAULT_PRESET, preset, preset_names


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`section.field=value` strings -> nested dict; values parse as JSON, else stay strings."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("data", "model", "train"):
            raise ValueError(f"override {item!r} must look like data.X=V, model.X=V or train.X=V")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = out.setdefault(section, {})
        if section == "model" and name.startswith("options."):
            target.setdefault("options", {})[name.removeprefix("options.")] = value
        else:
            target[name] = value
    return out


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar-train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"one of {', '.join(preset_names())} (default {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field (repeatable)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="folder for data/, splits/ and runs/ (default: current folder)",
    )
    parser.add_argument(
        "--source",
        help="CIFAR-10 source: URL, archive or extracted folder "
        "(default: $CIFAR10_SOURCE, else the official URL)",
    )
    parser.add_argument(
        "--show-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `cifar-train`."""
    args = _parser().parse_args(argv)

    try:
        overrides = parse_overrides(args.overrides)
        if args.source:
            overrides.setdefault("data", {})["source"] = args.source
        config = preset(args.preset, **overrides)
    except ValidationError as exc:
        print(f"cifar-train: invalid config: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"cifar-train: {exc}", file=sys.stderr)
        return 2
    if args.show_config:
        print(config.model_dump_json(indent=2))
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm  # heavy imports only once the config is known to be valid

    from cifarlab.data import DataError
    from cifarlab.experiment import run_experiment

    bar = None if args.quiet else tqdm(total=None, unit="step", dynamic_ncols=True)

    def progress(step: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = step
            bar.refresh()

    def on_epoch(m, _model) -> None:
        val = m.val_subset_note(config.data.val_size)
        line = (
            f"epoch {m.epoch}: train loss {m.train_loss:.3f} acc {100 * m.train_accuracy:.2f}%"
            f" | val{val} loss {m.val_loss:.3f} acc {100 * m.val_accuracy:.2f}%"
            f" | {m.epoch_seconds:.1f} s, {m.images_per_second:.0f} img/s"
        )
        (bar.write if bar is not None else print)(line)

    try:
        outcome = run_experiment(config, args.root, hooks=[on_epoch], progress=progress)
    except (DataError, ValueError) as exc:
        print(f"cifar-train: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    _print_summary(outcome.summary())
    print(f"results, plots, model.onnx and checkpoint: {outcome.run_dir}")
    return 0


def _print_summary(s: dict) -> None:
    print(
        f"preset {s['preset']} ({s['model']}) on {s['device']}: "
        f"{s['epochs_completed']} epochs in {s['train_seconds']:.1f} s of training"
    )
    print(
        f"validation accuracy {100 * s['val_accuracy']:.2f}%   "
        f"test accuracy {100 * s['test_accuracy']:.2f}%   (the exported ONNX model, "
        f"TTA in it: {s['served_tta']})"
    )
    if s["tta_val_accuracy"] is not None:
        print(
            f"with {s['tta']} TTA (not in the exported model): validation "
            f"{100 * s['tta_val_accuracy']:.2f}%, test {100 * s['tta_test_accuracy']:.2f}%"
        )
    print(
        "per-class test accuracy: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["test_per_class_accuracy"].items())
    )


if __name__ == "__main__":
    sys.exit(main())
