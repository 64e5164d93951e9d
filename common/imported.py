"""Experts trained elsewhere: a pool entry named in tasks.imported is a peft LoRA adapter (a directory, or a
hub id fetched once into the hub cache), recorded by the hash of its files so that make rebuilds what depends
on it when they change. Light to import (provenance hashes an import for every make): the check against the
loaded backbone and the copy into runs/ are common.experts.import_expert's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.artifacts import write_json
from common.errors import UserError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # what a peft adapter directory holds


def sources(cfg) -> dict[str, str]:
    """{pool name: adapter directory or hub id} of the imported experts."""
    return {str(k): str(v) for k, v in cfg.tasks.imported.items()}


def is_imported(cfg, name: str) -> bool:
    return name in cfg.tasks.imported


def _fix(name: str) -> str:
    return f"set tasks.imported.{name} to the folder that holds {CONFIG} and {WEIGHTS}, or to a hub id"


def adapter_dir(cfg, name: str) -> Path:
    """The folder an imported expert's files are read from: the local directory, or the hub id's snapshot
    (downloaded once; offline, the cached copy or one line saying how to get it)."""
    source = sources(cfg)[name]
    path = Path(source).expanduser()
    local = source.startswith(("/", ".", "~")) or source.count("/") != 1 or path.exists()
    if local:
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            what = "does not exist" if not path.exists() else f"has no {CONFIG} and {WEIGHTS}"
            raise UserError(
                f"{cfg.where('tasks.imported')}: tasks.imported.{name} '{source}' {what}; {_fix(name)}"
            )
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=[CONFIG, WEIGHTS, "README.md"]))
    except Exception as e:  # offline, unknown repo, no access: one line either way
        raise UserError(
            f"{cfg.where('tasks.imported')}: tasks.imported.{name}: the hub adapter '{source}' is not cached "
            f"and could not be fetched ({type(e).__name__}); download it where there is network (`hf "
            f"download {source} --local-dir DIR`) and set tasks.imported.{name}=DIR"
        ) from None


_MEMOS: dict[Path, dict] = {}  # each memo file read once per process


def file_hash(path: Path, memo: Path, remember: bool = False) -> str:
    """sha256 of a file's bytes (16 hex), looked up in `memo` by the file's path, size and modification time
    (a library of a thousand 7 MB adapters is read once, not at every make); `remember` writes it there (the
    stages do; make's queries only read, so `make -n` writes nothing)."""
    path, st = Path(path).resolve(), Path(path).stat()
    stamp = [st.st_size, st.st_mtime_ns]
    if memo not in _MEMOS:
        try:
            _MEMOS[memo] = json.loads(memo.read_text())
        except (OSError, ValueError):
            _MEMOS[memo] = {}
    known = _MEMOS[memo]
    if known.get(str(path), [None])[:2] == stamp:
        return known[str(path)][2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    known[str(path)] = [*stamp, h.hexdigest()[:16]]
    if remember:
        write_json(memo, known)  # last writer wins under make -j: a lost entry is only hashed again
    return known[str(path)][2]


def files_hash(cfg, name: str, remember: bool = False) -> str:
    """The hash an imported expert is recorded by: its config's and its weights' bytes."""
    folder, memo = adapter_dir(cfg, name), cfg.run_dir / ".hashes.json"
    return hashlib.sha256(
        "".join(file_hash(folder / f, memo, remember) for f in (CONFIG, WEIGHTS)).encode()
    ).hexdigest()[:16]
