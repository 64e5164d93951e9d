"""Real tasks read from files: the catalogue of the paper's task pool, OFA TSV / CoOp JSON / parquet readers,
Florence-2 location tokens and CoOp-style k-shot sampling.

Every reader returns `common.data.Example`s with the OFA prompts and answers of ../shared/PI_TUNING.md, so the
stages run on real data exactly as on the mini world. Column orders and prompts follow OFA-Sys/OFA
(`data/mm_data/*_dataset.py`, `data/nlu_data/*_dataset.py`, `data/cv_data/image_classify_dataset.py` and the
`--selected-cols` of `run_scripts/*`); the few-shot image datasets follow CoOp's `split_zhou_*.json` files.
"""
from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common.config import UserError
from common.tasks import DefinedTask, Example, k_shot  # noqa: F401  (k_shot: the readers' sampling)

YNM = ("yes", "no", "maybe")
YN = ("yes", "no")
LOC_BINS = 1000  # Florence-2's <loc_0>..<loc_999>


@dataclass(frozen=True)
class Hub:
    """A parquet dataset on the Hugging Face hub, and how its columns and labels map onto ours."""
    repo: str
    config: str | None
    splits: dict  # our split -> the hub's split name
    columns: dict  # hub column -> our field name
    labels: dict = field(default_factory=dict)  # hub label value -> answer


@dataclass(frozen=True)
class RealTask:
    """A task of the paper's pool on real data: where its files are, how a row becomes an Example, its metric."""
    name: str
    family: str  # vision-language | vision | language
    format: str  # what the default files are: ofa-tsv | coop-json
    kind: str  # row layout: snli-ve | vqa | caption | refexp | classify | glue
    files: dict  # split -> file under data.root (.tsv, .json, .parquet, a parquet folder or a glob)
    metric: str  # accuracy | vqa_accuracy | acc_iou | cider
    candidates: tuple[str, ...] | None  # closed answer set; None = open-ended, or class names read from the data
    columns: tuple[str, ...] = ()  # OFA TSV: our field name for each column ("" = unused)
    labels: dict = field(default_factory=dict)  # raw label in the local files -> answer
    prompt: str = ""  # GLUE: the prompt over the fields {s1}, {s2}
    image_dir: str = ""  # CoOp: the folder the split JSON's image paths are relative to
    hub: Hub | None = None
    get: str = ""  # where the default files come from (for the missing-file message)


def _ofa(name: str, split_files: dict) -> dict:
    """The default files of a task OFA ships as <name>_data.zip."""
    return dict(format="ofa-tsv", files={s: f"{name}_data/{f}" for s, f in split_files.items()},
                get=f"unzip OFA's {name}_data.zip (OFA-Sys/OFA datasets.md) under data.root")


def _refcoco(name: str, data: str, test: str) -> RealTask:
    """OFA refcoco_dataset.py + run_scripts/refcoco (--selected-cols 0,4,2,3); region = 'x0,y0,x1,y1' pixels."""
    return RealTask(name, "vision-language", kind="refexp", metric="acc_iou", candidates=None,
                    columns=("id", "", "text", "region", "image"),
                    **_ofa(data, {"train": f"{data}_train.tsv", "val": f"{data}_val.tsv",
                                  "test": f"{data}_{test}.tsv"}))


