"""Local caches that are checked before every use (the downloaded model.keras, the
OpenVINO float32 conversion, the downloaded int8 engine).

A cache is one folder. Its files are made whole in a sibling folder, their SHA-256 go
to ``hashes.json`` beside them, written last and atomically (a temporary file renamed),
and only then is the sibling renamed into place. Before use the folder's files are
hashed again and compared with ``hashes.json`` (or with hashes known from elsewhere:
lineage.json's ``model_sha256``, gate.json's ``sha256``): a folder that is missing a
file, holds a truncated or changed one, or has no ``hashes.json`` is made again and
replaces the damaged one (moved aside, then removed): a damaged cache never blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from tasks.runtime import get_logger
from tasks.store.storage import sha256_file

HASHES = "hashes.json"


class CacheError(RuntimeError):
    """Files made again still do not match the hashes they must have."""


def matches(folder: Path, expected: dict | None = None) -> bool:
    """Every file of ``hashes.json`` (and of ``expected``, when given) there, with its hash."""
    try:
        recorded = json.loads((folder / HASHES).read_text())
        want = recorded if expected is None else expected
        if not want or any(recorded.get(name) != h for name, h in want.items()):
            return False
        return all(sha256_file(folder / name) == h for name, h in recorded.items())
    except (OSError, ValueError, AttributeError):
        return False


def seal(folder: Path) -> dict:
    """Write ``hashes.json`` of the folder's files: last, atomically."""
    hashes = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
              if p.is_file() and p.name != HASHES}  # fmt: skip
    tmp = folder / f".{HASHES}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(hashes, indent=1))
    os.replace(tmp, folder / HASHES)
    return hashes


def ensure(folder: Path, make: Callable[[Path], None], expected: dict | None = None) -> Path:
    """``folder``, its files checked; made again (``make(new_folder)`` writes them) when
    it does not match, and swapped in whole. CacheError when the new files do not match
    ``expected`` either (the source itself differs from what it should be)."""
    if matches(folder, expected):
        return folder
    if folder.exists():
        get_logger().warning("local cache %s does not match its hashes: making it again", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = folder.with_name(f"{folder.name}.new-{uuid.uuid4().hex[:12]}")
    new.mkdir()
    try:
        make(new)
        hashes = seal(new)
        if expected and any(hashes.get(name) != h for name, h in expected.items()):
            raise CacheError(f"{folder}: the files made again do not match their hashes")
        for _ in range(3):
            stale = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:12]}")
            try:
                folder.rename(stale)  # the damaged one aside (readers keep their files)
            except FileNotFoundError:
                stale = None
            except OSError:
                stale = None
            try:
                new.rename(folder)
                break
            except OSError:  # another process put one there meanwhile
                if matches(folder, expected):
                    break
            finally:
                if stale is not None:
                    shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    if not matches(folder, expected):
        raise CacheError(f"{folder}: could not be made again; remove it")
    return folder
