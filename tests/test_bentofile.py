"""bentofile.yaml packs what the service imports: a module left out builds fine and fails only
when the built Bento (or its container) starts."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("serving", "cifarlab")


def _module_file(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from serving import schemas`: a module of the package, where there is one
            names |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if _module_file(f"{node.module}.{a.name}").is_file()
            }
    return {n for n in names if n.split(".")[0] in PROJECT}


def _needed_files(entry: str) -> set[Path]:
    """Every project file the module `entry` imports, at any depth, with its packages."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages above
        todo += sorted(_project_imports(_module_file(name)))
    return {_module_file(n).relative_to(ROOT) for n in seen}


def test_the_bento_includes_every_module_the_service_imports_and_nothing_missing():
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    patterns = spec["include"]
    service_module = spec["service"].split(":")[0]
    needed = _needed_files(service_module)
    assert Path("cifarlab/cpu.py") in needed  # (serving/live.py imports it)
    left_out = sorted(
        str(f) for f in needed if not any(fnmatch.fnmatch(str(f), pat) for pat in patterns)
    )
    assert not left_out, f"bentofile.yaml does not include {left_out}"
    stale = [pat for pat in patterns if not list(ROOT.glob(pat))]
    assert not stale, f"bentofile.yaml includes files that do not exist: {stale}"