# GLUE: OFA data/nlu_data/<task>_dataset.py (prompts, label maps) + run_scripts/glue/train_<task>.sh (--selected-cols);
# the hub copy is nyu-mll/glue. GLUE's test labels are hidden, so dev is the test split (as OFA reports it).
_GLUE = {  # name: (prompt, OFA TSV columns, OFA labels, hub columns, hub labels, candidates)
    "cola": (' is the text " {s1} " grammatically correct?', ("", "s1", "label"), {"0": "no", "1": "yes"},
             {"sentence": "s1"}, {0: "no", 1: "yes"}, YN),
    "sst2": (' is the sentiment of text " {s1} " positive or negative?', ("s1", "label"),
             {"0": "negative", "1": "positive"}, {"sentence": "s1"}, {0: "negative", 1: "positive"},
             ("positive", "negative")),
    "mrpc": (' does text1 " {s1} " and text2 " {s2} " have the same semantics?', ("s1", "s2", "label"),
             {"0": "no", "1": "yes"}, {"sentence1": "s1", "sentence2": "s2"}, {0: "no", 1: "yes"}, YN),
    "qqp": (' is question " {s1} " and question " {s2} " equivalent?', ("", "", "", "s1", "s2", "label"),
            {"0": "no", "1": "yes"}, {"question1": "s1", "question2": "s2"}, {0: "no", 1: "yes"}, YN),
    "mnli": (' can text1 " {s1} " imply text2 " {s2} "?', ("s1", "s2", "label"),
             {"0": "maybe", "1": "yes", "2": "no"},  # OFA's own TSV coding, not the hub's
             {"premise": "s1", "hypothesis": "s2"}, {0: "yes", 1: "maybe", 2: "no"}, YNM),
    "qnli": (' does " {s2} " contain the answer to question " {s1} "?', ("", "s1", "s2", "label"),
             {"0": "no", "1": "yes", "not_entailment": "no", "entailment": "yes"},
             {"question": "s1", "sentence": "s2"}, {0: "yes", 1: "no"}, YN),
    "rte": (' can text1 " {s1} " imply text2 " {s2} "?', ("", "s1", "s2", "label"),
            {"not_entailment": "no", "entailment": "yes"},
            {"sentence1": "s1", "sentence2": "s2"}, {0: "yes", 1: "no"}, YN),
}


def _glue(name, prompt, columns, labels, hub_columns, hub_labels, candidates) -> RealTask:
    dev = "validation_matched" if name == "mnli" else "validation"
    return RealTask(name, "language", format="ofa-tsv", kind="glue", metric="accuracy", candidates=candidates,
                    files={"train": f"glue_data/{name}_train.tsv", "val": f"glue_data/{name}_dev.tsv",
                           "test": f"glue_data/{name}_dev.tsv"},
                    columns=columns, labels=labels, prompt=prompt,
                    hub=Hub("nyu-mll/glue", name, {"train": "train", "val": dev, "test": dev}, hub_columns, hub_labels),
                    get=f"put OFA's GLUE TSVs (glue_data/{name}_data.zip) in glue_data/ under data.root")


# CoOp's few-shot datasets (KaiyangZhou/CoOp datasets/*.py): folder, split JSON, image folder
_COOP = {
    "caltech101": ("caltech-101", "Caltech101", "101_ObjectCategories"),
    "dtd": ("dtd", "DescribableTextures", "images"),
    "eurosat": ("eurosat", "EuroSAT", "2750"),
    "food101": ("food-101", "Food101", "images"),
    "oxford-flowers": ("oxford_flowers", "OxfordFlowers", "jpg"),
    "oxford-pets": ("oxford_pets", "OxfordPets", "images"),
    "stanford-cars": ("stanford_cars", "StanfordCars", ""),
    "sun397": ("sun397", "SUN397", "SUN397"),
    "ucf101": ("ucf101", "UCF101", "UCF-101-midframes"),
}


def _coop(name: str, folder: str, split_json: str, images: str) -> RealTask:
    return RealTask(name, "vision", format="coop-json", kind="classify", metric="accuracy", candidates=None,
                    files={s: f"{folder}/split_zhou_{split_json}.json" for s in ("train", "val", "test")},
                    image_dir=f"{folder}/{images}".rstrip("/"),
                    get=f"prepare {folder}/ under data.root as CoOp's DATASETS.md says (split_zhou_{split_json}.json)")


