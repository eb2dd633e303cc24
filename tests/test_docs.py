"""The docs name only things that exist: every backticked path is in the repository, and
every backticked code name (``tasks.data.images.prepare``, ``lake.code_fingerprint()``,
``Lake.lines()``, ``tasks/deploy/pools.py: POOLS``, "`TrainSettings` in
`tasks/model/train_settings.py`") is defined where it says. Names are found by parsing the
source with ``ast``, never by importing it (no TensorFlow, no Prefect: this runs in a
second). Also: the README stays short, and the lake layout is written once, in the
docstring of ``tasks/store/lake.py``."""

from __future__ import annotations

import ast
import functools
import itertools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md")])
README_LIMIT = 15_000  # bytes
LAYOUT_LINE = "datasets/fashion-mnist/"  # the first line of the layout tree
SKIPPED_DIRS = {".git", ".venv", ".venv-infra", "lake", "node_modules"}

PATH_ROOTS = ("tasks", "flows", "bench", "scripts", "infra", "docs", "tests")
PATH = re.compile(rf"^(?:{'|'.join(PATH_ROOTS)})/[^\s`]*$")
# A file name's ending, not an attribute: `config.json`, `runner.py`, `model.keras`.
FILE_ENDINGS = {"py", "json", "md", "keras", "parquet", "npy", "npz", "png", "yaml", "yml",
                "txt", "h5", "sh", "csv", "tf", "toml", "tftpl", "cfg", "ini", "html"}  # fmt: skip
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?$")
PATH_AND_NAME = re.compile(r"^([\w/.-]+\.py)\s*:\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)$")
NAME_IN_FILE = re.compile(
    r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)(?:\([^`]*\))?` in `((?:tasks|flows|bench)/[\w/]+\.py)`"
)
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _spans(doc: Path) -> list[str]:
    return SPAN.findall(_prose(doc.read_text(encoding="utf-8")))


def _fenced_tokens(doc: Path) -> list[str]:
    """Words of the fenced blocks (commands) that name repository paths."""
    blocks = [m.group(0) for m in FENCE.finditer(doc.read_text(encoding="utf-8"))]
    words = itertools.chain.from_iterable(b.split() for b in blocks)
    return [w for w in words if PATH.match(w.rstrip(",;:"))]


# --- paths ------------------------------------------------------------------------------


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for alt in m.group(1).split(",") for x in _expand_braces(head + alt + tail)]


def path_exists(text: str) -> bool:
    """A repository path; a `<placeholder>` or `*` matches any name part, `{a,b}` must
    exist for each of a and b, and `folder/...` stands for the folder."""
    text = text.rstrip(",;:)").removesuffix("...")
    for one in _expand_braces(text):
        pattern = re.sub(r"<[^<>]*>", "*", one).rstrip("/")
        if any(c in pattern for c in "*?["):
            if not any(REPO.glob(pattern)):
                return False
        elif not (REPO / pattern).exists():
            return False
    return True


# --- names, from the source ---------------------------------------------------------------


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _defined(body: list[ast.stmt]) -> set[str]:
    """Names a module or class body defines: def, class, assignment (not imports)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names.add(t.id)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.If | ast.Try | ast.With):  # names defined conditionally
            inner = list(node.body) + list(getattr(node, "orelse", []))
            for handler in getattr(node, "handlers", []):
                inner += handler.body
            names |= _defined(inner)
    return names


def _class(path: Path, name: str) -> ast.ClassDef | None:
    for node in _tree(path).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    return None


def defines(path: Path, names: list[str]) -> bool:
    """``names`` is [name] (top level) or [Class, member] in the module at ``path``."""
    if not names:
        return True
    if len(names) == 1:
        return names[0] in _defined(_tree(path).body)
    if len(names) == 2:
        cls = _class(path, names[0])
        return cls is not None and names[1] in _defined(cls.body)
    return False


def module_file(dotted: str) -> Path | None:
    """tasks.data.images -> tasks/data/images.py (a package: its __init__.py)."""
    base = REPO.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


@functools.cache
def modules_by_stem() -> dict[str, list[Path]]:
    """Every module of tasks/ and flows/ by its file name: `lake.line_of` names lake.py."""
    found: dict[str, list[Path]] = {}
    for path in sorted([*REPO.glob("tasks/**/*.py"), *REPO.glob("flows/**/*.py")]):
        if path.stem != "__init__":
            found.setdefault(path.stem, []).append(path)
    return found


# tasks/ subpackages whose name stands for any of their modules (`scoring.work`); model,
# data and store read as Python variables in prose (`model.fit`, `store.check()`).
PACKAGES_AS_NAMES = ("governance", "scoring", "deploy")


@functools.cache
def classes_by_name() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for paths in modules_by_stem().values():
        for path in paths:
            for node in _tree(path).body:
                if isinstance(node, ast.ClassDef):
                    found.setdefault(node.name, []).append(path)
    return found


def dotted_problem(span: str) -> str | None:
    """Why a backticked dotted name does not resolve, or None (also None for a dotted
    span that is no code reference of this project: `keras.models.load_model`)."""
    m = DOTTED.match(span)
    if not m:
        return None
    parts = m.group(1).split(".")
    if parts[-1] in FILE_ENDINGS and "(" not in span:
        return None  # a file name
    if parts[0] in ("tasks", "flows"):
        for cut in range(len(parts), 0, -1):
            path = module_file(".".join(parts[:cut]))
            if path is not None:
                rest = parts[cut:]
                if defines(path, rest):
                    return None
                return f"{_rel(path)} defines no {'.'.join(rest)}"
        return f"no module {parts[0]}"
    if parts[0] in modules_by_stem():
        paths = modules_by_stem()[parts[0]]
        if any(defines(p, parts[1:]) for p in paths):
            return None
        return f"{' / '.join(_rel(p) for p in paths)} defines no {'.'.join(parts[1:])}"
    if parts[0] in PACKAGES_AS_NAMES and len(parts) == 2:
        paths = sorted((REPO / "tasks" / parts[0]).glob("*.py"))
        if any(defines(p, parts[1:]) for p in paths):
            return None
        return f"no module of tasks/{parts[0]}/ defines {parts[1]}"
    if parts[0] in classes_by_name() and len(parts) == 2:
        paths = classes_by_name()[parts[0]]
        if any(defines(p, parts) for p in paths):
            return None
        return f"class {parts[0]} ({', '.join(_rel(p) for p in paths)}) has no {parts[1]}"
    return None


def name_in_file_problem(path_text: str, name: str) -> str | None:
    path = REPO / path_text
    if not path.is_file():
        return f"no file {path_text}"
    if defines(path, name.split(".")):
        return None
    return f"{path_text} defines no {name}"


# --- the tests -----------------------------------------------------------------------------


def _doc_id(doc: Path) -> str:
    return _rel(doc)


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_backticked_paths_exist(doc):
    wrong = []
    for span in _spans(doc):
        m = PATH_AND_NAME.match(span)
        words = [m.group(1)] if m else span.split()
        wrong += [w for w in words if PATH.match(w) and not path_exists(w)]
    wrong += [w for w in _fenced_tokens(doc) if not path_exists(w)]
    assert not wrong, f"{_rel(doc)} names paths that do not exist: {sorted(set(wrong))}"


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_backticked_code_names_exist(doc):
    text = _prose(doc.read_text(encoding="utf-8"))
    wrong = []
    for span in SPAN.findall(text):
        if m := PATH_AND_NAME.match(span):
            problem = name_in_file_problem(m.group(1), m.group(2))
        else:
            problem = dotted_problem(span)
        if problem:
            wrong.append(f"`{span}`: {problem}")
    for name, path_text in NAME_IN_FILE.findall(text):
        if problem := name_in_file_problem(path_text, name):
            wrong.append(f"`{name}` in `{path_text}`: {problem}")
    assert not wrong, f"{_rel(doc)} names code that does not exist:\n" + "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_relative_links_exist(doc):
    wrong = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        where = target.split("#", 1)[0]
        if not (doc.parent / where).resolve().exists():
            wrong.append(target)
    assert not wrong, f"{_rel(doc)} links to files that do not exist: {wrong}"


def test_readme_is_short():
    size = (REPO / "README.md").stat().st_size
    assert size < README_LIMIT, (
        f"README.md is {size:,} bytes (limit {README_LIMIT:,}): move detail to docs/"
    )


def _markdown_files() -> list[Path]:
    found = []
    for path in REPO.rglob("*.md"):
        if not SKIPPED_DIRS.intersection(path.relative_to(REPO).parts):
            found.append(path)
    return sorted(found)


def test_lake_layout_is_written_once():
    lake = REPO / "tasks" / "store" / "lake.py"
    docstring = ast.get_docstring(_tree(lake)) or ""
    assert any(line.strip().startswith(LAYOUT_LINE) for line in docstring.splitlines()), (
        "tasks/store/lake.py: its docstring should hold the lake layout (the one copy)"
    )
    copies = []
    for md in _markdown_files():
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip().startswith(LAYOUT_LINE):
                copies.append(f"{_rel(md)}:{n}")
    assert not copies, (
        f"the lake layout is copied into {copies}: point to tasks/store/lake.py instead"
    )


def test_the_checker_checks():
    """The rules above catch what they should (so a pass means something)."""
    assert path_exists("tasks/store/lake.py") and path_exists("infra/work-pools/<pool>.json")
    assert path_exists("infra/docker/Dockerfile.{cpu,gpu}") and path_exists("tasks/...")
    assert not path_exists("tasks/lake.py") and not path_exists("infra/docker/Dockerfile.{cpu,x}")
    assert dotted_problem("tasks.data.images.prepare(bytes, mode, size)") is None
    assert dotted_problem("lake.code_fingerprint()") is None
    assert dotted_problem("Lake.lines()") is None
    assert dotted_problem("tasks.store.lake.Lake.lines") is None
    assert dotted_problem("config.json") is None and dotted_problem("keras.models.x") is None
    assert dotted_problem("tasks.data.images.no_such_name")
    assert dotted_problem("lake.no_such_name")
    assert dotted_problem("Lake.no_such_method")
    assert dotted_problem("scoring.no_such_name")
    assert name_in_file_problem("tasks/deploy/pools.py", "POOLS") is None
    assert name_in_file_problem("tasks/deploy/pools.py", "NO_SUCH")
