"""Tasks read from files: every task defined in YAML (a profile's `tasks.define`, and the paper's catalogue in
configs/paper_tasks.yaml) is read here, from csv / tsv (headed, or headerless as OFA's) / jsonl / parquet /
CoOp's split JSON, into lazily decoded `Rows` of `common.tasks.Example`s. Also Florence-2's location tokens,
OFA's text normalisations and the hub download.

The catalogue's prompts, answers and column orders follow OFA-Sys/OFA (`data/mm_data/*_dataset.py`,
`data/nlu_data/*_dataset.py`, `data/cv_data/image_classify_dataset.py` and the `--selected-cols` of
`run_scripts/*`); the few-shot image datasets follow CoOp's `split_zhou_*.json` files.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import string
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from common.artifacts import atomic_file
from common.errors import UserError
from common.tasks import FORMATS, DefinedTask, Example, define

CATALOGUE = Path(__file__).resolve().parent.parent / "configs" / "paper_tasks.yaml"
LOC_BINS = 1000  # Florence-2's <loc_0>..<loc_999>


@functools.cache
def catalogue() -> dict[str, DefinedTask]:
    """The paper's task pool, as definitions (configs/paper_tasks.yaml): the same schema as tasks.define."""
    specs = yaml.safe_load(CATALOGUE.read_text())
    return {
        str(name): define(str(name), spec, "configs/paper_tasks.yaml", prefix="")
        for name, spec in specs.items()
    }


# ---- location tokens (Florence-2: floor-quantised to 1000 bins per axis, decoded at the bin centre) ----


def box_to_tokens(box, width: float, height: float, bins: int = LOC_BINS) -> str:
    """Pixel box (x0, y0, x1, y1) -> '<loc_a><loc_b><loc_c><loc_d>', relative to the image size."""
    size = (width, height, width, height)
    return "".join(f"<loc_{min(max(math.floor(v / (s / bins)), 0), bins - 1)}>" for v, s in zip(box, size))


_LOC = re.compile(r"<loc_(\d+)>")


def tokens_to_box(text: str, bins: int = LOC_BINS) -> tuple[float, float, float, float] | None:
    """The first four location tokens in text -> a normalised box (bin centres); None if there are fewer."""
    found = [int(m) for m in _LOC.findall(text)[:4]]
    if len(found) < 4 or max(found) >= bins:
        return None
    return tuple((q + 0.5) / bins for q in found)


# ---- OFA's text normalisations (a definition's `clean`) ----


def _ofa_text(text: str) -> str:
    """OFA's pre_caption/pre_question: lower case, no leading punctuation,
    '-' and '/' as spaces, single spaces."""
    text = text.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    return " ".join(text.split())


def _ofa_question(text: str) -> str:
    question = _ofa_text(text)
    return question if question.endswith("?") else question + "?"


PUNCTUATION = re.compile(r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]")  # captions' (OFA, coco-caption)

CLEAN = {
    "ofa": _ofa_text,
    "ofa-question": _ofa_question,  # VQA: and a '?' at the end
    "lower": lambda text: " ".join(text.lower().split()),  # OFA lower-cases GLUE's sentences
    "caption": lambda text: " ".join(
        PUNCTUATION.sub("", text).lower().split()
    ),  # caption_dataset.py, as coco scores
    "class": lambda text: text.replace("_", " ").strip(),  # CoOp prompts with '_' as spaces
}


def _image(raw) -> Image.Image:
    """A PIL RGB image from base64 text (OFA: urlsafe), raw bytes or a {'bytes': ...} struct."""
    if isinstance(raw, dict):
        raw = raw.get("bytes")
    if isinstance(raw, str):
        raw = base64.urlsafe_b64decode(raw)
    return Image.open(io.BytesIO(raw)).convert("RGB")


def _ofa_vqa_refs(raw: str) -> tuple[str, ...]:
    """OFA's 'conf|!+answer&&...' as the ten human answers, repeats included."""
    refs = []
    for item in raw.split("&&"):
        conf, answer = item.split("|!+")
        # OFA's conf is the VQA score 0.3/0.6/0.9/1.0 of 1/2/3/>=4 of 10 humans; rebuild that many answers
        refs += [answer] * (4 if float(conf) >= 1 else max(1, round(float(conf) * 10 / 3)))
    return tuple(refs) + ("",) * (10 - len(refs))  # "" = a human answer no prediction matches


