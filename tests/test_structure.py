"""The tree stays the diagram: no import cycle, no crowded folder, heavy libraries in their rooms.

Every module under the project's code roots is parsed with ``ast`` (nothing is imported), and every
import counts, including those inside functions: a lower module that imports a higher one only when
called still makes a cycle (CONVENTIONS.md, "Layers point one way"). This is the check that
``../shared/tools/structure.py`` prints, kept in the suite so that a clone without ``shared/`` keeps it too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("integration", "inference", "knowledge", "viewer", "schemas")
MAX_MODULES_PER_FOLDER = 16

# Third-party libraries that are slow to import or large, and the folders that may import them (README,
# "Heavy libraries stay in their rooms"). torch is also knowledge/'s: the LLM runs on transformers, which
# runs on torch; monai stays with the imaging model.
ROOMS: dict[str, tuple[str, ...]] = {
    "torch": ("inference/", "knowledge/"),
    "monai": ("inference/",),
    "chromadb": ("knowledge/", "inference/clinical/"),
    "transformers": ("knowledge/", "inference/clinical/"),
    "sentence_transformers": ("knowledge/", "inference/clinical/"),
    "streamlit": ("viewer/",),
}


@dataclass
class Tree:
    """What the imports of a source tree say: the project's modules and who imports what."""

    modules: dict[str, Path]  # dotted name -> file ("a.b" for a/b/__init__.py)
    imports: dict[str, set[str]] = field(default_factory=dict)  # module -> project modules it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level third-party names


def scan(repo: Path, roots: Iterable[str] = ROOTS) -> Tree:
    """Parse every module under ``roots`` of ``repo`` and resolve its imports to the project's modules.

    ``import a.b``, ``from a.b import c`` (an edge to ``a.b`` and, where ``a.b.c`` is a module, to it) and
    relative imports (resolved against the module's package) count wherever they appear in the module.
    An import of a name that is not a module resolves to the nearest enclosing module (``a.b`` for
    ``from a.b import function``).
    """
    modules: dict[str, Path] = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            if any(part.startswith(".") or part == "node_modules" for part in path.relative_to(repo).parts):
                continue
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    tree = Tree(modules)
    tops = {name.split(".")[0] for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        external: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".") if package else []
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top not in tops:
                    if top and not (isinstance(node, ast.ImportFrom) and node.level):
                        external.add(top)
                    continue
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    imported.add(target)
        tree.imports[name] = imported
        tree.external[name] = external
    return tree


