"""Artifacts on disk: written to a temp name and renamed, so a crash never leaves half a file. Under torchrun
only rank 0's lands; the other ranks write into a temp folder that is removed
(every rank runs the same code)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from common import dist
from common.errors import UserError


@contextmanager
def atomic_dir(path: Path):
    """Yield a temp directory next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    if not dist.is_main():
        with tempfile.TemporaryDirectory(prefix=f"{path.name}.rank{dist.rank()}.") as tmp:
            yield Path(tmp)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: Path):
    """Yield a unique temp path next to `path` (two processes may write the same artifact); on success it
    replaces `path` in one rename."""
    path = Path(path)
    if not dist.is_main():
        with tempfile.TemporaryDirectory(prefix=f"rank{dist.rank()}.") as tmp:
            yield Path(tmp) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str, fix: str) -> dict:
    """Read a JSON artifact; a missing or corrupt one is a UserError naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing {what}; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt {what} ({e.msg} at line {e.lineno}); delete it and {fix}") from None