# ---- a row's columns -> an Example ----


class _BadRow(Exception):
    """A row that does not make an example (raised with the reason; the source adds the file and row)."""


def _cleaned(task: DefinedTask, column: str, text) -> str:
    how = task.clean.get(column)
    return CLEAN[how](str(text)) if how else text


def _several(raw, sep: str) -> tuple[str, ...]:
    if isinstance(raw, (list, tuple, np.ndarray)):
        return tuple(a["answer"] if isinstance(a, dict) else str(a) for a in raw)  # VQA's [{'answer': ...}]
    return tuple(str(raw).split(sep))


def _answer(task: DefinedTask, labels: dict, f: dict) -> str:
    """The answer column's value through the label map, then its `clean`."""
    raw = f[task.answer]
    if labels:
        key = str(raw).strip()
        if key not in labels:
            if key == "-1":
                raise _BadRow("has no label (test labels are hidden); use the validation split")
            raise _BadRow(f"answer {key!r} is not a key of labels ({', '.join(labels)})")
        raw = labels[key]
    return _cleaned(task, task.answer, str(raw).strip())


def _text(source: _Source, f: dict) -> Example:
    """A row without its image: prompt, answer, candidates, references."""
    task, labels = source.task, source.layout["labels"]
    refs = None
    if task.refs:
        raw = f[task.refs]
        refs = _ofa_vqa_refs(raw) if task.refs_format == "ofa-vqa" else _several(raw, task.refs_sep)
        refs = tuple(labels.get(r, _cleaned(task, task.refs, r)) if r else r for r in refs)
    if task.answer == task.refs:  # OFA trains on the most frequent (VQA: most confident) reference
        answer = Counter(r for r in refs if r).most_common(1)[0][0]
    else:
        answer = _answer(task, labels, f)
    cands = _several(f[task.candidates_column], "|") if task.candidates_column else source.names
    prompt = task.prompt.format_map({**f, **{c: _cleaned(task, c, f[c]) for c in task.clean if c in f}})
    return Example(prompt, answer, None, candidates=cands, refs=refs)


def _example(source: _Source, f: dict) -> Example:
    """A row with its image read and decoded (and a box answer as location tokens of the image's size)."""
    ex = _text(source, f)
    if not source.task.image:
        return ex
    raw = f[source.task.image]
    if isinstance(raw, str) and source.layout["image_kind"] == "path":
        raw = (source.root / source.layout["image_root"] / raw).read_bytes()
    pil = _image(raw)
    answer = ex.answer
    if source.task.answer_format == "box":
        region = f[source.task.answer]
        box = [float(v) for v in (region.split(",") if isinstance(region, str) else region)]
        answer = box_to_tokens(box, *pil.size)
    # a writable copy
    return Example(ex.prompt, answer, np.array(pil), candidates=ex.candidates, refs=ex.refs)


def _columns_used(task: DefinedTask) -> dict[str, str]:
    """column -> the definition field that names it."""
    used = {c: "prompt" for _, c, _, _ in string.Formatter().parse(task.prompt) if c}
    for field_name in ("answer", "image", "refs", "candidates_column"):
        if getattr(task, field_name):
            used[getattr(task, field_name)] = field_name.replace("_column", "")
    return used


# ---- sources: a split's rows in its file(s) ----


