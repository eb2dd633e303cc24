"""The floors of the code and the one direction their imports go, read from the source
with ``ast`` (nothing is imported): a module may import its own floor and any lower
one, never a higher one.

    shared < store < data < model < governance < scoring < flows

- shared: ``tasks.settings``, ``tasks.runtime`` (and the ``tasks`` package itself):
  they import nothing of tasks/;
- store: ``tasks.store`` (the object stores, the lake's layout, the work claims), and
  beside it, by what they import (the store and nothing higher), ``tasks.reports``
  (Prefect artifacts, plots) and ``tasks.deploy`` (pools, schedules, the local UI);
- data, model, governance, scoring: their packages under tasks/; flows: ``flows``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDER = ["shared", "store", "data", "model", "governance", "scoring", "flows"]
FLOORS = {
    "tasks": "shared",
    "tasks.settings": "shared",
    "tasks.runtime": "shared",
    "tasks.store": "store",
    "tasks.reports": "store",
    "tasks.deploy": "store",
    "tasks.data": "data",
    "tasks.model": "model",
    "tasks.governance": "governance",
    "tasks.scoring": "scoring",
    "flows": "flows",
}
# (importer, imported) pairs allowed to climb, each with its reason. None today.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def floor_of(module: str) -> str | None:
    """The floor of the longest FLOORS name that ``module`` is or lies under."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    where = REPO.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def imported(module: str, source: str, package: bool = False) -> set[str]:
    """The modules of tasks/ and flows/ that ``source`` (of ``module``) imports, at its
    top or inside functions: ``from tasks.x import y`` names tasks.x.y when y is a
    module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                here = module.split(".")[: len(module.split(".")) - node.level + package]
                base = ".".join(here + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")}
    return {m for m in found if floor_of(m) is not None}


def climbs(module: str, source: str, package: bool = False) -> list[str]:
    """Each import of ``source`` that goes to a higher floor than ``module``'s."""
    mine = ORDER.index(floor_of(module))
    return [
        f"{module} ({floor_of(module)}) imports {target} ({floor_of(target)})"
        for target in sorted(imported(module, source, package))
        if ORDER.index(floor_of(target)) > mine and (module, target) not in EXCEPTIONS
    ]


def sources() -> list[Path]:
    return sorted([*(REPO / "tasks").rglob("*.py"), *(REPO / "flows").rglob("*.py")])


def test_every_module_has_a_floor():
    homeless = [module_name(p) for p in sources() if floor_of(module_name(p)) is None]
    assert not homeless, f"give these a floor in tests/test_floors.py FLOORS: {homeless}"


def test_imports_never_climb_a_floor():
    found = [
        line
        for path in sources()
        for line in climbs(module_name(path), path.read_text(), path.name == "__init__.py")
    ]
    assert not found, (
        "a module imports a higher floor (" + " < ".join(ORDER) + "); move the code it "
        "needs down, or pass it in from above:\n" + "\n".join(found)
    )


def test_the_check_sees_a_climb():
    """What the check reads: a model module reaching up into scoring, at the top or
    inside a function, is caught; the same import from scoring is not."""
    top = "from tasks.scoring.ledger import ScoreOptions\n"
    inner = "def f():\n    from tasks.scoring import ledger\n"
    assert climbs("tasks.model.features", top) == [
        "tasks.model.features (model) imports tasks.scoring.ledger (scoring)"
    ]
    assert "tasks.scoring.ledger" in " ".join(climbs("tasks.model.features", inner))
    assert climbs("tasks.scoring.shard", top) == []
    assert climbs("tasks.store.claims", "from ..scoring import ledger\n") != []


def test_exceptions_are_still_needed():
    for module, target in EXCEPTIONS:
        path = REPO.joinpath(*module.split(".")).with_suffix(".py")
        assert target in imported(module, path.read_text()), f"drop the exception {module}"
