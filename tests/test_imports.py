"""One direction between the model and its kernels: egmla.model imports egmla.kernels, and no module of
egmla.kernels imports anything of egmla outside it (egmla.model above all), at module level or inside a
function. Read statically from the sources with ast, so that a lazy import cannot hide."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of the modules a source imports anywhere in it (`from X import y` counts X and X.y: y may
    be a submodule); `module` is the source's own dotted name, for relative imports."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(
                [*package[: len(package) - node.level + 1], node.module or ""] if node.level else [node.module]
            ).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports_of(path: Path) -> set[str]:
    parts = path.relative_to(SRC).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return imported(path.read_text(), ".".join(parts[:-1] if is_package else parts), is_package)


def outside(names: set[str], prefix: str) -> set[str]:
    """Names of egmla modules not under `prefix`."""
    return {n for n in names if (n == "egmla" or n.startswith("egmla.")) and not (n + ".").startswith(prefix + ".")}


def test_kernels_import_nothing_of_egmla_outside_them():
    files = sorted((SRC / "egmla/kernels").rglob("*.py"))
    assert len(files) >= 4
    for path in files:
        assert not outside(imports_of(path), "egmla.kernels"), path


def test_the_model_imports_the_kernels():
    """The allowed direction, which also shows that relative imports are resolved."""
    assert "egmla.kernels" in imports_of(SRC / "egmla/model/attention.py")
    assert "egmla.kernels.gated_expand" in imports_of(SRC / "egmla/model/attention.py")  # inside a method


def test_the_check_sees_function_local_and_relative_imports():
    lazy = "import torch\ndef f():\n    from ..model.config import is_power_of_two\n    return is_power_of_two\n"
    assert outside(imported(lazy, "egmla.kernels.egmla_decode"), "egmla.kernels") == {
        "egmla.model.config",
        "egmla.model.config.is_power_of_two",
    }
    assert outside(imported("from .. import model", "egmla.kernels", is_package=True), "egmla.kernels") == {
        "egmla",
        "egmla.model",
    }
    assert outside(imported("import egmla.model.attention", "egmla.kernels.x"), "egmla.kernels") == {
        "egmla.model.attention"
    }
    assert not outside(
        imported("from . import reference\nfrom .reference import activate", "egmla.kernels", is_package=True),
        "egmla.kernels",
    )
