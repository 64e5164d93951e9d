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
        return list(exs)
    rng = random.Random(seed)
    if not per_class:
        return list(exs) if k >= len(exs) else [exs[i] for i in sorted(rng.sample(range(len(exs)), k))]
    by_class = defaultdict(list)
    for i, e in enumerate(exs):
        by_class[e.answer].append(i)
    # classes in sorted order, so the draw does not depend on which class the data happens to list first
    picked = [i for c in sorted(by_class) for i in rng.sample(by_class[c], min(k, len(by_class[c])))]
    return [exs[i] for i in sorted(picked)]
