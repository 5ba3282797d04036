"""The API reference: HTML pages generated from the docstrings with pdoc, and a check of their cross-references.

    python docs/api.py [OUTPUT_DIR]     (make docs: build/api/)

Every module of ``icons_hf`` gets a page (the evaluate metric scripts, loaded by path, are left out). Docstrings are
reStructuredText: a reference such as ``:func:`icons_hf.select``` or ``:meth:`Pool.write_subset``` becomes a link.
A reference that names nothing (a renamed or removed function) is reported and fails the build (``tests/test_docs.py``
runs the same check in ``make test``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`~?([A-Za-z_][\w.]*)`")
SKIPPED = ("icons_hf.metrics.",)  # evaluate metric scripts: loaded by path, not imported as modules


def public_modules() -> list[str]:
    """``icons_hf`` and every module under it, in name order."""
    import icons_hf

    names = ["icons_hf"] + [m.name for m in pkgutil.walk_packages(icons_hf.__path__, "icons_hf.")]
    return sorted(n for n in names if not n.startswith(SKIPPED))


def references(module_name: str) -> list[tuple[str, str]]:
    """``(context, target)`` of every role reference in the module's docstrings; ``context`` is the dotted name
    of the module, class or function whose docstring holds it."""
    path = Path(importlib.import_module(module_name).__file__)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node, context):
        doc = ast.get_docstring(node, clean=False) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                                          ast.AsyncFunctionDef)) else None
        found.extend((context, target) for target in ROLE.findall(doc or ""))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{context}.{child.name}")

    visit(tree, module_name)
    return found


def _lookup(dotted: str):
    """The object a dotted name names (importing its longest module prefix), or ``None``."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if inspect.isclass(obj) and attr in getattr(obj, "__annotations__", {}):
                obj = attr  # a field without a class-level value (a dataclass field)
            else:
                obj = inspect.getattr_static(obj, attr, None) if inspect.isclass(obj) else getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def resolves(context: str, target: str) -> bool:
    """Whether ``target`` names something from ``context``: as an absolute name, or relative to the enclosing
    classes and module of the docstring, or to the package."""
    scopes = context.split(".")
    candidates = [target] + [".".join(scopes[:cut] + [target]) for cut in range(len(scopes), 0, -1)]
    return any(_lookup(name) is not None for name in candidates)


def broken_references() -> list[str]:
    """``module: target`` for every reference that names nothing."""
    return [f"{context}: {target}" for module in public_modules() for context, target in references(module)
            if not resolves(context, target)]


def build(output_dir: str | Path) -> Path:
    """Writes the HTML reference into ``output_dir``; returns the path of its index page."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="restructuredtext", footer_text="icons_hf API reference")
    pdoc.pdoc(*public_modules(), output_directory=Path(output_dir))
    return Path(output_dir) / "index.html"


def main(argv: list[str]) -> int:
    output = Path(argv[0] if argv else "build/api")
    index = build(output)
    broken = broken_references()
    for line in broken:
        print(f"broken reference: {line}", file=sys.stderr)
    print(f"API reference: {index} ({len(public_modules())} modules, {len(broken)} broken references)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
