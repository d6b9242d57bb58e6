"""Every import inside fgdist runs down fgdist.LAYERS, never up: a module imports only from its own
package, the packages below it and the top-level foundation (imports inside functions included)."""

import ast
from pathlib import Path

import fgdist
from tests.helpers import REPO

PACKAGE = REPO / "fgdist"


def layer(module: str) -> int:
    """0 for the foundation (top-level modules), then 1, 2, ... in the order of fgdist.LAYERS."""
    parts = module.split(".")
    if parts == ["fgdist"]:  # the package's face (load_model) sits above everything
        return len(fgdist.LAYERS)
    name = parts[1]
    return fgdist.LAYERS.index(name) + 1 if name in fgdist.LAYERS else 0


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every fgdist module `path` imports; `from fgdist import x` names
    fgdist.x when x is a module or package, else the package itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fgdist"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "fgdist":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (REPO / (sub.replace(".", "/") + ".py")).is_file() or (
                    REPO / sub.replace(".", "/")
                ).is_dir()
                found.append((node.lineno, sub if is_module else node.module))
    return found


def upward(path: Path, here: str) -> list[str]:
    """The imports of `path`, read as the module `here`, that reach a layer above it."""
    return [
        f"{here}:{line} imports {target}, a layer above it"
        for line, target in imported(path)
        if layer(target) > layer(here)
    ]


def test_no_module_imports_from_a_package_above_it():
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in upward(path, module_name(path))]
    assert problems == []


def test_every_subpackage_is_in_the_table():
    """A new package must be given its place: otherwise it would count as the foundation."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")} | {"harness"}
    assert packages == set(fgdist.LAYERS)


def test_the_check_sees_an_upward_import_inside_a_function(tmp_path):
    """The trainer importing export to publish the model, as it did before the layers."""
    probe = tmp_path / "probe.py"
    probe.write_text("def publish():\n    from fgdist.retrieval import export\n    from fgdist.data import loader\n")
    assert upward(probe, "fgdist.training.trainer") == [
        "fgdist.training.trainer:2 imports fgdist.retrieval.export, a layer above it"
    ]
    assert upward(probe, "fgdist.retrieval.search") == []
