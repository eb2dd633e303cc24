"""The catalog: one place builds keys, versions follow the code that computes, format
constants are pinned to golden outputs, and unknown versions are named."""

from __future__ import annotations

import ast
import hashlib
import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.data.fashion_mnist import encode_png, pixel_table
from tasks.data.loading import subset_rank
from tasks.data.prices import PriceRule, draw_prices, fit_scaling
from tasks.store import lake
from tasks.store.lake import Lake, NotInLake, code_fingerprint
from tasks.store.storage import LocalStore

REPO = Path(__file__).resolve().parents[1]

# What dataset and labels versions promise: the same format constant, the same bytes.
# A change that makes ingest or the price draw produce other content fails here: bump
# the format constant in tasks/store/lake.py (new versions, nothing stale is found) and add
# its digest.
GOLDEN_DATASET = {
    "vggprice-fashion-mnist-v1": "a9fbd2f205230460",
    "vggprice-fashion-mnist-v2": "0c91eb7a47144f1d",
}
GOLDEN_LABELS = {1: "5f1404d6ba88f575"}
GOLDEN_CATALOG = {
    "vggprice-catalog-v1": "9cf1decde19c4c87",
    "vggprice-catalog-v2": "561db38f6dc4c839",
}

# A literal that builds a lake key: one that starts with a zone or a part of one, or
# is an object name. Only the catalog (and storage, which moves bytes) may hold them.
ZONES = ("datasets/", "labels/", "features/", "models/", "checkpoints/", "registry/",
         "drops/", "scores/", "plots/", "part-", "_plans", "_claims", "_shards", "_rejected",
         "eval/", "finish-", "attempts/")  # fmt: skip
OBJECT_NAME = re.compile(r"^[\w.-]+\.(json|parquet|npz|npy|keras|txt|png)$")
OWNERS = {"tasks/store/lake.py", "tasks/store/storage.py"}
# names files of infra/ in the repository; the local UI's announcement under PREFECT_HOME;
# the hashes beside a cache folder on this machine
NOT_THE_LAKE = {"tasks/deploy/pools.py", "tasks/deploy/local_ui.py",
                "tasks/model/verified_cache.py"}  # this machine's cache folders  # fmt: skip


def dataset_digest() -> str:
    """What the demo's ingest stores for fixed images: its pixel shard's rows (id, label,
    content id, pixels read back from the PNG) in the order it writes them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    ids = [f"train-{i:05d}" for i in range(12)]
    order = np.argsort([subset_rank(i) for i in ids], kind="stable")
    table = pixel_table([ids[i] for i in order], (np.arange(12) % 10)[order],
                        [encode_png(images[i]) for i in order])  # fmt: skip
    from tasks.data.images import to_pixels

    h = hashlib.sha256()
    for image_id, label, cid, png in zip(
        *(table[c].to_pylist() for c in ("image_id", "label", "content_id", "image")), strict=True
    ):
        h.update(f"{image_id}:{label}:{cid}:".encode() + to_pixels(png).tobytes())
    return h.hexdigest()[:16]


def labels_digest() -> str:
    labels = np.arange(200) % 10
    prices = draw_prices(labels, PriceRule(), seed=0)
    splits = np.array(["train"] * 150 + ["test"] * 50)
    scaling = fit_scaling(prices, splits)
    return hashlib.sha256(prices.tobytes() + repr(sorted(scaling.items())).encode()).hexdigest()[
        :16
    ]


def catalog_digest() -> str:
    """What a catalog's ingest stores for fixed inputs: normalised RGB pixels (read back
    from the stored PNGs) of images of several sizes and modes, and the seeded split."""
    import io as _io

    from PIL import Image

    from tasks.data.catalog import stable_split
    from tasks.data.images import encode_png_rgb, to_rgb

    rng = np.random.default_rng(0)
    h = hashlib.sha256()
    for size, mode in (((300, 200), "RGB"), ((40, 90), "L"), ((64, 64), "RGBA")):
        im = Image.fromarray(rng.integers(0, 256, (*size[::-1], len(mode)), dtype=np.uint8)
                             .squeeze(), mode=mode)  # fmt: skip
        buf = _io.BytesIO()
        im.save(buf, format="PNG")
        stored = encode_png_rgb(to_rgb(buf.getvalue()))
        h.update(np.asarray(Image.open(_io.BytesIO(stored))).tobytes())
    h.update(repr([stable_split(f"c{i % 3}/{i:05d}.png") for i in range(40)]).encode())
    return h.hexdigest()[:16]


def test_catalog_format_is_pinned():
    assert lake.CATALOG_FORMAT in GOLDEN_CATALOG, "new format: add its golden digest here"
    assert catalog_digest() == GOLDEN_CATALOG[lake.CATALOG_FORMAT], (
        "catalog ingest now stores other content: bump CATALOG_FORMAT in tasks/store/lake.py"
    )


def test_dataset_format_is_pinned():
    assert lake.DATASET_FORMAT in GOLDEN_DATASET, "new format: add its golden digest here"
    assert dataset_digest() == GOLDEN_DATASET[lake.DATASET_FORMAT], (
        "ingest now writes other content: bump DATASET_FORMAT in tasks/store/lake.py"
    )


def test_labels_format_is_pinned():
    assert lake.LABELS_FORMAT in GOLDEN_LABELS, "new format: add its golden digest here"
    assert labels_digest() == GOLDEN_LABELS[lake.LABELS_FORMAT], (
        "the price draw now gives other prices: bump LABELS_FORMAT in tasks/store/lake.py"
    )


def layout_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal (f-string parts too) naming a lake place."""
    found = []
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and (node.value.startswith(ZONES) or OBJECT_NAME.match(node.value))
        ):
            found.append((node.lineno, node.value))
    return found