class Rows(Sequence):
    """A split's examples, each decoded when asked for (rows[i]; a batch takes its own): what is held is the
    source's rows (a headerless file: one byte offset each; other files: each row's columns as read, its image
    a path or still encoded) and which of them this view takes. Slices are views (rows[r::world], rows[:n]);
    answers() reads the answer alone (the k-per-class sample of tasks.shots_per_class), no image decoded.
    `workers`: the DataLoader workers that decode it when it is read in batches (common.data.batches: the
    evaluation, the Fisher); data.split sets it from data.num_workers. Picklable (each process opens its
    own file)."""

    def __init__(self, source: _Source, index: np.ndarray, workers: int = 0):
        self.source, self.index, self.workers = source, index, workers

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Rows(self.source, self.index[i], self.workers)
        return self.source.example(int(self.index[i]))

    def __mul__(self, times: int) -> Rows:
        return Rows(self.source, np.tile(self.index, times), self.workers)

    def answers(self) -> list[str]:
        return [self.source.text(int(j)).answer for j in self.index]

    def texts(self) -> list[Example]:
        """Each row without its image (none read), for what looks at the words only."""
        return [self.source.text(int(j)) for j in self.index]

    def image_keys(self) -> np.ndarray:
        return self.source.image_keys()[self.index]

    def take(self, keep: np.ndarray) -> Rows:
        """The rows where `keep` (a mask over this view) is true."""
        return Rows(self.source, self.index[keep], self.workers)

    def sample(self, n: int | None, key: str) -> Rows:
        """At most n of these rows: all of them, or a seeded random sample of n (seeded by `key`), in file
        order. A file's first rows are not a random sample (OFA's TSVs group their rows by image); samples of
        one key nest (the 200 rows of n=200 are among the 1,000 of n=1000)."""
        if n is None or n >= len(self):
            return self
        pick = np.random.default_rng(zlib.crc32(key.encode())).permutation(len(self))[:n]
        return Rows(self.source, self.index[np.sort(pick)], self.workers)


class _Source:
    """A defined task's rows in one split's file(s), for Rows: row(j) is row j's columns as read (renamed by
    the file format's `per_format`; an image still a path or encoded), where(j) names the row in errors;
    `layout` is the labels and image settings for this file's format,
    `names` the closed set of `all-answers`."""

    def __init__(self, task: DefinedTask, layout: dict, root: Path, path: Path):
        self.task, self.layout, self.root, self.path, self.names = task, layout, root, path, None
        self.classes: tuple[str, ...] = ()  # a parquet schema's class names (ClassLabel), if any

    def rows(self):
        """(where, columns) of every row, in order."""
        return ((self.where(j), self.row(j)) for j in range(len(self)))

    def image_keys(self) -> np.ndarray:
        """Every row's image key (image_key of _image_id), as uint64: the overlap guard's and the val carve's
        view of the images."""

        def keys() -> np.ndarray:
            out = np.empty(len(self), dtype=np.uint64)
            for j, (where, f) in enumerate(self.rows()):
                try:
                    out[j] = image_key(self._image_id(f))
                except KeyError as e:
                    raise UserError(f"{self.path}:{where}: no column {e} in this row") from None
                except OSError as e:
                    raise UserError(
                        f"{self.path}:{where}: unreadable image ({' '.join(str(e).split())[:100]})"
                    ) from None
            return out

        return (
            beside(self.path, _image_rule(self.task, self.layout, self.root), keys)
            if self.path.is_file()
            else keys()
        )

    def _image_id(self, f: dict) -> str | bytes:
        """What tells a row's image: its id within the image set, the file it is in (tasks that read one
        folder of images share them, and no image is read), or its bytes."""
        t, column = self.task, self.layout["image_id"]
        if column:
            return f"{t.image_set}:{f[column]}"
        raw = f[t.image]
        if isinstance(raw, dict):
            raw = raw.get("bytes")
        if isinstance(raw, str) and self.layout["image_kind"] == "path":
            return f"file:{(self.root / self.layout['image_root'] / raw).resolve()}"
        return base64.urlsafe_b64decode(raw) if isinstance(raw, str) else bytes(raw)

    def example(self, j: int) -> Example:
        return self._read(_example, j)

    def text(self, j: int) -> Example:
        """Row j without its image (no file read; a box answer needs the image's size, so it is read)."""
        return self._read(_example if self.task.answer_format == "box" else _text, j)

    def _read(self, make, j: int) -> Example:
        try:
            return make(self, self.row(j))
        except _BadRow as e:
            raise UserError(f"{self.path}:{self.where(j)}: {e}") from None
        except KeyError as e:
            raise UserError(f"{self.path}:{self.where(j)}: no column {e} in this row") from None
        except FileNotFoundError as e:
            raise UserError(f"{self.path}:{self.where(j)}: missing image file {e.filename}") from None
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(
                f"{self.path}:{self.where(j)}: unreadable image ({' '.join(str(e).split())[:100]})"
            ) from None
        except (binascii.Error, ValueError, IndexError) as e:
            why = " ".join(f"{type(e).__name__}: {e}".split())[:100]
            raise UserError(f"{self.path}:{self.where(j)}: unreadable image or field ({why})") from None


