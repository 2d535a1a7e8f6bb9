"""Every third-party module the code and the tests import is declared in pyproject.toml (any extra, or a
requirement of a declared package, transitively). A module that resolves only because it was installed by
hand breaks on a fresh machine; CI's fresh venv would catch it late, this catches it in one second."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement

from tests.conftest import REPO

SCANNED = ("scgpt_dist", "data_ingest", "jobs", "tests")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    """The project's requirements (all extras) and theirs, transitively, honouring requested extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    todo = [Requirement(r) for r in reqs if _norm(Requirement(r).name) != _norm(project["name"])]
    declared, seen = set(), set()
    while todo:
        req = todo.pop()
        key = (_norm(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        declared.add(_norm(req.name))
        try:
            subs = [Requirement(x) for x in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            continue
        envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
        todo += [s for s in subs if s.marker is None or any(s.marker.evaluate(e) for e in envs)]
    return declared


def imported_modules() -> dict[str, str]:
    """Top-level absolute imports outside the standard library and this repository: module -> first use."""
    local = set(SCANNED) | {"conftest"}
    found: dict[str, str] = {}
    for pkg in SCANNED:
        for path in sorted((REPO / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top == "__future__":
                        continue
                    found.setdefault(top, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_import_is_declared():
    declared = declared_distributions()
    providers = metadata.packages_distributions()
    undeclared = {}
    for module, where in imported_modules().items():
        dists = {_norm(d) for d in providers.get(module, [])} or {_norm(module)}
        if not dists & declared:
            undeclared[module] = where
    assert not undeclared, (
        f"imports no pyproject.toml extra declares (module: first use): {undeclared}"
    )


def test_the_scan_finds_imports_and_extras():
    """The scan itself works: imports from the package and the tests are found, and every extra is walked
    (torch is core, moto is in `test`, tiledbsoma-ml in `bench`, both reached through `dev`)."""
    modules = imported_modules()
    assert "pytest" in modules and "torch" in modules and "moto" in modules
    assert {"pytest", "torch", "moto", "tiledbsoma-ml"} <= declared_distributions()