REAL_TASKS: dict[str, RealTask] = {t.name: t for t in [
    # OFA snli_ve_dataset.py + run_scripts/snli_ve (--selected-cols 0,2,3,4,5)
    RealTask("snli-ve", "vision-language", kind="snli-ve", metric="accuracy", candidates=YNM,
             columns=("id", "", "image", "hypothesis", "caption", "label"),
             labels={"entailment": "yes", "contradiction": "no", "neutral": "maybe"},
             image_dir="flickr30k-images",  # only for SNLI-VE's own .jsonl annotations (data.files)
             **_ofa("snli_ve", {"train": "snli_ve_train.tsv", "val": "snli_ve_dev.tsv", "test": "snli_ve_test.tsv"})),
    # OFA vqa_gen_dataset.py + run_scripts/vqa (--selected-cols 0,5,2,3,4); test-dev answers are hidden, so
    # OFA's 10k val split is the test split here
    RealTask("vqa", "vision-language", kind="vqa", metric="vqa_accuracy", candidates=None,
             columns=("id", "", "question", "answers", "objects", "image"),
             **_ofa("vqa", {"train": "vqa_train.tsv", "val": "vqa_val.tsv", "test": "vqa_val.tsv"})),
    # OFA caption_dataset.py + run_scripts/caption (--selected-cols 0,4,2); val/test hold all captions joined by &&
    RealTask("caption", "vision-language", kind="caption", metric="cider", candidates=None,
             columns=("id", "", "caption", "objects", "image"),
             **_ofa("caption", {"train": "caption_stage1_train.tsv", "val": "caption_val.tsv",
                                "test": "caption_test.tsv"})),
    _refcoco("refcoco", "refcoco", "testA"),
    _refcoco("refcoco+", "refcocoplus", "testA"),
    _refcoco("refcocog", "refcocog", "test"),
    *[_glue(name, *spec) for name, spec in _GLUE.items()],
    # OFA image_classify_dataset.py + run_scripts/image_classify (--selected-cols 0,2)
    RealTask("imagenet", "vision", kind="classify", metric="accuracy", candidates=None,
             columns=("image", "", "label"),
             **_ofa("imagenet_1k", {"train": "imagenet_1k_train.tsv", "val": "imagenet_1k_val_subset.tsv",
                                    "test": "imagenet_1k_val.tsv"})),
    *[_coop(name, *spec) for name, spec in _COOP.items()],
]}


def get_real_task(name: str) -> RealTask:
    """A task of the catalogue, or one line naming the known ones."""
    if name not in REAL_TASKS:
        raise UserError(f"unknown real task '{name}'; known: {', '.join(REAL_TASKS)}")
    return REAL_TASKS[name]


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


# ---- rows -> Examples ----

def _clean(text: str) -> str:
    """OFA's pre_caption/pre_question: lower case, no leading punctuation, '-' and '/' as spaces, single spaces."""
    text = text.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    return " ".join(text.split())


_PUNCT = re.compile(r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]")


def _caption(text: str) -> str:
    """OFA strips punctuation from captions (caption_dataset.py); lower-cased as coco-caption scores them."""
    return " ".join(_PUNCT.sub("", text).lower().split())


def _image(raw) -> Image.Image:
    """A PIL RGB image from base64 text (OFA: urlsafe), raw bytes or a {'bytes': ...} struct."""
    if isinstance(raw, dict):
        raw = raw.get("bytes")
    if isinstance(raw, str):
        raw = base64.urlsafe_b64decode(raw)
    return Image.open(io.BytesIO(raw)).convert("RGB")


def _vqa_refs(raw) -> tuple[str, ...]:
    """The human answers, repeats included: a list, a list of {'answer': ...}, or OFA's 'conf|!+answer&&...'."""
    if not isinstance(raw, str):
        return tuple(a["answer"] if isinstance(a, dict) else str(a) for a in raw)
    refs = []
    for item in raw.split("&&"):
        conf, answer = item.split("|!+")
        # OFA's conf is the VQA score 0.3/0.6/0.9/1.0 of 1/2/3/>=4 of 10 humans; rebuild that many answers
        refs += [answer] * (4 if float(conf) >= 1 else max(1, round(float(conf) * 10 / 3)))
    return tuple(refs) + ("",) * (10 - len(refs))  # "" = a human answer no prediction matches