def import_cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle as one closed path of modules (first == last), one per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(imports):
        if start in index:
            continue
        # Tarjan's algorithm, iteratively (no recursion limit on a deep chain of imports)
        work = [(start, iter(sorted(imports.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(imports.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return [_closed_path(component, imports) for component in components]


def _closed_path(component: set[str], imports: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    first = min(component)
    came_from: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(imports.get(node, set()) & component):
                if succ == first:
                    path = [node]
                    while path[-1] != first:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), first]
                if succ not in came_from:
                    came_from[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {first} in {sorted(component)}")  # a component always has one


def crowded_folders(tree: Tree, repo: Path, limit: int = MAX_MODULES_PER_FOLDER) -> dict[str, int]:
    """Folders holding more than ``limit`` modules directly (``__init__.py`` not counted)."""
    per_folder: dict[str, int] = {}
    for path in tree.modules.values():
        if path.name != "__init__.py":
            folder = path.parent.relative_to(repo).as_posix()
            per_folder[folder] = per_folder.get(folder, 0) + 1
    return {folder: n for folder, n in sorted(per_folder.items()) if n > limit}


def out_of_room(tree: Tree, repo: Path, rooms: dict[str, tuple[str, ...]] = ROOMS) -> list[str]:
    """``file: library`` for each heavy library imported outside the folders that may import it."""
    found = []
    for name, libraries in sorted(tree.external.items()):
        where = tree.modules[name].relative_to(repo).as_posix()
        for library in sorted(libraries & rooms.keys()):
            if not where.startswith(rooms[library]):
                found.append(f"{where}: {library}")
    return found


# ---- the project ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> Tree:
    tree = scan(REPO)
    assert len(tree.modules) > 50 and all(any(m.startswith(r) for m in tree.modules) for r in ROOTS)
    return tree


def test_no_module_takes_part_in_an_import_cycle(project: Tree) -> None:
    cycles = import_cycles(project.imports)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_folder_holds_more_than_16_modules(project: Tree) -> None:
    assert crowded_folders(project, REPO) == {}, "make a package of what belongs together"


def test_heavy_libraries_are_imported_only_in_their_rooms(project: Tree) -> None:
    assert out_of_room(project, REPO) == [], f"allowed: {ROOMS}"


# Lower packages and the higher ones they must never import (CONVENTIONS.md, "Layers point one way"): the
# knowledge base, its generation and grounding serve the inference workers and the integration edges.
LOWER_LAYERS: dict[str, tuple[str, ...]] = {
    "knowledge": ("inference", "integration", "viewer"),
    "schemas": ("inference", "integration", "knowledge", "viewer"),
}


def upward_imports(tree: Tree, lower: dict[str, tuple[str, ...]] = LOWER_LAYERS) -> list[str]:
    """``module -> imported`` for each import from a lower package into one above it."""
    return sorted(
        f"{name} -> {target}"
        for name, targets in tree.imports.items()
        for target in targets
        if target.split(".")[0] in lower.get(name.split(".")[0], ())
    )


def test_lower_layers_import_no_higher_one(project: Tree) -> None:
    assert upward_imports(project) == [], f"move what both need down a layer; layers: {LOWER_LAYERS}"


# ---- the checks themselves, on small trees ---------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


PACKAGES = {"integration/__init__.py": "", "integration/db/__init__.py": "", "integration/fhir/__init__.py": ""}


@pytest.mark.parametrize(
    ("store_imports", "expected"),
    [
        ("import integration.fhir.search\n", ["integration.db.store", "integration.fhir.search"]),
        ("from integration.fhir import search\n", ["integration.db.store", "integration.fhir.search"]),
        ("from integration.fhir.search import run_search\n", ["integration.db.store", "integration.fhir.search"]),
        ("from ..fhir.search import run_search\n", ["integration.db.store", "integration.fhir.search"]),
        ("from ..fhir import search\n", ["integration.db.store", "integration.fhir.search"]),
        ("def later():\n    from integration.fhir.search import run_search\n    return run_search\n",
         ["integration.db.store", "integration.fhir.search"]),
        ("from . import tables\n", ["integration.db.store", "integration.db.tables", "integration.fhir.search"]),
    ],
    ids=["import", "from-package-import-module", "from-module-import-name", "relative", "relative-module",
         "inside-a-function", "through-a-third-module"],
)
def test_a_cycle_is_found_whatever_the_import_form(tmp_path: Path, store_imports: str, expected: list[str]) -> None:
    repo = write_tree(tmp_path, {
        **PACKAGES,
        "integration/db/tables.py": "from integration.fhir.search import run_search\n",
        "integration/db/store.py": store_imports,
        "integration/fhir/search.py": "from integration.db.store import Store\n\ndef run_search(): ...\n",
    })
    (cycle,) = import_cycles(scan(repo).imports)
    assert cycle[0] == cycle[-1] and sorted(set(cycle)) == expected


def test_layers_that_point_one_way_make_no_cycle(tmp_path: Path) -> None:
    repo = write_tree(tmp_path, {
        **PACKAGES,
        "integration/db/tables.py": "import json\n",
        "integration/db/store.py": "from . import tables\nfrom .tables import *\n",
        "integration/fhir/search.py": "from ..db.store import Store\nfrom integration.db import tables\n",
        "integration/fhir/__init__.py": "from .search import run_search\n",
    })
    tree = scan(repo)
    assert tree.imports["integration.fhir.search"] == {"integration.db", "integration.db.store",
                                                       "integration.db.tables"}
    assert tree.imports["integration.fhir"] == {"integration.fhir.search"}
    assert import_cycles(tree.imports) == []


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    repo = write_tree(tmp_path, {
        "knowledge/__init__.py": "", "inference/__init__.py": "",
        "knowledge/drafting.py": "def later():\n    from inference.grounding import check\n",
        "inference/grounding.py": "from knowledge.drafting import later\n\ndef check(): ...\n",
    })
    assert upward_imports(scan(repo, ("knowledge", "inference"))) == ["knowledge.drafting -> inference.grounding"]


def test_a_crowded_folder_and_a_library_out_of_its_room_are_found(tmp_path: Path) -> None:
    files = {f"integration/flat/m{i}.py": "" for i in range(MAX_MODULES_PER_FOLDER + 1)}
    files["viewer/app.py"] = "import streamlit\n"
    files["integration/api.py"] = "def heatmap():\n    import torch.nn\n    return torch\n"
    files["inference/imaging/model.py"] = "import torch\nfrom monai.networks import nets\n"
    repo = write_tree(tmp_path, files)
    tree = scan(repo)
    assert crowded_folders(tree, repo) == {"integration/flat": MAX_MODULES_PER_FOLDER + 1}
    assert out_of_room(tree, repo) == ["integration/api.py: torch"]