class RecordSource(_Source):
    """Rows read into memory as their columns (text, labels; an image as the path of its file, or still
    encoded): a row's image file is read, and any image decoded, when a batch takes the row."""

    def __init__(self, task, layout, root, path, records: list[dict], wheres: list[str]):
        super().__init__(task, layout, root, path)
        self.records, self.wheres = records, wheres

    def __len__(self) -> int:
        return len(self.records)

    def row(self, j: int) -> dict:
        return self.records[j]

    def where(self, j: int) -> str:
        return self.wheres[j]


class LineSource(_Source):
    """A headerless csv / tsv (OFA's TSVs of base64 images) read by line offset: row j is line j + 1, and
    nothing but the offsets is held."""

    def __init__(self, task, layout, root, path, offsets: np.ndarray, fmt: str):
        super().__init__(task, layout, root, path)
        self.offsets, self.fmt, self._fh, self._pid = offsets, fmt, None, None

    def __getstate__(self):
        return {**self.__dict__, "_fh": None}  # each process opens its own handle

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, j: int) -> dict:
        # a forked DataLoader worker: not its parent's offset
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(self.offsets[j])
        return _split_line(self.task, self.fmt, self.path, j + 1, self._fh.readline().decode("utf-8"))

    def where(self, j: int) -> str:
        return str(j + 1)

    def rows(self):  # one sequential pass, not a seek per row
        with open(self.path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                yield str(i), _split_line(self.task, self.fmt, self.path, i, line)


def _split_line(task: DefinedTask, fmt: str, path: Path, lineno: int, line: str) -> dict:
    """A headerless line's columns by the definition's `columns`
    (OFA's base64 holds no tab; csv is parsed)."""
    line = line.rstrip("\r\n")
    cols = line.split("\t") if fmt == "tsv" else next(csv.reader([line]))
    if len(cols) < len(task.columns):
        sep = "tab" if fmt == "tsv" else "comma"
        raise UserError(
            f"{path}:{lineno}: {len(cols)} {sep}-separated columns, expected {len(task.columns)} "
            f"({', '.join(c or '-' for c in task.columns)}); is this the file of {task.name}?"
        )
    return {name: cols[i] for i, name in enumerate(task.columns) if name}


def cached_beside(path: Path, tag: str) -> np.ndarray | None:
    """What `beside` cached for data file `path` under `tag`, if it is current;
    the file itself is not opened."""
    stat = path.stat()
    cache = path.with_name(f".{path.name}.{tag}.npz")
    if cache.is_file():
        try:
            with np.load(cache) as saved:
                if np.array_equal(saved["stamp"], [stat.st_size, stat.st_mtime_ns]):
                    return saved["data"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable: built again
    return None


def beside(path: Path, tag: str, compute) -> np.ndarray:
    """compute()'s array for data file `path`, cached beside it as .<name>.<tag>.npz and rebuilt when the
    file's size or mtime changes (or the cache does not read); not cached where the folder is read-only. `tag`
    names what was computed and how, so two ways of computing keep two caches."""
    found = cached_beside(path, tag)
    if found is not None:
        return found
    stat = path.stat()
    cache = path.with_name(f".{path.name}.{tag}.npz")
    stamp = np.array([stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    data = compute()
    try:
        with atomic_file(cache) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, stamp=stamp, data=data)
    except OSError:
        pass
    return data


def line_index(path: Path) -> np.ndarray:
    """The byte offset of every line of a file, found in one pass of 16 MB reads and cached beside it
    (`beside`). A 530k-row TSV of base64 images is indexed once, then opened in milliseconds."""

    def offsets() -> np.ndarray:
        starts, pos = [np.zeros(1, np.int64)], 0
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                starts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + pos + 1)
                pos += len(chunk)
        found = np.concatenate(starts)
        return found[found < path.stat().st_size]  # no line after the final newline

    return beside(path, "lines", offsets)


def _line_source(task: DefinedTask, fmt: str, layout: dict, root: Path, path: Path) -> LineSource:
    offsets = line_index(path)
    if not len(offsets):
        raise UserError(f"{task.where}.files: {path} is empty; a split needs at least one row")
    return LineSource(task, layout, root, path, offsets, fmt)


def _every_answer(task: DefinedTask, labels: dict, path: Path, rows) -> tuple[str, ...]:
    """The closed set of `candidates: all-answers`: every answer of (where, row) in rows, sorted."""
    answers = set()
    for where, f in rows:
        try:
            answers.add(_answer(task, labels, f))
        except (_BadRow, KeyError) as e:
            raise UserError(
                f"{path}:{where}: {e if isinstance(e, _BadRow) else f'no column {e} in this row'}"
            ) from None
    return tuple(sorted(answers))


def _records(fmt: str, path: Path, which: str):
    """(where, {column: value}) per row of a headed csv / tsv, jsonl, parquet or CoOp split JSON."""
    if fmt in ("csv", "tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh, delimiter="," if fmt == "csv" else "\t"), 2):
                yield str(i), row
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield str(i), json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(
                            f"{path}:{i}: not a JSON line ({e.msg}); one JSON object per line"
                        ) from None
    elif fmt == "coop-json":  # {split: [[image path, label, class name], ...]}
        for i, (image, label, classname) in enumerate(
            _coop_split(path, path.stat().st_mtime_ns).get(which, ())
        ):
            yield f"{which}[{i}]", {"image": image, "label": label, "classname": classname}
    else:
        # only the hub's (parquet) tasks need it; no stage or check loads it else
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for rec in batch.to_pylist():
                row += 1
                yield f"row {row}", rec


@functools.lru_cache(maxsize=4)
def _coop_split(path: Path, mtime: int) -> dict:
    """A CoOp split file (read once per version: each split of a task reads the same file)."""
    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and all(len(r) == 3 for part in data.values() for r in part)
        return data
    except (ValueError, TypeError, AssertionError) as e:
        raise UserError(
            f"{path}: not a CoOp split file ({type(e).__name__}); CoOp's split_zhou_*.json holds "
            "{split: [[image, label, class name], ...]}"
        ) from None


def _class_label_names(path: Path, column: str) -> list[str] | None:
    """The ClassLabel names `datasets` keeps in a parquet's schema metadata for this column, if any."""
    import pyarrow.parquet as pq  # as in _records

    meta = (pq.read_schema(path).metadata or {}).get(b"huggingface")
    feature = json.loads(meta).get("info", {}).get("features", {}).get(column, {}) if meta else {}
    return feature.get("names")


def _record_source(
    task: DefinedTask, fmt: str, layout: dict, root: Path, paths: list[Path], which: str
) -> RecordSource:
    rename, several, class_names = layout["rename"], len(paths) > 1, None
    if fmt == "parquet" and not layout["labels"]:  # integer labels: their ClassLabel names
        column = next((c for c, ours in rename.items() if ours == task.answer), task.answer)
        class_names = _class_label_names(paths[0], column)
        if class_names:
            layout = {**layout, "labels": {str(i): name for i, name in enumerate(class_names)}}
    records, wheres = [], []
    for path in paths:
        for where, rec in _records(fmt, path, which):
            records.append({rename.get(k, k): v for k, v in rec.items()} if rename else rec)
            wheres.append(f"{path.name}:{where}" if several else where)
    if not records:
        raise UserError(
            f"{task.where}.files.{which}: {paths[0]} has no rows; a split needs at least one example"
        )
    source = RecordSource(task, layout, root, paths[0].parent if several else paths[0], records, wheres)
    source.classes = tuple(class_names or ())
    return source


def _resolve(task: DefinedTask, which: str, root: Path) -> list[Path]:
    """The files of a split: a file, a glob or folder of shards, or a local copy of the task's hub repo."""
    rel = task.files[which]
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    if any(c in str(rel) for c in "*?["):
        found = sorted(root.glob(rel))
    elif path.is_dir():
        found = sorted(path.glob("*.parquet"))
    else:
        found = [path] if path.is_file() else []
    if not found and task.hub:  # e.g. data.root is a `hf download` of the hub repo
        base = root / (task.hub.config or "")
        found = sorted(
            p for p in base.rglob("*.parquet") if _is_split_file(str(p.relative_to(base)), task.hub, which)
        )
    if not found:
        fix = task.get or f"write it, or point files.{which} at the file (relative to data.root={root})"
        hint = f", or a `hf download {task.hub.repo} --repo-type dataset` copy there" if task.hub else ""
        raise UserError(f"{task.where}.files.{which}: {path} is missing; {fix}{hint}")
    return found


def _image_rule(task: DefinedTask, layout: dict, root: Path) -> str:
    """The cache tag of a file's image keys: what decides them (the id column and set, or the image column and
    how it is held)."""
    rule = json.dumps(
        [
            layout["image_id"],
            task.image_set,
            task.image,
            layout["image_kind"],
            layout["image_root"],
            task.columns,
            str(Path(root).resolve()),
        ]
        + ([layout["part"]] if layout["part"] else [])
    )
    return f"images-{_digest(rule.encode())[:12]}"


def _layout(task: DefinedTask, fmt: str, which: str) -> dict:
    """How a split's file is read; `part`: the split's key in a file that holds several (CoOp's split JSON),
    so what is cached beside the file is cached per split."""
    return {
        "rename": {},
        "labels": task.labels,
        "image_kind": task.image_kind,
        "image_root": task.image_root,
        "image_id": task.image_id,
        "part": which if fmt == "coop-json" else "",
        **task.per_format.get(fmt, {}),
    }


def cached_image_keys(task: DefinedTask, which: str, root: Path) -> np.ndarray | None:
    """A split's image keys from the cache beside its one file, without opening the file (None: not cached, or
    the split is carved from train or held in shards): what the overlap guard reads of a scored split once a
    stage has keyed it, so that later stages (the choice made on validation) never open the test file."""
    if which not in task.files or (carves_val(task) and which == "val"):
        return None
    paths = _resolve(task, which, Path(root))
    if len(paths) != 1:
        return None
    fmt = FORMATS.get(paths[0].suffix) or task.format
    return cached_beside(paths[0], _image_rule(task, _layout(task, fmt, which), root))


def _open(task: DefinedTask, which: str, root: Path) -> _Source:
    """The rows of a split's file(s), checked: a missing file, an unknown column, an empty split, a first row
    that does not read stop here, in one line naming the field or the row."""
    if which not in task.files:
        raise UserError(f"{task.where} has no '{which}' split; its splits: {', '.join(task.files)}")
    paths = _resolve(task, which, root)
    fmt = FORMATS.get(paths[0].suffix) or task.format
    layout = _layout(task, fmt, which)
    if task.columns and fmt in ("csv", "tsv"):
        source = _line_source(task, fmt, layout, root, paths[0])
    else:
        source = _record_source(task, fmt, layout, root, paths, which)
    first = source.row(0)
    for col, field_name in _columns_used(task).items():
        if col not in first:
            raise UserError(
                f"{task.where}.{field_name}: column '{col}' is not in {source.path} "
                f"(its columns: {', '.join(sorted(first))})"
            )
    source.example(0)  # a file of the wrong kind stops the stage now, not in its first batch
    return source


def carves_val(task: DefinedTask) -> bool:
    """Is the task's val split carved from its train file? Where it has no val file, or one that is also the
    test file (GLUE's and VQA's labelled test is hidden, so their val serves as test); a CoOp split file holds
    each split under its own key."""
    test = task.files["test"]
    return task.files.get("val", test) == test and FORMATS.get(Path(test).suffix, task.format) != "coop-json"


def read_defined(task: DefinedTask, split: str, root: Path, workers: int = 0) -> Rows:
    """Every example of a defined task's split, each decoded when a batch takes it (Rows.sample takes a seeded
    share). Where val is carved from train (carves_val), a seeded share of train's images (of its rows, for a
    text task) is val and the rest train: choices are made apart from what is reported, and no image is in
    both."""
    root = Path(root)
    carve = carves_val(task) and split in ("train", "val")
    source = _open(task, "train" if carve else split, root)
    if task.all_answers:
        source.names = answer_set(task, root)
    index = np.arange(len(source))
    if carve:  # val carved from train, seeded: whole images (every row of an image on one side)
        keys = source.image_keys() if task.image else index
        groups, group_of = np.unique(keys, return_inverse=True)
        m = len(groups)
        val = (
            random.Random(f"{task.name}/val").sample(range(m), max(1, round(task.val_fraction * m)))
            if m > 1
            else []
        )
        in_val = np.zeros(m, dtype=bool)
        in_val[val] = True
        index = np.flatnonzero(in_val[group_of] == (split == "val"))
    return Rows(source, index, workers)


def answer_set(task: DefinedTask, root: Path) -> tuple[str, ...]:
    """The closed set of `candidates: all-answers`: every answer in the task's training file (train, and val
    where carved from it), or every class its parquet schema names; never a scored split's own answers (test's
    would hand its gold answers to the scoring). A headerless file's set is cached beside it."""
    source = _open(task, "train", Path(root))
    if getattr(source, "classes", ()):  # every class, not only those in the rows
        return _every_answer(
            task,
            source.layout["labels"],
            source.path,
            [(f"class {i}", {task.answer: str(i)}) for i in range(len(source.classes))],
        )

    def every() -> np.ndarray:
        return np.array(_every_answer(task, source.layout["labels"], source.path, source.rows()), dtype=str)

    if isinstance(source, LineSource):  # one pass over a file that may hold a million base64 images: once
        rule = json.dumps([task.answer, source.layout["labels"], task.clean.get(task.answer), task.columns])
        return tuple(str(a) for a in beside(source.path, f"answers-{_digest(rule.encode())[:12]}", every))
    return tuple(str(a) for a in every())


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def image_key(text_or_bytes: str | bytes) -> int:
    """An image's key in the overlap guard: 64 bits of a hash of its id
    ('<image_set>:<id>') or of its bytes."""
    data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# ---- the hub ----


def _is_split_file(rel: str, hub, split: str) -> bool:
    """Is rel (under the config's folder) a shard of this split, e.g.
    'validation_matched-00000-of-00001.parquet'?"""
    return (
        rel.endswith(".parquet") and re.search(rf"(^|/){re.escape(hub.splits[split])}[-/.]", rel) is not None
    )


def fetch_hub(task: DefinedTask, split: str, root: Path) -> list[Path]:
    """Download a split's parquet shards from the task's hub dataset into root
    (where read_defined finds them)."""
    if task.hub is None:
        raise UserError(f"{task.name} has no hub dataset; {task.get}")
    hub = task.hub
    if split not in hub.splits:
        raise UserError(
            f"{task.name} has no '{split}' split on {hub.repo}; its splits: {', '.join(hub.splits)}"
        )
    fix = (
        f"download it where there is network (`hf download {hub.repo} --repo-type dataset --local-dir DIR`) "
        f"and set data.root=DIR"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):  # no request at all
        raise UserError(f"cannot fetch {hub.repo} ({task.name}): HF_HUB_OFFLINE is set; {fix}")
    try:
        from huggingface_hub import HfApi, hf_hub_download  # looked up here: test_readers replaces them

        prefix = f"{hub.config}/" if hub.config else ""
        files = sorted(
            f
            for f in HfApi().list_repo_files(hub.repo, repo_type="dataset")
            if f.startswith(prefix) and _is_split_file(f[len(prefix) :], hub, split)
        )
        if not files:
            raise UserError(f"{hub.repo}: no parquet files for split '{hub.splits[split]}' under '{prefix}'")
        return [Path(hf_hub_download(hub.repo, f, repo_type="dataset", local_dir=str(root))) for f in files]
    except UserError:
        raise
    except Exception as e:  # offline, DNS, HTTP, auth: all mean "get it some other way"
        raise UserError(f"cannot fetch {hub.repo} ({task.name}: {type(e).__name__}); {fix}") from None