def _make(task: RealTask, f: dict, labels: dict, class_names: tuple | None) -> Example:
    """One Example from a row's named fields."""
    kind = task.kind
    if kind == "glue":
        texts = {k: " ".join(str(f[k]).lower().split()) for k in ("s1", "s2") if k in f}  # OFA lower-cases GLUE
        return Example(task.prompt.format(**texts), labels[_label_key(f["label"])])
    img = _image(f["image"])
    if kind == "snli-ve":
        hyp = _clean(f["hypothesis"])
        return Example(f' does the image describe " {hyp} "?', labels[_label_key(f["label"])], np.asarray(img))
    if kind == "vqa":
        q, refs = _clean(f["question"]), _vqa_refs(f["answers"])
        answer = Counter(r for r in refs if r).most_common(1)[0][0]  # OFA trains on the most confident answer
        return Example(" " + (q if q.endswith("?") else q + "?"), answer, np.asarray(img), refs=refs)
    if kind == "caption":
        caps = f["caption"].split("&&") if isinstance(f["caption"], str) else list(f["caption"])
        refs = tuple(_caption(c) for c in caps)
        return Example(" what does the image describe?", refs[0], np.asarray(img), refs=refs)
    if kind == "refexp":
        region = f["region"].split(",") if isinstance(f["region"], str) else f["region"]
        box = box_to_tokens([float(v) for v in region], *img.size)
        return Example(f' which region does the text " {_clean(f["text"])} " describe?', box, np.asarray(img))
    if kind == "classify":
        label = f["label"]
        name = class_names[label] if isinstance(label, (int, np.integer)) else _class_name(label)
        return Example(" what does the image describe?", name, np.asarray(img), candidates=class_names)
    raise ValueError(f"unknown task kind {kind}")


def _label_key(v):
    return int(v) if isinstance(v, (int, np.integer)) else str(v).strip()


def _class_name(raw) -> str:
    return str(raw).replace("_", " ").strip()  # CoOp prompts with '_' as spaces


def _guarded(task: RealTask, path: Path, where, f: dict, labels: dict, names) -> Example:
    """_make, with a bad image or label turned into one line naming the file and the row."""
    try:
        return _make(task, f, labels, names)
    except (binascii.Error, ValueError, OSError) as e:  # PIL's UnidentifiedImageError is an OSError
        why = " ".join(f"{type(e).__name__}: {e}".split())[:80]
        raise UserError(f"{path}:{where}: unreadable image or field ({why})") from None
    except (KeyError, IndexError) as e:
        raise UserError(f"{path}:{where}: unexpected label or missing field {e} for {task.name}") from None


# ---- files ----