def code_files() -> list[Path]:
    return sorted([*REPO.glob("tasks/**/*.py"), *REPO.glob("flows/*.py")])


def test_no_key_is_built_outside_the_lake():
    scanned = code_files()
    assert len(scanned) > 30 and REPO / "tasks/scoring/runner.py" in scanned, scanned
    offenders = []
    for path in scanned:
        rel = path.relative_to(REPO).as_posix()
        if rel not in OWNERS | NOT_THE_LAKE:
            offenders += [f"{rel}:{line}: {text!r}" for line, text in layout_strings(path)]
    assert offenders == [], "keys built outside tasks/store/lake.py:\n" + "\n".join(offenders)


# What the learning code may import beside itself: what it stores through (the store's
# work claims among it: which extractor computes a feature shard, never what it holds)
# and the process-wide helpers. None of these decide what a cache or a model holds.
BENEATH = {"tasks", "tasks.store", "tasks.store.lake", "tasks.store.storage", "tasks.settings",
           "tasks.runtime", "tasks.reports", "tasks.store.claims"}  # fmt: skip


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, not a module
        return False


def imported_tasks_modules(start: str) -> set[str]:
    """tasks.* modules that ``start`` imports (from its source), not following BENEATH."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in BENEATH:
            continue
        source = Path(importlib.util.find_spec(name).origin).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks"):
                todo.append(node.module)
                names = (f"{node.module}.{a.name}" for a in node.names)
                todo += [n for n in names if is_module(n)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("tasks.")]
    return seen - BENEATH


def test_versions_cover_all_the_code_that_computes():
    learning = lake.modules_of(lake.LEARNING_CODE)
    assert "tasks.model.training" in learning and "tasks.data.images" in learning, learning
    needed = set().union(*(imported_tasks_modules(m) for m in learning))
    assert needed <= set(learning), (
        f"the learning code imports {sorted(needed - set(learning))}: move it under "
        f"{' or '.join(lake.LEARNING_CODE)}, or beneath them"
    )


def test_fingerprint_follows_code_not_prose(tmp_path, monkeypatch):
    pkg = tmp_path / "fpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    mod = pkg / "m.py"
    monkeypatch.syspath_prepend(str(tmp_path))

    def fingerprint(text: str) -> str:
        mod.write_text(text)
        code_fingerprint.cache_clear()
        importlib.invalidate_caches()
        return code_fingerprint(("fpkg.m",))

    base = fingerprint('"""Doc."""\ndef f(x):\n    """What f does."""\n    return x + 1\n')
    prose = fingerprint('"""Other doc."""\n\n# a comment\ndef f(x):\n    """Reworded."""\n'
                        "    return x + 1  # why\n")  # fmt: skip
    code = fingerprint('"""Doc."""\ndef f(x):\n    """What f does."""\n    return x + 2\n')
    code_fingerprint.cache_clear()
    sys.modules.pop("fpkg", None)
    assert base == prose, "docstrings, comments and layout do not change versions"
    assert base != code, "a change to what the code computes does"


def test_model_version_includes_the_code():
    spec = {"dataset": "fm-a", "labels": "px-b", "settings": {}, "weights": "none:seed=0"}
    v = lake.model_version(spec)
    assert v == lake.model_version(spec)
    assert v == "m-" + lake.digest(spec | {"code": code_fingerprint()})
    assert v != "m-" + lake.digest(spec | {"code": "another-code"})


def test_unknown_versions_name_the_known_ones(tiny_lake, tmp_path):
    lake, dv, lv, mv = tiny_lake
    with pytest.raises(NotInLake, match=f"no such dataset version .known: {dv}"):
        lake.dataset("fm-nope").manifest()
    with pytest.raises(NotInLake, match=f"no such labels version .* .known: {lv}"):
        lake.labels(dv, "px-nope").scaling()
    with pytest.raises(NotInLake, match=f"no such .complete. model version .known: {mv}"):
        lake.model("m-nope").lineage()
    empty = Lake(LocalStore(tmp_path / "empty"))
    with pytest.raises(NotInLake, match=r"known: none"):
        empty.model("m-nope").config()
    assert lake.dataset_versions() == [dv] and lake.model_versions() == [mv]
