"""The import graph is a stack: a module imports only from its own layer or the layers below.

    base (errors, atomic, privacy, figures, version) -> io -> preprocessing / data / datasets /
    synthetic -> models -> scoring -> methods -> runs -> training -> evaluation / inference / export / sharding -> cli

``scoring`` sits below ``methods`` because each method builds its scorer from the shared scorers
(one module per method); ``runs`` between ``methods`` (a run is rebuilt by its method) and
``training`` (which writes runs). Function-level imports count: a lazy import upward is still a tangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "medclf"
LAYERS = [
    {"errors", "atomic", "privacy", "figures", "__init__"},
    {"io"},
    {"preprocessing", "data", "datasets", "synthetic"},
    {"models"},
    {"scoring"},
    {"methods"},
    {"runs"},
    {"training"},
    {"evaluation", "inference", "export", "sharding"},
    {"cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: no layer for medclf.{top} (add it to LAYERS in this test and the README)")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("medclf"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if (PKG / node.module.removeprefix("medclf").lstrip(".").replace(".", "/") / a.name).with_suffix(".py").exists()}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("medclf")}
    return out


def test_no_module_imports_upward():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        mod = "medclf." + ".".join(path.relative_to(PKG).with_suffix("").parts)
        mod = mod.removesuffix(".__init__")
        mine = _layer(mod if mod != "medclf" else "medclf")
        for imp in _imports(path):
            if imp != "medclf" and _layer(imp) > mine:
                upward.append(f"{mod} (layer {mine}) imports {imp} (layer {_layer(imp)})")
    assert not upward, "\n".join(upward)


def test_the_test_sees_an_upward_import(tmp_path):
    """The checker itself can fail: a lazy import of training from models is caught."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from medclf.training.loop import train\n")
    assert _layer("medclf.models.backbone") < max(_layer(i) for i in _imports(f))
