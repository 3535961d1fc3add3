"""Layers point downward: the demo is an application of training and evaluation, nothing below imports it.

Every module of the package outside ``dsvl2/demo`` is parsed (imports anywhere in the file, also inside
functions) and relative imports are resolved against the module's own package, so ``from .demo import x``
in ``dsvl2/cli.py`` counts and ``from .demo import x`` in ``dsvl2/evaluation/tasks/`` (the evaluation
task of the same name) does not.
"""

import ast
from pathlib import Path

import dsvl2

ROOT = Path(dsvl2.__file__).resolve().parent


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, a module of ``package``; a
    ``from X import name`` also yields ``X.name`` (``from . import demo`` imports a module)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[:len(parts) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).parts[:-1])


def is_demo(name: str) -> bool:
    return name == "dsvl2.demo" or name.startswith("dsvl2.demo.")


def test_import_resolution_sees_relative_and_absolute_demo_imports():
    src = "from .demo import default_model_dir\nimport dsvl2.demo.build\nfrom . import demo\nfrom .assets import X\n"
    names = [n for _, n in imported_modules(src, "dsvl2")]  # as if in dsvl2/cli.py
    assert names == ["dsvl2.demo", "dsvl2.demo.default_model_dir", "dsvl2.demo.build", "dsvl2", "dsvl2.demo",
                     "dsvl2.assets", "dsvl2.assets.X"]
    assert [is_demo(n) for n in names] == [True, True, True, False, True, False, False]
    deep = [n for _, n in imported_modules("from .demo import KINDS\nfrom ..demo import x\n", "dsvl2.evaluation.tasks")]
    assert deep[0] == "dsvl2.evaluation.tasks.demo" and deep[2] == "dsvl2.evaluation.demo"
    assert not any(is_demo(n) for n in deep)  # the evaluation task named demo is not the demo application
    assert package_of(ROOT / "evaluation" / "tasks" / "demo.py") == "dsvl2.evaluation.tasks"


def test_nothing_outside_the_demo_imports_it():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if (ROOT / "demo") in path.parents:
            continue
        offenders += [f"{path.relative_to(ROOT.parent)}:{line}: {name}"
                      for line, name in imported_modules(path.read_text(), package_of(path)) if is_demo(name)]
    assert not offenders, "lower layers import the demo application:\n" + "\n".join(offenders)
