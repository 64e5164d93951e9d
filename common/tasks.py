"""Tasks and examples, one home for every source: the mini world (common/data.py) and the tasks defined in
YAML over files (a profile's own, and the paper's catalogue, configs/paper_tasks.yaml; both read by
common/readers.py). An example is (optional image, prompt) -> answer text; a task names its family, answer set
and metric. Also the seeded k-shot samples."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.errors import UserError


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    image: np.ndarray | None = None
    candidates: tuple[str, ...] | None = None  # per-example answer set (else the task's)
    refs: tuple[str, ...] | None = None  # all reference answers (VQA's human answers, every caption)


@dataclass(frozen=True)
class Task:
    name: str
    family: str  # vision-language | vision | language | pretraining
    make: Callable[[random.Random, int], Example]  # (rng, image_size) -> one example
    candidates: tuple[str, ...] | None  # closed answer set; None = open-ended (token accuracy)


def k_shot(exs: list[Example], k: int, seed: int, per_class: bool) -> list[Example]:
    """The one seeded k-shot sample (a target's low-shot training split): k examples in all, in the order
    drawn (the mini profile's draws), or, CoOp style, k of each answer class (per_class),
    in the input's order."""
    if k <= 0 or (k >= len(exs) and not per_class):
        return exs[:]  # a list's copy; lazily read rows (readers.Rows) stay a view
    rng = random.Random(seed)
    if not per_class:
        return [exs[i] for i in rng.sample(range(len(exs)), k)]  # = rng.sample(exs, k), without a copy of exs
    by_class = defaultdict(list)
    answers = exs.answers() if hasattr(exs, "answers") else [e.answer for e in exs]  # Rows: no image decoded
    for i, a in enumerate(answers):
        by_class[a].append(i)
    # classes in sorted order, so the draw does not depend on which class the data happens to list first
    picked = [i for c in sorted(by_class) for i in rng.sample(by_class[c], min(k, len(by_class[c])))]
    return [exs[i] for i in sorted(picked)]


def holdout_split(exs: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A target's training examples split for stacking (interpolate.holdout): (the rest, in order; a seeded
    `fraction` of them, held out), at least one in each."""
    n = len(exs)
    held = set(random.Random(f"holdout-{seed}").sample(range(n), min(max(round(fraction * n), 1), n - 1)))
    return [exs[i] for i in range(n) if i not in held], [exs[i] for i in sorted(held)]


# ---- tasks defined in YAML: a profile's own (tasks.define.<name>) and the paper's catalogue
# (configs/paper_tasks.yaml), read from files by common/readers.py ----
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".tsv": "tsv", ".parquet": "parquet", ".json": "coop-json"}
IMAGE_KINDS = ("path", "base64", "bytes")
METRICS = ("accuracy", "vqa_accuracy", "cider", "acc_iou", "exact_match")
FAMILIES = ("vision-language", "vision", "language")
CLEANERS = ("ofa", "ofa-question", "lower", "caption", "class")
ALL_ANSWERS = "all-answers"
DEFINE_FIELDS = {  # field: what it is, for the one-line errors
    "files": "split -> file under data.root, a glob or a folder of parquet shards (train and test; val "
    "optional: carved from train)",
    "format": "csv | jsonl | tsv | parquet | coop-json, for files whose extension does not say",
    "columns": "the column names of a headerless csv/tsv, in order ('' = unused), as OFA's TSVs are",
    "prompt": "the prompt, with {column} for a row's value",
    "answer": "the column holding the answer (the refs column: its most frequent reference)",
    "answer_format": "text | box (pixels 'x0,y0,x1,y1', answered as four location tokens)",
    "image": "the column holding the image (none: a text-only task)",
    "image_kind": "path (under image_root) | base64 | bytes",
    "image_root": "the folder under data.root that image paths are relative to",
    "image_id": "the column naming a row's image (rows may share one); rows of tasks with one image_set "
    "and the same id show the same image (the overlap guard, data.exclude_scored_images); "
    "none: the image's file tells (image_kind path), else its bytes",
    "image_set": "the images image_id counts in, shared by tasks over one image collection (coco2014: VQA, "
    "COCO captions and RefCOCO all use COCO's ids); default: the task's name",
    "clean": "column -> " + " | ".join(CLEANERS) + ": OFA's normalisation of that column's text",
    "labels": "raw answer value -> answer text",
    "refs": "a column of several reference answers (VQA's ten, every caption)",
    "refs_format": "list (a list, or text split at refs_sep) | ofa-vqa (OFA's 'conf|!+answer&&...')",
    "refs_sep": "the separator of references held as one text (default '|')",
    "candidates": "the closed answer set: a list, a column of per-example candidates, or "
    f"{ALL_ANSWERS} (every answer in the task's training file, never a scored split's "
    "own); none: open answers",
    "metric": " | ".join(METRICS),
    "family": " | ".join(FAMILIES) + " (default: by the image column)",
    "val_fraction": "the share of train carved (seeded) into val when files has no val "
    "(or val is the test file)",
    "hub": "{repo, config, splits: {our split: the hub's}}: the task's parquet copy on "
    "the hub (data.download)",
    "per_format": "format -> {rename: {file column: ours}, labels, image_kind, image_root, image_id}: "
    "files in another layout",
    "get": "where the files come from, said when one is missing",
}
PER_FORMAT_FIELDS = ("rename", "labels", "image_kind", "image_root", "image_id")


@dataclass(frozen=True)
class Hub:
    """A task's parquet copy on the Hugging Face hub: the repo, its config and its split names."""

    repo: str
    config: str | None
    splits: dict  # our split -> the hub's split name


@dataclass(frozen=True)
class DefinedTask:
    """A task defined in YAML: where its rows are and how a row becomes an Example. `where` names it in errors
    ("configs/mine.yaml: tasks.define.mine")."""

    name: str
    where: str
    files: dict
    format: str
    columns: tuple[str, ...] | None  # a headerless file's columns
    prompt: str
    answer: str
    answer_format: str
    image: str | None
    image_kind: str
    image_root: str
    image_id: str | None
    image_set: str
    clean: dict
    labels: dict
    refs: str | None
    refs_format: str
    refs_sep: str
    candidates: tuple[str, ...] | None  # a fixed closed set (else None: per-example, from the data, or open)
    candidates_column: str | None
    all_answers: bool  # the closed set is every answer in the split's file
    metric: str
    family: str
    val_fraction: float
    hub: Hub | None = None
    per_format: dict = field(default_factory=dict)
    get: str = ""


def _str_map(value, bad, key: str) -> dict:
    if not isinstance(value, dict):
        raise bad(key, f"is {value!r}, not a mapping")
    return {str(k): str(v) for k, v in value.items()}


def _choice(spec: dict, key: str, choices, default, bad):
    value = spec.get(key, default)
    if value not in choices:
        raise bad(key, f"is {value!r}")
    return value


def define(name: str, spec, path: str, prefix: str = "tasks.define.") -> DefinedTask:
    """A DefinedTask from its YAML mapping; anything wrong is one line naming the field and what it takes."""
    where = f"{path}: {prefix}{name}"

    def bad(key, why):
        return UserError(f"{where}.{key} {why}; {key}: {DEFINE_FIELDS[key.split('.')[0]]}")

    if not isinstance(spec, dict):
        raise UserError(f"{where} is {spec!r}, not a mapping of " + ", ".join(DEFINE_FIELDS))
    unknown = sorted(set(spec) - set(DEFINE_FIELDS))
    if unknown:
        raise UserError(
            f"{where}.{unknown[0]} is not a field of a task definition; use {', '.join(DEFINE_FIELDS)}"
        )
    for key in ("files", "prompt", "answer"):
        if key not in spec:
            raise bad(key, "is missing")
    files = spec["files"]
    if (
        not isinstance(files, dict)
        or set(files) - {"train", "val", "test"}
        or not {"train", "test"} <= set(files)
    ):
        raise bad("files", f"is {files!r}")
    fmt = spec.get("format") or FORMATS.get("." + str(files["train"]).rsplit(".", 1)[-1])
    if fmt not in FORMATS.values():
        raise bad(
            "format",
            f"is {spec.get('format')!r}" if spec.get("format") else f"cannot be told from {files['train']!r}",
        )
    columns = spec.get("columns")
    if columns is not None and not (isinstance(columns, list) and columns and fmt in ("csv", "tsv")):
        raise bad("columns", f"is {columns!r}" + ("" if fmt in ("csv", "tsv") else f" for a {fmt} file"))
    image = spec.get("image")
    kind = _choice(spec, "image_kind", IMAGE_KINDS, "path", bad)
    image_id = spec.get("image_id")
    if image_id is not None and not (image and isinstance(image_id, str)):
        raise bad("image_id", f"is {image_id!r}" + ("" if image else " for a task without an image"))
    clean = _str_map(spec.get("clean") or {}, bad, "clean")
    for column, how in clean.items():
        if how not in CLEANERS:
            raise bad(f"clean.{column}", f"is {how!r}")
    labels = _str_map(spec.get("labels") or {}, bad, "labels")
    cands = spec.get("candidates")
    fixed, column, every = None, None, cands == ALL_ANSWERS
    if isinstance(cands, list) and cands:
        fixed = tuple(str(c) for c in cands)
    elif isinstance(cands, str) and not every:
        column = cands
    elif cands is not None and not every:
        raise bad("candidates", f"is {cands!r}")
    if (
        fixed is None
        and column is None
        and not every
        and labels
        and spec.get("metric", "accuracy") == "accuracy"
    ):
        fixed = tuple(dict.fromkeys(labels.values()))  # a label map is a closed set
    metric = spec.get("metric") or ("accuracy" if fixed or column or every else "exact_match")
    if metric not in METRICS:
        raise bad("metric", f"is {metric!r}")
    family = spec.get("family") or ("vision-language" if image else "language")
    if family not in FAMILIES:
        raise bad("family", f"is {family!r}")
    frac = spec.get("val_fraction", 0.1)
    if not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise bad("val_fraction", f"is {frac!r}, not a fraction between 0 and 1")
    hub = spec.get("hub")
    if hub is not None:
        if not isinstance(hub, dict) or "repo" not in hub or not isinstance(hub.get("splits"), dict):
            raise bad("hub", f"is {hub!r}")
        hub = Hub(str(hub["repo"]), hub.get("config"), {str(k): str(v) for k, v in hub["splits"].items()})
    given = spec.get("per_format") or {}
    if not isinstance(given, dict) or set(given) - set(FORMATS.values()):
        raise bad("per_format", f"is {given!r}")
    per_format = {}  # a new mapping: the profile's own (recorded in every artifact's config) stays as written
    for other, layout in given.items():
        if not isinstance(layout, dict) or set(layout) - set(PER_FORMAT_FIELDS):
            raise bad(
                f"per_format.{other}", f"is {layout!r}, not a mapping of {', '.join(PER_FORMAT_FIELDS)}"
            )
        per_format[other] = {
            **layout,
            "rename": _str_map(layout.get("rename") or {}, bad, f"per_format.{other}"),
            "labels": _str_map(layout.get("labels") or labels, bad, f"per_format.{other}"),
        }
        _choice(layout, "image_kind", IMAGE_KINDS, kind, bad)
    return DefinedTask(
        name,
        where,
        dict(files),
        fmt,
        tuple(str(c or "") for c in columns) if columns else None,
        str(spec["prompt"]),
        str(spec["answer"]),
        _choice(spec, "answer_format", ("text", "box"), "text", bad),
        image,
        kind,
        str(spec.get("image_root", "")),
        image_id,
        str(spec.get("image_set") or name),
        clean,
        labels,
        spec.get("refs"),
        _choice(spec, "refs_format", ("list", "ofa-vqa"), "list", bad),
        str(spec.get("refs_sep", "|")),
        fixed,
        column,
        every,
        metric,
        family,
        float(frac),
        hub,
        per_format,
        str(spec.get("get", "")),
    )