def _tsv_rows(path: Path, columns: tuple[str, ...]):
    """(line number, {field: text}) per line, streamed: a large TSV is never loaded whole."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) < len(columns):
                raise UserError(f"{path}:{lineno}: {len(cols)} tab-separated columns, expected {len(columns)} "
                                f"({', '.join(c or '-' for c in columns)}); is this the OFA file for this task?")
            yield lineno, {name: cols[i] for i, name in enumerate(columns) if name}


def line_index(path: Path) -> np.ndarray:
    """The byte offset of every line of a file, found in one pass of 16 MB reads and cached beside it
    (.<name>.lines.npy, rebuilt when the file's size or mtime changes; not cached where the folder is
    read-only). A 530k-row TSV of base64 images is indexed once, then opened in milliseconds."""
    stat = path.stat()
    cache = path.with_name(f".{path.name}.lines.npy")
    if cache.is_file():
        try:
            saved = np.load(cache)
            if saved[0] == stat.st_size and saved[1] == stat.st_mtime_ns:
                return saved[2:]
        except (OSError, ValueError):
            pass  # unreadable: built again
    starts, pos = [np.zeros(1, np.int64)], 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            starts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(chunk)
    offsets = np.concatenate(starts)
    offsets = offsets[offsets < stat.st_size]  # no line after the final newline
    try:
        from common.artifacts import atomic_file

        with atomic_file(cache) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.concatenate([[stat.st_size, stat.st_mtime_ns], offsets]).astype(np.int64))
    except OSError:
        pass
    return offsets


class Rows(Sequence):
    """A split's examples, each decoded when asked for (rows[i]; a batch takes its own): what is held is the
    source's rows (an OFA TSV: one byte offset each; other files: each row's fields as read, its image a
    path or still encoded) and which of them this view takes. Slices are views (rows[r::world], rows[:n]);
    answers() reads the answer alone (the k-per-class sample of tasks.shots_per_class), no image decoded.
    Picklable (each process opens its own file)."""

    def __init__(self, source, index: np.ndarray):
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Rows(self.source, self.index[i])
        return self.source.example(int(self.index[i]))

    def __mul__(self, times: int) -> "Rows":
        return Rows(self.source, np.tile(self.index, times))

    def answers(self) -> list[str]:
        return [self.source.answer(int(j)) for j in self.index]

    def texts(self) -> list[Example]:
        """Each row without its image (a defined task's: no image read), for what looks at the words only."""
        text = getattr(self.source, "text", self.source.example)
        return [text(int(j)) for j in self.index]


class _Source:
    """Where a catalogue task's rows come from (for Rows): row(j), row j's named fields as held (an image still
    encoded, or the path of its file), fields(j), the same with the image's bytes, and where(j), the row as an
    error names it."""
    task: RealTask
    path: Path
    labels: dict
    names: tuple | None

    def fields(self, j: int) -> dict:
        return self.row(j)

    def example(self, j: int) -> Example:
        return _guarded(self.task, self.path, self.where(j), self.fields(j), self.labels, self.names)

    def answer(self, j: int) -> str:
        f = self.row(j)  # no image read or decoded where the answer is a label
        if self.task.kind == "classify":
            return self.names[f["label"]] if isinstance(f["label"], (int, np.integer)) else _class_name(f["label"])
        if "label" in f:
            return self.labels[_label_key(f["label"])]
        return self.example(j).answer


class RecordSource(_Source):
    """Rows read into memory as their fields (text, labels; an image as the path of its file, or as its encoded
    bytes): a row's image file is read, and any image decoded, when a batch takes the row."""

    def __init__(self, task: RealTask, path: Path, records: list[dict], wheres: list, labels: dict,
                 names: tuple | None = None):
        self.task, self.path, self.records, self.wheres = task, path, records, wheres
        self.labels, self.names = labels, names

    def row(self, j: int) -> dict:
        return self.records[j]

    def fields(self, j: int) -> dict:
        f = self.records[j]
        return {**f, "image": Path(f["image_path"]).read_bytes()} if "image_path" in f else f

    def where(self, j: int):
        return self.wheres[j]


class TsvSource(_Source):
    """An OFA TSV read by line offset: row j is line j + 1."""

    def __init__(self, task: RealTask, path: Path, offsets: np.ndarray, names: tuple | None):
        self.task, self.path, self.offsets, self.names, self.labels = task, path, offsets, names, task.labels
        self._fh, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_fh": None}  # each process opens its own handle

    def fields(self, j: int) -> dict:
        if self._fh is None or self._pid != os.getpid():  # a forked DataLoader worker: not its parent's offset
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(self.offsets[j])
        cols = self._fh.readline().decode("utf-8").rstrip("\r\n").split("\t")
        columns = self.task.columns
        if len(cols) < len(columns):
            raise UserError(f"{self.path}:{j + 1}: {len(cols)} tab-separated columns, expected {len(columns)} "
                            f"({', '.join(c or '-' for c in columns)}); is this the OFA file for this task?")
        return {name: cols[i] for i, name in enumerate(columns) if name}

    def where(self, j: int) -> int:
        return j + 1

    def row(self, j: int) -> dict:
        return self.fields(j)


def _read_tsv(task: RealTask, path: Path, n: int | None) -> Rows:
    """The split's rows, decoded when a batch needs them (the file is indexed, not read)."""
    offsets = line_index(path)
    if not len(offsets):
        raise UserError(f"{path}: empty file; a split needs at least one row")
    names = None
    if task.kind == "classify":  # every class in the file: one pass over the text, nothing kept but the names
        names = tuple(sorted({_class_name(f["label"]) for _, f in _tsv_rows(path, task.columns)}))
    source = TsvSource(task, path, offsets, names)
    source.fields(0)  # the first row's columns checked now, not in the first batch
    return Rows(source, np.arange(len(offsets) if n is None else min(n, len(offsets))))


def _read_snli_ve_jsonl(task: RealTask, path: Path, root: Path, n: int | None) -> Rows:
    """SNLI-VE's own annotations (snli_ve_<split>.jsonl: Flikr30kID, sentence2, gold_label) + a Flickr30k image dir:
    the annotations read, each image's file found, and read when a batch takes its row."""
    images, records, wheres = root / (task.image_dir or "flickr30k-images"), [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(itertools.islice(fh, n), 1):
            try:
                row = json.loads(line)
                image = images / row["Flikr30kID"]  # sic: the dataset's own spelling
                f = {"hypothesis": row["sentence2"], "label": row["gold_label"]}
            except (ValueError, KeyError) as e:
                raise UserError(f"{path}:{lineno}: not an SNLI-VE annotation line ({type(e).__name__}: {e})") from None
            if not image.is_file():
                raise UserError(f"{image}: missing Flickr30k image for {path.name}:{lineno}; put flickr30k-images/ "
                                f"under data.root (or set the task's image folder)")
            records.append({**f, "image_path": str(image)})
            wheres.append(lineno)
    return _rows(RecordSource(task, path, records, wheres, task.labels))


def _read_coop(task: RealTask, path: Path, split: str, root: Path, n: int | None) -> Rows:
    """CoOp's split_zhou_*.json: {split: [[image path, label, class name], ...]}, images under task.image_dir,
    each read when a batch takes its row."""
    try:
        data = json.loads(path.read_text())
        names_by_label = {int(lab): _class_name(c) for part in data.values() for _, lab, c in part}
        rows = data[split]
    except (ValueError, KeyError, TypeError) as e:
        why = type(e).__name__
        raise UserError(f"{path}: not a CoOp split file with a '{split}' list ({why}); {task.get}") from None
    names = tuple(names_by_label[k] for k in sorted(names_by_label))
    records = []
    for i, (impath, lab, _) in enumerate(rows[:n]):
        image = root / task.image_dir / impath
        if not image.exists():
            raise UserError(f"{image}: missing image ({split}[{i}] of {path}); {task.get}")
        records.append({"image_path": str(image), "label": int(lab)})
    return _rows(RecordSource(task, path, records, [f"{split}[{i}]" for i in range(len(records))], {}, names))


def _read_parquet(task: RealTask, paths: list[Path], n: int | None) -> Rows:
    """Hub-style parquet shards, streamed in batches; columns renamed by task.hub, images as {'bytes': ...}, kept
    encoded and decoded when a batch takes their row."""
    import pyarrow.parquet as pq

    rename = task.hub.columns if task.hub else {}
    labels = task.hub.labels if task.hub and task.hub.labels else task.labels
    names = _parquet_class_names(task, paths) if task.kind == "classify" else None
    records, wheres, several = [], [], len(paths) > 1

    def full() -> bool:
        return n is not None and len(records) >= n

    for path in paths:
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for rec in batch.to_pylist():
                row += 1
                if full():
                    break
                f = {rename.get(k, k): v for k, v in rec.items()}
                if task.kind == "glue" and f.get("label") == -1:
                    raise UserError(f"{path}: row {row} has no label (GLUE test labels are hidden); "
                                    "use the validation split")
                records.append(f)
                wheres.append(f"{path.name} row {row}" if several else f"row {row}")
            if full():
                break
    return _rows(RecordSource(task, paths[0].parent if several else paths[0], records, wheres, labels, names))


def _rows(source: RecordSource) -> Rows:
    """Every row of a source; its first row decoded now, so that a file of the wrong kind stops the stage at once."""
    if not source.records:
        raise UserError(f"{source.path}: no rows; a split needs at least one example")
    source.example(0)
    return Rows(source, np.arange(len(source.records)))


def _parquet_class_names(task: RealTask, paths: list[Path]) -> tuple[str, ...]:
    """Class names: the ClassLabel names `datasets` keeps in the schema metadata, else every label in the column."""
    import pyarrow.parquet as pq

    column = next((h for h, ours in (task.hub.columns if task.hub else {}).items() if ours == "label"), "label")
    meta = (pq.read_schema(paths[0]).metadata or {}).get(b"huggingface")
    feature = json.loads(meta).get("info", {}).get("features", {}).get(column, {}) if meta else {}
    if "names" in feature:
        return tuple(_class_name(c) for c in feature["names"])
    values = {v for p in paths for v in pq.read_table(p, columns=[column]).column(0).to_pylist()}
    if any(isinstance(v, int) for v in values):
        raise UserError(f"{paths[0]}: integer labels in '{column}' without ClassLabel names in the parquet metadata")
    return tuple(sorted(_class_name(v) for v in values))


def _resolve(task: RealTask, split: str, root: Path) -> list[Path]:
    """The files of a split: the task's default file, a glob or folder of shards, or a local copy of its hub repo."""
    if split not in task.files:
        raise UserError(f"{task.name} has no '{split}' split; its splits: {', '.join(task.files)}")
    rel = task.files[split]
    path = root / rel
    if any(c in rel for c in "*?["):
        found = sorted(root.glob(rel))
    elif path.is_dir():
        found = sorted(path.glob("*.parquet"))
    else:
        found = [path] if path.exists() else []
    if not found and task.hub:  # e.g. data.root is a `hf download` of the hub repo
        base = root / (task.hub.config or "")
        found = sorted(p for p in base.rglob("*.parquet") if _is_split_file(str(p.relative_to(base)), task.hub, split))
    if not found:
        hint = f", or a `hf download {task.hub.repo} --repo-type dataset` copy there" if task.hub else ""
        raise UserError(f"{path}: missing {task.name} {split} data; {task.get}{hint}")
    return found


def read_examples(task: RealTask, split: str, root: Path, n: int | None = None) -> list[Example]:
    """The first n examples (all if n is None) of a split, from root / task.files[split]."""
    paths = _resolve(task, split, Path(root))
    suffix = paths[0].suffix
    if suffix == ".tsv":
        return _read_tsv(task, paths[0], n)
    if suffix == ".json":
        return _read_coop(task, paths[0], split, Path(root), n)
    if suffix == ".jsonl" and task.kind == "snli-ve":
        return _read_snli_ve_jsonl(task, paths[0], Path(root), n)
    if suffix == ".parquet":
        return _read_parquet(task, paths, n)
    raise UserError(f"{paths[0]}: unknown data format '{suffix}' (expected .tsv, .json, .parquet; .jsonl for snli-ve)")


# ---- the hub ----

def _is_split_file(rel: str, hub: Hub, split: str) -> bool:
    """Is rel (under the config's folder) a shard of this split, e.g. 'validation_matched-00000-of-00001.parquet'?"""
    return rel.endswith(".parquet") and re.search(rf"(^|/){re.escape(hub.splits[split])}[-/.]", rel) is not None


def fetch_hub(task: RealTask, split: str, root: Path) -> list[Path]:
    """Download a split's parquet shards from the task's hub dataset into root (where read_examples finds them)."""
    if task.hub is None:
        raise UserError(f"{task.name} has no hub dataset; {task.get}")
    hub = task.hub
    if split not in hub.splits:
        raise UserError(f"{task.name} has no '{split}' split on {hub.repo}; its splits: {', '.join(hub.splits)}")
    fix = (f"download it where there is network (`hf download {hub.repo} --repo-type dataset --local-dir DIR`) "
           f"and set data.root=DIR")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):  # no request at all
        raise UserError(f"cannot fetch {hub.repo} ({task.name}): HF_HUB_OFFLINE is set; {fix}")
    try:
        from huggingface_hub import HfApi, hf_hub_download

        prefix = f"{hub.config}/" if hub.config else ""
        files = sorted(f for f in HfApi().list_repo_files(hub.repo, repo_type="dataset")
                       if f.startswith(prefix) and _is_split_file(f[len(prefix):], hub, split))
        if not files:
            raise UserError(f"{hub.repo}: no parquet files for split '{hub.splits[split]}' under '{prefix}'")
        return [Path(hf_hub_download(hub.repo, f, repo_type="dataset", local_dir=str(root))) for f in files]
    except UserError:
        raise
    except Exception as e:  # offline, DNS, HTTP, auth: all mean "get it some other way"
        raise UserError(f"cannot fetch {hub.repo} ({task.name}: {type(e).__name__}); {fix}") from None


# ---- k-shot sampling ----


# ---- tasks defined in YAML (common.tasks.DefinedTask) ----

def _defined_rows(task: DefinedTask, path: Path):
    """(where, {column: value}) per row of a csv / tsv / jsonl / parquet file."""
    import csv

    if task.format in ("csv", "tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh, delimiter="," if task.format == "csv" else "\t"), 2):
                yield f"line {i}", row
    elif task.format == "jsonl":
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield f"line {i}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{i}: not a JSON line ({e.msg}); one JSON object per line") from None
    else:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for rec in batch.to_pylist():
                row += 1
                yield f"row {row}", rec


def _columns_used(task: DefinedTask) -> dict[str, str]:
    """column -> the definition field that names it."""
    import string

    used = {c: "prompt" for _, c, _, _ in string.Formatter().parse(task.prompt) if c}
    for field_name in ("answer", "image", "refs", "candidates_column"):
        if getattr(task, field_name):
            used[getattr(task, field_name)] = field_name.replace("_column", "")
    return used


def _several(raw) -> tuple[str, ...]:
    return tuple(str(v) for v in raw) if isinstance(raw, (list, tuple)) else tuple(str(raw).split("|"))


def _defined_text(task: DefinedTask, f: dict) -> Example:
    """A defined task's row without its image: prompt, answer, candidates, references."""
    answer = str(f[task.answer]).strip()
    refs = tuple(task.labels.get(r, r) for r in _several(f[task.refs])) if task.refs else None
    cands = _several(f[task.candidates_column]) if task.candidates_column else None
    return Example(task.prompt.format(**f), task.labels.get(answer, answer), None, candidates=cands, refs=refs)


def _defined_example(task: DefinedTask, root: Path, f: dict) -> Example:
    ex = _defined_text(task, f)
    if not task.image:
        return ex
    raw = f[task.image]
    if task.image_kind == "path":
        raw = (root / task.image_root / str(raw)).read_bytes()
    img = np.array(_image(raw))  # a writable copy (torch warns on a read-only array)
    return Example(ex.prompt, ex.answer, img, candidates=ex.candidates, refs=ex.refs)


class DefinedSource:
    """A defined task's rows as read (its columns; an image as a path under image_root, base64 text or bytes),
    each made into an Example, its image read and decoded, when a batch takes it (for Rows)."""

    def __init__(self, task: DefinedTask, root: Path, path: Path, records: list[dict], wheres: list[str]):
        self.task, self.root, self.path, self.records, self.wheres = task, root, path, records, wheres

    def example(self, j: int) -> Example:
        return self._read(_defined_example, self.task, self.root, self.records[j], where=self.wheres[j])

    def text(self, j: int) -> Example:
        """Row j without its image (no file read)."""
        return self._read(_defined_text, self.task, self.records[j], where=self.wheres[j])

    def answer(self, j: int) -> str:
        return self.text(j).answer

    def _read(self, make, *args, where: str) -> Example:
        try:
            return make(*args)
        except FileNotFoundError as e:
            raise UserError(f"{self.path}:{where}: missing image file {e.filename}") from None
        except OSError as e:  # an unreadable image
            raise UserError(f"{self.path}:{where}: unreadable image ({' '.join(str(e).split())[:100]})") from None
        except (binascii.Error, ValueError) as e:
            raise UserError(f"{self.path}:{where}: unreadable field ({' '.join(str(e).split())[:100]})") from None


def read_defined(task: DefinedTask, split: str, root: Path, n: int | None = None) -> Rows:
    """The first n examples of a defined task's split, each decoded when a batch takes it; with no val file,
    val is a seeded share of train (and train the rest). A missing file, an unknown column, an empty split, a
    first row that does not read: one line naming the field or the row."""
    root = Path(root)
    which = split if split in task.files else "train"
    path = Path(task.files[which]) if Path(task.files[which]).is_absolute() else root / task.files[which]
    if not path.is_file():
        raise UserError(f"{task.where}.files.{which}: {path} is missing; write it, or point files.{which} at "
                        f"the file (relative to data.root={root})")
    records, wheres, columns = [], [], None
    for where, f in _defined_rows(task, path):
        if columns is None:
            columns = set(f)
            for col, field_name in _columns_used(task).items():
                if col not in columns:
                    raise UserError(f"{task.where}.{field_name}: column '{col}' is not in {path} "
                                    f"(its columns: {', '.join(sorted(columns))})")
        records.append(f)
        wheres.append(where)
        if n is not None and split not in ("train", "val") and len(records) >= n:
            break
    if not records:
        raise UserError(f"{task.where}.files.{which}: {path} has no rows; a split needs at least one example")
    source, index = DefinedSource(task, root, path, records, wheres), np.arange(len(records))
    source.example(0)  # a file of the wrong kind stops the stage now, not in its first batch
    if which != split or ("val" not in task.files and split == "train"):  # val carved from train, seeded
        rng = random.Random(f"{task.name}/val")
        m = len(records)
        val = set(rng.sample(range(m), max(1, round(task.val_fraction * m)))) if m > 1 else set()
        index = np.array([i for i in range(m) if (i in val) == (split == "val")], dtype=np.int64)
    return Rows(source, index[:n] if n is not None else index)
