"""pyproject.toml's requirements by extra, and the third-party modules a source tree imports."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN_PACKAGES = {"translator", "training", "tests", "benchmarks", "__future__"}


def requirements(*extras: str) -> set[str]:
    """Canonical distribution names of the base install plus `extras`, following `nmt-translator[x]`."""
    names, todo, done = set(), [None, *extras], set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
        for req in map(Requirement, lines):
            if canonicalize_name(req.name) == canonicalize_name(PROJECT["name"]):
                todo += sorted(req.extras)
            else:
                names.add(canonicalize_name(req.name))
    return names


@functools.cache
def installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    """Canonical names of the installed distributions that provide top-level `module`; for a module
    not installed here (an extra left out), the distribution of the same name."""
    return {canonicalize_name(d) for d in installed().get(module, [module])}


def closure(names: set[str]) -> set[str]:
    """`names` and, recursively, the installed distributions they require (no extras)."""
    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        try:
            lines = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in map(Requirement, lines):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return out


def runtime_imports(tree: ast.AST) -> set[str]:
    """Top-level modules `tree` imports here, at module level or in functions: the `if TYPE_CHECKING:`
    body and the branch of an `if sys.version_info ...:` that this Python skips are left out."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and (branch := taken_branch(node.test)) is not None:
            found = found.union(*(runtime_imports(n) for n in (node.body if branch else node.orelse)))
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        found |= runtime_imports(node)
    return found


def taken_branch(test: ast.expr) -> bool | None:
    """Whether this interpreter takes an `if` on TYPE_CHECKING or sys.version_info; None for other tests."""
    text = ast.unparse(test)
    if text.endswith("TYPE_CHECKING"):
        return False
    return bool(eval(text, {"sys": sys})) if text.startswith("sys.version_info") else None


def third_party(path: Path) -> set[str]:
    """The third-party top-level modules one source file imports."""
    modules = runtime_imports(ast.parse(path.read_text()))
    return {m for m in modules if m not in sys.stdlib_module_names and m not in OWN_PACKAGES}


def following_translator(entry: Path) -> set[str]:
    """Third-party top-level modules `entry` can import, following its imports of the translator package."""
    seen, todo, found = set(), [entry], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        found |= third_party(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                module = ROOT / (name.replace(".", "/") + ".py")
                if name.split(".")[0] == "translator" and module.exists():
                    todo.append(module)
    return found
