"""The tables of docs/benchmarks.md, generated from benchmarks/results/*.json.

    python benchmarks/make_tables.py          # rewrite the generated part of docs/benchmarks.md
    python benchmarks/make_tables.py --check  # exit 1 if the committed file differs

One section per result file, in file-name order: the command that wrote it, the machine and
date it records, and a table of its figures (numbers and short strings, nested keys dotted;
lists of per-run records are left to the JSON). Nothing is typed in by hand, so a figure in the
docs is always the one its JSON holds; tests/test_docs.py fails when the committed file is not
what this script writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- generated tables below: python benchmarks/make_tables.py -->"
END = "<!-- end of generated tables -->"
MAX_ROWS = 40  # a file with more figures than this shows its first ones and says so
CONTEXT_KEYS = ("command", "cpu", "cpu_model", "machine", "date", "code_version")


def _figures(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) for every number, bool or short string under `value`."""
    out: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _figures(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, bool) or value is None:
        out.append((prefix, str(value).lower() if value is not None else "-"))
    elif isinstance(value, (int, float)):
        out.append((prefix, f"{value:g}" if isinstance(value, float) else str(value)))
    elif isinstance(value, str) and len(value) <= 80:
        out.append((prefix, value.replace("|", "\\|")))
    elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        out.append((prefix, ", ".join(f"{v:g}" for v in value[:12])))
    return out


def ood_tables(data: dict[str, Any]) -> list[str]:
    """ood.json: per net, AUROC and FPR at 95 % TPR per set for ood_score and for MSP."""
    lines = []
    for name, net in data.get("nets", {}).items():
        lines += [
            "",
            f"**{name}** ({net['epochs']} epochs, test accuracy {net['test_accuracy']:.4f}; "
            f"threshold {net['threshold']:.3f} keeps {net['test_kept']:.3f} of the test set)",
            "",
            "| set | images | ood_score AUROC | FPR@95TPR | MSP AUROC | FPR@95TPR |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for set_name, row in {"**union**": net["union"], **net["sets"]}.items():
            o, m = row["ood_score"], row["msp"]
            lines.append(
                f"| {set_name} | {row['images']} | {o['auroc']:.3f} | {o['fpr_at_95tpr']:.3f} "
                f"| {m['auroc']:.3f} | {m['fpr_at_95tpr']:.3f} |"
            )
        lines += ["", "| mild change of CIFAR-10 images | flagged by ood_score | by MSP |",
                  "|---|---:|---:|"]  # fmt: skip
        for set_name, row in net["benign_flagged"].items():
            lines.append(f"| {set_name} | {row['ood_score']:.3f} | {row['msp']:.3f} |")
    return lines


def drift_tables(data: dict[str, Any]) -> list[str]:
    """drift.json: per condition, windows flagged against the target and what fired."""
    model = data.get("model", {})
    lines = [
        "",
        f"{model.get('preset')} ({model.get('epochs')} epochs, validation accuracy "
        f"{model.get('val_accuracy', float('nan')):.4f}); {data.get('windows')} windows of "
        f"{data.get('window')} images per condition, alpha {data.get('alpha')}; "
        f"{data.get('method', '')}",
        "",
        "| condition | windows flagged | target | met | by model outputs | by image statistics "
        "| tests fired per window | median min adjusted p | most significant test "
        "| mean OOD rate | images/s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, c in data.get("conditions", {}).items():
        top, times = max(c["most_significant_test"].items(), key=lambda kv: kv[1])
        lines.append(
            f"| {name} | {c['flagged']}/{data.get('windows')} | {c['target']} "
            f"| {'yes' if c['meets_target'] else '**no**'} | {c['flagged_by']['model_outputs']} "
            f"| {c['flagged_by']['image_statistics']} | {c['mean_tests_fired']:.1f} of "
            f"{c['tests']} | {c['median_min_p_corrected']:.2g} | {top} ({times}) "
            f"| {c['mean_ood_rate']:.3f} | {c['images_per_s']:.0f} |"
        )
    return lines


# files whose figures read better as their own tables
TABLES = {"ood.json": ood_tables, "drift.json": drift_tables}


def section(path: Path) -> str:
    """The Markdown of one result file."""
    data = json.loads(path.read_text())
    lines = [f"### `{path.relative_to(ROOT)}`", ""]
    if isinstance(data, dict) and path.name in TABLES:
        for key in CONTEXT_KEYS:
            if isinstance(data.get(key), str):
                lines.append(f"- {key}: `{data[key]}`")
        machine = data.get("machine") or {}
        if isinstance(machine, dict) and machine.get("cpu_model"):
            lines.append(f"- machine: `{machine['cpu_model']}`, {machine.get('cpus')} CPUs")
        lines.append(f"- created: `{data.get('created', '-')}`")
        return "\n".join([*lines, *TABLES[path.name](data), ""])
    if not isinstance(data, dict):
        return "\n".join([*lines, f"(a JSON {type(data).__name__}: see the file)", ""])
    for key in CONTEXT_KEYS:
        if isinstance(data.get(key), str):
            lines.append(f"- {key}: `{data[key]}`")
    rows = [(k, v) for k, v in _figures({k: v for k, v in data.items() if k not in CONTEXT_KEYS})]
    if rows:
        lines += ["", "| figure | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in rows[:MAX_ROWS]]
        if len(rows) > MAX_ROWS:
            lines.append(f"| ({len(rows) - MAX_ROWS} more in the file) | |")
    return "\n".join([*lines, ""])


def generated() -> str:
    """Every result file's section, in file-name order."""
    return "\n".join(section(p) for p in sorted(RESULTS.glob("*.json")))


def render(doc: str) -> str:
    """`doc` with the part between the markers replaced by the generated tables."""
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{generated()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is not current")
    args = parser.parse_args()
    doc = DOC.read_text()
    new = render(doc)
    if args.check:
        if new != doc:
            print(f"{DOC} differs from what benchmarks/make_tables.py writes", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {DOC} ({len(sorted(RESULTS.glob('*.json')))} result files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
