"""The documentation stays true to the code and the measurements."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_tables():
    spec = importlib.util.spec_from_file_location(
        "make_tables", ROOT / "benchmarks" / "make_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_tables_are_what_the_script_writes_from_the_results():
    tables = _make_tables()
    doc = tables.DOC.read_text()
    assert doc == tables.render(doc), "run `make docs-tables` (benchmarks/make_tables.py)"
    # Every result file has its section, with figures taken from it.
    for path in sorted(tables.RESULTS.glob("*.json")):
        assert f"### `{path.relative_to(ROOT)}`" in doc


def test_the_readme_is_one_screen_and_points_at_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make run" in readme and "make test" in readme and "```mermaid" in readme
    for page in ("architecture", "benchmarks", "testing"):
        assert f"docs/{page}.md" in readme and (ROOT / "docs" / f"{page}.md").is_file()
