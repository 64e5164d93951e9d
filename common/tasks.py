"""Tasks and examples, one home for every source: the mini world (common/data.py), the paper's catalogue of
real files (common/readers.py), and the tasks a profile defines in YAML. An example is (optional image,
prompt) -> answer text; a task names its family, answer set and metric. Also the seeded k-shot samples."""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np


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
    """A seeded k-shot sample, CoOp style: k examples of each answer class (per_class) or k in all; input order kept."""
    if k <= 0:
        return exs[:]  # a list's copy; lazily read rows (readers.Rows) stay a view
    rng = random.Random(seed)
    if not per_class:
        return exs[:] if k >= len(exs) else [exs[i] for i in sorted(rng.sample(range(len(exs)), k))]
    by_class = defaultdict(list)
    answers = exs.answers() if hasattr(exs, "answers") else [e.answer for e in exs]  # Rows: no image decoded
    for i, a in enumerate(answers):
        by_class[a].append(i)
    # classes in sorted order, so the draw does not depend on which class the data happens to list first
    picked = [i for c in sorted(by_class) for i in rng.sample(by_class[c], min(k, len(by_class[c])))]
    return [exs[i] for i in sorted(picked)]


# ---- tasks a profile defines in YAML (tasks.define.<name>), read from files by common/readers.py ----
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".tsv": "tsv", ".parquet": "parquet"}
IMAGE_KINDS = ("path", "base64", "bytes")
METRICS = ("accuracy", "vqa_accuracy", "cider", "acc_iou", "exact_match")
FAMILIES = ("vision-language", "vision", "language")
DEFINE_FIELDS = {  # field: what it is, for the one-line errors
    "files": "split -> file under data.root (train and test; val optional: carved from train)",
    "format": "csv | jsonl | tsv | parquet (default: the files' extension)",
    "prompt": "the prompt, with {column} for a row's value",
    "answer": "the column holding the answer",
    "image": "the column holding the image (none: a text-only task)",
    "image_kind": "path (under image_root) | base64 | bytes",
    "image_root": "the folder under data.root that image paths are relative to",
    "labels": "raw answer value -> answer text",
    "refs": "a column of several reference answers (a list, or text split at '|')",
    "candidates": "the closed answer set: a list, or a column of per-example candidates; none: open answers",
    "metric": "accuracy | vqa_accuracy | cider | acc_iou | exact_match",
    "family": "vision-language | vision | language (default: by the image column)",
    "val_fraction": "the share of train carved (seeded) into val when files has no val",
}


@dataclass(frozen=True)
class DefinedTask:
    """A task defined in a profile: where its rows are and how a row becomes an Example. `where` names it in
    errors ("configs/mine.yaml: tasks.define.mine")."""
    name: str
    where: str
    files: dict
    format: str
    prompt: str
    answer: str
    image: str | None
    image_kind: str
    image_root: str
    labels: dict
    refs: str | None
    candidates: tuple[str, ...] | None  # a fixed closed set (else None: per-example or open)
    candidates_column: str | None
    metric: str
    family: str
    val_fraction: float


def define(name: str, spec, path: str) -> DefinedTask:
    """A DefinedTask from its YAML mapping; anything wrong is one line naming the field and what it takes."""
    from common.config import UserError

    where = f"{path}: tasks.define.{name}"

    def bad(key, why):
        return UserError(f"{where}.{key} {why}; {key}: {DEFINE_FIELDS[key]}")

    if not isinstance(spec, dict):
        raise UserError(f"{where} is {spec!r}, not a mapping of " + ", ".join(DEFINE_FIELDS))
    unknown = sorted(set(spec) - set(DEFINE_FIELDS))
    if unknown:
        raise UserError(f"{where}.{unknown[0]} is not a field of a task definition; use {', '.join(DEFINE_FIELDS)}")
    for key in ("files", "prompt", "answer"):
        if key not in spec:
            raise bad(key, "is missing")
    files = spec["files"]
    if not isinstance(files, dict) or set(files) - {"train", "val", "test"} or not {"train", "test"} <= set(files):
        raise bad("files", f"is {files!r}")
    fmt = spec.get("format") or FORMATS.get("." + str(files["train"]).rsplit(".", 1)[-1])
    if fmt not in FORMATS.values():
        raise bad("format", f"is {spec.get('format')!r}" if spec.get("format") else "cannot be told from "
                  f"{files['train']!r}")
    image = spec.get("image")
    kind = spec.get("image_kind", "path")
    if kind not in IMAGE_KINDS:
        raise bad("image_kind", f"is {kind!r}")
    labels = spec.get("labels") or {}
    if not isinstance(labels, dict):
        raise bad("labels", f"is {labels!r}")
    labels = {str(k): str(v) for k, v in labels.items()}
    cands = spec.get("candidates")
    fixed, column = None, None
    if isinstance(cands, list) and cands:
        fixed = tuple(str(c) for c in cands)
    elif isinstance(cands, str):
        column = cands
    elif cands is not None:
        raise bad("candidates", f"is {cands!r}")
    if fixed is None and column is None and labels and spec.get("metric", "accuracy") == "accuracy":
        fixed = tuple(dict.fromkeys(labels.values()))  # a label map is a closed set
    metric = spec.get("metric") or ("accuracy" if fixed or column else "exact_match")
    if metric not in METRICS:
        raise bad("metric", f"is {metric!r}")
    family = spec.get("family") or ("vision-language" if image else "language")
    if family not in FAMILIES:
        raise bad("family", f"is {family!r}")
    frac = spec.get("val_fraction", 0.1)
    if not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise bad("val_fraction", f"is {frac!r}, not a fraction between 0 and 1")
    return DefinedTask(name, where, dict(files), fmt, str(spec["prompt"]), str(spec["answer"]), image, kind,
                       str(spec.get("image_root", "")), labels, spec.get("refs"), fixed, column, metric, family,
                       float(frac))
