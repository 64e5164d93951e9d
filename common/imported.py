"""Experts trained elsewhere: a pool entry named in tasks.imported is a peft LoRA adapter (a directory, or a
hub id fetched once into the hub cache), recorded by the hash of its files so that make rebuilds what depends
on it when they change. Light to import (provenance hashes an import for every make): the check against the
loaded backbone and the copy into runs/ are common.experts.import_expert's."""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
from pathlib import Path

from common.artifacts import write_json
from common.errors import UserError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # what a peft adapter directory holds


def sources(cfg) -> dict[str, str]:
    """{pool name: adapter directory or hub id} of the imported experts."""
    return {str(k): str(v) for k, v in cfg.tasks.imported.items()}


def _fix(name: str) -> str:
    return f"set tasks.imported.{name} to the folder that holds {CONFIG} and {WEIGHTS}, or to a hub id"


_SNAPSHOTS: dict[str, Path] = {}  # hub id -> its snapshot folder, looked up once per process


def adapter_dir(cfg, name: str, download: bool = False) -> Path:
    """The folder an imported expert's files are read from: the local directory, or the hub id's snapshot in
    the hub cache. Only `download` may fetch it (make's checks and the import stage do, before anything else
    asks): make's queries read the cache alone, so `make -n` writes nothing and asks no network."""
    source, where = sources(cfg)[name], cfg.where("tasks.imported")
    path = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) or source.count("/") != 1 or path.exists():
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            what = "does not exist" if not path.exists() else f"has no {CONFIG} and {WEIGHTS}"
            raise UserError(f"{where}: tasks.imported.{name} '{source}' {what}; {_fix(name)}")
        return path
    if source not in _SNAPSHOTS:
        from huggingface_hub import snapshot_download

        try:
            got = snapshot_download(
                source, allow_patterns=[CONFIG, WEIGHTS, "README.md"], local_files_only=not download
            )
        except Exception as e:  # offline, unknown repo, no access: one line either way
            how = (
                f"could not be fetched ({type(e).__name__})"
                if download
                else "is not in the hub cache yet (`make check` fetches it)"
            )
            raise UserError(
                f"{where}: tasks.imported.{name}: the hub adapter '{source}' {how} (and there is no folder "
                f"of that name here); download it where there is network (`hf download {source} --local-dir "
                f"DIR`) and set tasks.imported.{name}=DIR"
            ) from None
        if not (Path(got) / WEIGHTS).is_file() or not (Path(got) / CONFIG).is_file():
            raise UserError(
                f"{where}: tasks.imported.{name}: the hub adapter '{source}' has no {CONFIG} and {WEIGHTS} "
                f"(a .bin adapter?); load it with peft, save_pretrained it to a folder DIR and set "
                f"tasks.imported.{name}=DIR"
            )
        _SNAPSHOTS[source] = Path(got)
    return _SNAPSHOTS[source]


_MEMOS: dict[Path, dict] = {}  # each memo file read once per process
_REMEMBER: set[Path] = set()  # and those with new hashes written once, when the process exits


@atexit.register
def _save_memos() -> None:
    """Add this process's new hashes to each memo file it was asked to keep them in, under a lock (processes
    of make -j write the same file)."""
    for memo in _REMEMBER:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with open(memo.with_name(f".{memo.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                on_disk = json.loads(memo.read_text())
            except (OSError, ValueError):
                on_disk = {}
            write_json(memo, on_disk | _MEMOS[memo])


def file_hash(path: Path, memo: Path, remember: bool = False) -> str:
    """sha256 of a file's bytes (16 hex), looked up in `memo` by the file's path, size, inode and times (a
    library of a thousand 7 MB adapters is read once, not at every make; a rewrite changes the change time,
    which no copy preserves); `remember` keeps new ones there (written when the process exits: the stages
    do; make's queries only read, so `make -n` writes nothing)."""
    path, st = Path(path).resolve(), Path(path).stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if memo not in _MEMOS:
        try:
            _MEMOS[memo] = json.loads(memo.read_text())
        except (OSError, ValueError):
            _MEMOS[memo] = {}
    known = _MEMOS[memo]
    if known.get(str(path), [None])[:-1] == stamp:
        return known[str(path)][-1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    known[str(path)] = [*stamp, h.hexdigest()[:16]]  # read once per process either way
    if remember:
        _REMEMBER.add(memo)
    return h.hexdigest()[:16]


def folder_hash(folder: Path, memo: Path, remember: bool = False) -> str:
    """An adapter folder's hash: its config's and its weights' bytes."""
    joined = "".join(file_hash(Path(folder) / f, memo, remember) for f in (CONFIG, WEIGHTS))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def files_hash(cfg, name: str, remember: bool = False) -> str:
    """The hash an imported expert is recorded by (its digest hashes it): its source folder's."""
    return folder_hash(adapter_dir(cfg, name, download=remember), cfg.run_dir / ".hashes.json", remember)
