"""Tasks as (optional image, prompt) -> answer text, their splits, and batches for the backbone."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import os
import random
import zlib
from pathlib import Path

import numpy as np
import torch

from common import dist, world as W
from common.backbone import backbone_dir, build_vocab, word_splitter
from common.config import WorldConfig
from common.errors import UserError
from common.readers import cached_image_keys, catalogue, fetch_hub, image_key, read_defined
from common.tasks import Example, Task, define, holdout_split, k_shot
from common.training import Batch

# examples drawn with their images' keys, not drawn
_UNDRAWN = contextvars.ContextVar("undrawn", default=False)


def _img(scene, rng, size):
    if _UNDRAWN.get():  # what the image is made from: its scene and the seed render draws (its one draw)
        return ("image", repr(scene), rng.randrange(2**31), size)
    return W.render(scene, size, rng)


@functools.lru_cache(maxsize=256)
def _world_keys(task: str, which: str, world: str) -> np.ndarray:
    token = _UNDRAWN.set(True)
    try:
        exs = examples(task, which, WorldConfig(**json.loads(world)))
    finally:
        _UNDRAWN.reset(token)
    return np.array([image_key(repr(e.image)) for e in exs], dtype=np.uint64)


def world_keys(task: str, which: str, world: WorldConfig) -> np.ndarray:
    """The keys of a mini-world split's images, in order, without drawing one: an image is its scene and the
    noise seed render draws, so two examples show the same image only where both agree (never, in practice:
    each draws its own seed)."""
    return _world_keys(task, which, json.dumps(dataclasses.asdict(world), sort_keys=True))


def _statements(prompt: str, answer=lambda label: label):
    """A task on a scene's statements (W.hypothesis): the prompt with {hyp} (and {text}, the scene's
    description: a text-only task, else the image is drawn), the answer the statement's yes / no / maybe label
    under `answer`. Every such task draws its scene, statement and image alike: the same seed,
    the same example."""

    def make(rng, size):
        scene = W.random_scene(rng)
        hyp, label = W.hypothesis(scene, rng)
        if "{text}" in prompt:
            return Example(prompt.format(text=W.describe(scene), hyp=hyp), answer(label))
        return Example(prompt.format(hyp=hyp), answer(label), _img(scene, rng, size))

    return make


VE_PROMPT = ' does the image describe " {hyp} "?'
NLI_PROMPT = ' can text1 " {text} " imply text2 " {hyp} "?'
_snli_ve, _nli = _statements(VE_PROMPT), _statements(NLI_PROMPT)


def _vqa(rng, size):
    scene = W.random_scene(rng)
    q, a = W.question(scene, rng)
    return Example(f" {q}", a, _img(scene, rng, size))


def _caption(rng, size):
    scene = W.random_scene(rng)
    return Example(" what does the image describe?", W.short_caption(scene), _img(scene, rng, size))


def _refexp(rng, size):
    scene = W.random_scene(rng)
    expr, cell = W.referring_expression(scene, rng)
    return Example(f' which region does the text " {expr} " describe?', cell, _img(scene, rng, size))


def _shape(rng, size, name=lambda shape: shape, large: bool = False):
    scene = W.random_scene(rng, 1)
    if large:  # the same draw, the object drawn large
        scene = W.Scene((dataclasses.replace(scene.objects[0], size="large"),), scene.jitter)
    return Example(" what is the shape of the object?", name(scene.objects[0].shape), _img(scene, rng, size))


def _colour(rng, size):
    scene = W.random_scene(rng, 1)
    return Example(" what is the colour of the object?", scene.objects[0].colour, _img(scene, rng, size))


def _count(rng, size):
    scene = W.random_scene(rng)
    return Example(
        " how many objects are in the image?", W.NUMBERS[len(scene.objects)], _img(scene, rng, size)
    )


def _paraphrase(rng, size):
    scene = W.random_scene(rng)
    same = rng.random() < 0.5
    other = scene if same else W.perturb(scene, rng)
    return Example(
        f' is text1 " {W.describe(scene, rng)} " a paraphrase of text2 " {W.describe(other, rng)} "?',
        "yes" if same else "no",
    )


def _qa_entail(rng, size):
    scene = W.random_scene(rng)
    o = rng.choice(scene.objects)  # the object the sentence mentions
    others = [x for x in scene.objects if x != o]
    asked = rng.choice(others) if others and rng.random() < 0.5 else o  # the object the question is about
    if rng.random() < 0.5:
        q, answers = f"what colour is the {asked.shape} ?", o.shape == asked.shape
    else:
        q, answers = f"what shape is at the {W.POSITIONS[asked.pos]} ?", o.pos == asked.pos
    sentence = f"a {o.phrase()} is at the {W.POSITIONS[o.pos]}"
    return Example(f' does text " {sentence} " answer question " {q} "?', "yes" if answers else "no")


def _arith(rng, size):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Example(f" what is {W.NUMBERS[a]} plus {W.NUMBERS[b]}?", W.NUMBERS[a + b])


# the wider pool (configs/mini-wide.yaml, docs/mini-world.md): the same scenes and statements as a
# target under another answer convention, or the same decision from other inputs; only the vocabulary's
# words, so the backbone is the one every profile of this world builds
def _two_way(label: str) -> str:
    """RTE's two-way entailment: entailed or not; what snli-ve and nli call maybe
    (undecidable) is not entailed."""
    return "yes" if label == "yes" else "no"


_ve_2way = _statements(' can the image imply text " {hyp} "?', _two_way)
_nli_2way = _statements(' does text1 " {text} " imply text2 " {hyp} "?', _two_way)


def _decidable(label: str) -> str:
    """Can the statement be decided (entailed or contradicted: yes) or not (undecidable: no)? The same
    statements as the target, a different decision: snli-ve's no becomes yes and its maybe no
    (two of three disagree)."""
    return "no" if label == "maybe" else "yes"


_ve_decide = _statements(' does the image answer " {hyp} "?', _decidable)
_nli_decide = _statements(' can text1 " {text} " answer text2 " {hyp} "?', _decidable)


def _colour_text(rng, size):
    scene = W.random_scene(rng, 1)
    return Example(
        f' what is the colour of the object in text " {W.describe(scene, rng)} "?', scene.objects[0].colour
    )


def _not_refuted(label: str) -> str:
    """Fact checking's "not refuted": what snli-ve and nli call maybe (undecidable) counts as yes."""
    return "no" if label == "no" else "yes"


# the target's own prompt under another answer convention (two datasets that ask the same question and were
# labelled under different guidelines): the conflict at its strongest that the world can pose with its words
_ve_strict, _ve_lenient = _statements(VE_PROMPT, _two_way), _statements(VE_PROMPT, _not_refuted)
_nli_strict = _statements(NLI_PROMPT, _two_way)


def _shape_plus(rng, size):
    """shape's very examples, named as a dataset that calls the upright cross a plus (the sign it is) names
    them: one shape word in four conflicts, under shape's prompt."""
    return _shape(rng, size, lambda shape: "plus" if shape == "cross" else shape)


# the same decision as a target from other inputs, with many examples (as MNLI is to RTE): the neighbour that
# should transfer most, so a pool holds experts that help a target strongly beside those that conflict with it
def _shape_at(rng, size):
    """shape's decision on scenes of 2-3 objects: the shape of the object a grid cell names."""
    scene = W.random_scene(rng, rng.randint(2, 3))
    o = rng.choice(scene.objects)
    return Example(
        f" what is the shape of the object at the {W.POSITIONS[o.pos]}?", o.shape, _img(scene, rng, size)
    )


def _shape_large(rng, size):
    """shape's question on close-ups: one object, always drawn large (a dataset of close-up photos, its
    subject filling the frame). shape's decision and its four names,
    from other inputs than shape's small and large mix."""
    return _shape(rng, size, large=True)


def _nli_shuffled(rng, size):
    """nli's three-way decision on the same kind of statements, read against a description that lists the
    objects in any order with either connective (paraphrase's texts), under a prompt of its own."""
    scene = W.random_scene(rng)
    hyp, label = W.hypothesis(scene, rng)
    return Example(f' does text " {W.describe(scene, rng)} " imply " {hyp} "?', label)


# pre-training tasks (the backbone's own; never downstream)
def _pt_caption(rng, size):
    scene = W.random_scene(rng)
    return Example(" describe the image in detail.", W.describe(scene), _img(scene, rng, size))


def _pt_infill(rng, size):
    scene = W.random_scene(rng)
    text = W.describe(scene, rng)
    return Example(" " + W.mask_words(text, rng), text)


YNM = ("yes", "no", "maybe")
YN = ("yes", "no")
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("snli-ve", "vision-language", _snli_ve, YNM),
        Task("vqa", "vision-language", _vqa, tuple(W.COLOURS) + W.SHAPES + W.NUMBERS[1:4] + YN),
        Task("caption", "vision-language", _caption, None),
        Task("refexp", "vision-language", _refexp, W.POSITIONS),
        Task("shape", "vision", _shape, W.SHAPES),
        Task("colour", "vision", _colour, tuple(W.COLOURS)),
        Task("count", "vision", _count, W.NUMBERS[1:4]),
        Task("nli", "language", _nli, YNM),
        Task("paraphrase", "language", _paraphrase, YN),
        Task("qa-entail", "language", _qa_entail, YN),
        Task("arith", "language", _arith, W.NUMBERS),
        Task("ve-2way", "vision-language", _ve_2way, YN),
        Task("nli-2way", "language", _nli_2way, YN),
        Task("colour-text", "language", _colour_text, tuple(W.COLOURS)),
        Task("ve-decide", "vision-language", _ve_decide, YN),
        Task("nli-decide", "language", _nli_decide, YN),
        Task("ve-strict", "vision-language", _ve_strict, YN),
        Task("ve-lenient", "vision-language", _ve_lenient, YN),
        Task("nli-strict", "language", _nli_strict, YN),
        Task("shape-at", "vision", _shape_at, W.SHAPES),
        Task("nli-shuffled", "language", _nli_shuffled, YNM),
        Task("shape-plus", "vision", _shape_plus, ("circle", "square", "triangle", "plus")),
        Task("shape-large", "vision", _shape_large, W.SHAPES),
    ]
}
PRETRAIN_TASKS = {
    "pt-caption": Task("pt-caption", "pretraining", _pt_caption, None),
    "pt-infill": Task("pt-infill", "pretraining", _pt_infill, None),
}


def get_task(name: str, where: str = "tasks.pool") -> Task:
    if name in TASKS:
        return TASKS[name]
    if name in PRETRAIN_TASKS:
        return PRETRAIN_TASKS[name]
    raise UserError(f"unknown task '{name}' in {where}; known tasks: {', '.join(TASKS)}")


def _rng(world: WorldConfig, task: str, split: str) -> random.Random:
    return random.Random(zlib.crc32(f"{world.seed}/{task}/{split}".encode()))


def examples(task: str, split: str, world: WorldConfig, n: int | None = None) -> list[Example]:
    """The first n examples of a task's split (the same ones every time)."""
    size = {"train": world.train_size, "val": world.val_size, "test": world.test_size}[split]
    n = size if n is None else min(n, size)
    rng, t = _rng(world, task, split), get_task(task)
    return [t.make(rng, world.image_size) for _ in range(n)]


# ---- what the stages call: the mini world or real files, by data.source ----


def task(cfg, name: str, where: str = "tasks.pool"):
    """A task by name: one the profile defines (tasks.define, read from files), else one of the configured
    data source: a mini-world Task, or a definition of the paper's catalogue (configs/paper_tasks.yaml)."""
    if name in cfg.tasks.define:
        return define(name, cfg.tasks.define[name], cfg.path)
    if cfg.data.source == "mini":
        return get_task(name, where)
    known = catalogue()
    if name not in known:
        raise UserError(f"unknown task '{name}' in {where} (data.source=files); known: {', '.join(known)}")
    files = cfg.data.files.get(name, {})
    if not isinstance(files, dict) or set(files) - {"train", "val", "test"}:
        raise UserError(f"{cfg.path}: data.files.{name} must map train/val/test to files under data.root")
    return dataclasses.replace(known[name], files={**known[name].files, **files})


def split(cfg, name: str, which: str, n: int | None = None) -> list[Example]:
    """At most n examples of a task's split (train | val | test): the mini world's first n (its stream draws
    every example at random, so they are a random sample), or a seeded random sample of a file's rows
    (Rows.sample: a file's first rows are not one), within the data section's cap (data.train_size, val_size,
    test_size; 0 = none). Training examples that show an image of a scored split are left out first
    (without_scored)."""
    if from_world(cfg, name):
        exs = examples(name, which, cfg.world, None if which == "train" else n)
        return without_scored(cfg, name, exs)[0][:n] if which == "train" else exs
    cap = {"train": cfg.data.train_size, "val": cfg.data.val_size, "test": cfg.data.test_size}[which] or None
    n = min((x for x in (n, cap) if x), default=None)
    rows = _read(cfg, name, which)
    if which == "train":
        rows = without_scored(cfg, name, rows)[0]
    return rows.sample(n, f"{name}/{which}")


def _read(cfg, name: str, which: str):
    """Every row of a defined task's split (readers.read_defined), fetched from the hub first where
    data.download says so and its files are missing."""
    t, root = task(cfg, name), Path(cfg.data.root)
    try:
        return read_defined(t, which, root, cfg.data.num_workers)
    except UserError:
        if not (cfg.data.download and t.hub) or (root / t.files.get(which, "")).is_file():
            raise
        # then read the downloaded shards (a failed fetch says how to get them by hand)
        fetch_hub(t, which, root)
        return read_defined(t, which, root, cfg.data.num_workers)


# ---- the overlap guard: no image of a scored split in any task's training data ----


def image_keys(cfg, name: str, which: str, exs) -> np.ndarray | None:
    """The image keys of a task's split exs (all of it, as read; readers.image_key: a file's image ids, files
    or bytes, the mini world's scenes and seeds); None for a text task."""
    if from_world(cfg, name):
        return None if get_task(name).family == "language" else world_keys(name, which, cfg.world)
    return exs.image_keys() if exs.source.task.image else None


def scored_images(cfg) -> np.ndarray:
    """The sorted keys of every image in a scored split (val, test: whole, before any cap) of any task in the
    pool. A file's keys are cached beside it (readers.beside);
    the mini world's are drawn without their images."""
    keys = []
    for name in (n for n in cfg.tasks.pool if has_data(cfg, n)):  # an expert imported without data has none
        for which in ("val", "test"):
            found = (
                None
                if from_world(cfg, name) or not task(cfg, name).image
                else cached_image_keys(task(cfg, name), which, Path(cfg.data.root))
            )  # keyed once: the file not opened
            if found is None:
                exs = None if from_world(cfg, name) else _read(cfg, name, which)
                found = image_keys(cfg, name, which, exs)
            if found is not None:
                keys.append(found)
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.uint64)


def without_scored(cfg, name: str, exs):
    """(a task's training examples without those whose image is in a scored split of the pool, how many were
    left out): data.exclude_scored_images, so that no pool expert trains on an image a target is scored on and
    one pool expert serves every target. A task with nothing left stops in one line."""
    keys = image_keys(cfg, name, "train", exs) if cfg.data.exclude_scored_images else None
    if keys is None:
        return exs, 0
    shared = np.isin(keys, scored_images(cfg))
    if not shared.any():
        return exs, 0
    if shared.all():
        raise UserError(
            f"{cfg.path}: every training example of {name} ({len(exs)}) shows an image of a scored "
            f"split of a task in tasks.pool; leave {name} or the task it shares images with out of "
            f"tasks.pool, or set data.exclude_scored_images=false"
        )
    kept = exs.take(~shared) if hasattr(exs, "take") else [e for e, s in zip(exs, shared) if not s]
    return kept, int(shared.sum())


def train_rows(cfg, name: str) -> dict:
    """What a task's training examples were taken from, for the metadata of what trains on them: the split's
    examples, how many the overlap guard left out (without_scored), and how many were used (a seeded sample
    where data.train_size caps a file's rows)."""
    exs = examples(name, "train", cfg.world) if from_world(cfg, name) else _read(cfg, name, "train")
    kept, dropped = without_scored(cfg, name, exs)
    cap = 0 if from_world(cfg, name) else cfg.data.train_size
    used = min(cap or len(kept), len(kept))
    return {
        "rows": len(exs),
        "dropped_scored_images": dropped,
        "used": used,
        **({"sample": f"seeded random ('{name}/train', data.train_size)"} if used < len(kept) else {}),
    }


def has_data(cfg, name: str) -> bool:
    """Is there data for a pool entry: a task of the data source or tasks.define (an imported expert may come
    without)?"""
    if name in cfg.tasks.define or name not in cfg.tasks.imported:
        return True
    return name in (TASKS if cfg.data.source == "mini" else catalogue())


def from_world(cfg, name: str) -> bool:
    """Is the task the mini world's (its splits drawn example by example at random), not read from files?"""
    return cfg.data.source == "mini" and name not in cfg.tasks.define


def subset(cfg, name: str, exs, n: int, key: str) -> tuple[list[Example], str]:
    """(at most n of a task's examples exs, how they were taken): the first n of the mini world's (drawn at
    random already), else a seeded random sample (seeded by `key`) in their order: a file's first rows are not
    a random sample, nor is the start of a k-per-class sample (its classes in file order)."""
    if len(exs) <= n:
        return exs, f"all {len(exs)}"
    if from_world(cfg, name):
        return exs[:n], f"the first {n} of {len(exs)} (the mini world draws each at random)"
    if hasattr(exs, "sample"):
        return exs.sample(n, key), f"{n} of {len(exs)}, a seeded random sample ('{key}')"
    pick = sorted(random.Random(key).sample(range(len(exs)), n))
    return [exs[i] for i in pick], f"{n} of {len(exs)}, a seeded random sample ('{key}')"


def train_split(cfg, name: str, shots: int, seed: int, where: str = "tasks.target_shots") -> list[Example]:
    """A task's training examples: the whole split, or the target's seeded k-shot sample (`where` names
    the setting that asked for `shots`, for the error when the split is smaller)."""
    exs = split(cfg, name, "train")
    if shots > len(exs):
        setting = where if where.startswith("--") else f"{cfg.path}: field '{where}'"
        raise UserError(
            f"{setting} is {shots}, but {name}'s train split has {len(exs)} examples; use at "
            f"most {len(exs)} (0 = all of them)"
        )
    return k_shot(exs, shots, seed, cfg.tasks.shots_per_class)


def fold_split(cfg, train: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """The target's training examples (train_split's) as stacking splits them (interpolate.holdout): (what the
    fold expert fits, what the mix learns on)."""
    if len(train) < 2:
        raise UserError(
            f"{cfg.path}: field 'interpolate.holdout' holds out part of {len(train)} training example; "
            f"use at least 2 (tasks.target_shots) or set interpolate.holdout to 0"
        )
    return holdout_split(train, cfg.interpolate.holdout, seed)


def world_vocabulary(world: WorldConfig) -> list[str]:
    """The embedded backbone's vocabulary: every word any task of the mini world can use (what pretraining
    builds it from)."""
    texts = [
        t
        for name in list(TASKS) + list(PRETRAIN_TASKS)
        for e in examples(name, "train", world, 400)
        for t in (e.prompt, e.answer, *(get_task(name).candidates or ()))
    ]
    return build_vocab(texts)


def check_words(cfg, name: str, vocab, *splits: list[Example]) -> None:
    """The embedded backbone knows the mini world's words only: a task read from files that uses others stops
    here, in one line naming them and, briefly, what it has (a real backbone's subword tokenizer has no
    unknown words)."""
    if cfg.backbone.source != "embedded" or from_world(cfg, name):
        return
    split = word_splitter().pre_tokenize_str
    # Rows: no image read
    rows = [e for exs in splits for e in (exs.texts() if hasattr(exs, "texts") else exs)]
    texts = {t for e in rows for t in (e.prompt, e.answer, *(e.candidates or ()), *(e.refs or ()))}
    defined = task(cfg, name)
    texts |= set(defined.candidates or ())
    words = {w for w in vocab if not w.startswith("<")}
    unknown = sorted({w for t in texts for w, _ in split(t)} - set(vocab))
    if unknown:
        more = f" and {len(unknown) - 12} more" if len(unknown) > 12 else ""
        sample = ", ".join(sorted(w for w in words if w.isalpha())[:8])
        raise UserError(
            f"{defined.where} uses words the embedded backbone's vocabulary lacks: "
            f"{', '.join(unknown[:12])}{more}; it has the mini world's {len(words)} words ({sample}, ...: "
            f"{backbone_dir(cfg) / 'tokenizer.json'}), so use those, or a real backbone (backbone.source)"
        )


def candidates_for(task: Task, ex: Example) -> tuple[str, ...]:
    return ex.candidates or task.candidates


class Encoder:
    """Turns examples into model inputs through the backbone's processor (the real path), and answers into
    labels as the checkpoint was trained to emit them (its generation config): a BART / Florence-2 checkpoint
    forces `<s>` first (forced_bos_token_id), so its labels are `<s> answer </s>` after the decoder start
    `</s>`; T5's are `answer </s>` after `<pad>`; the decoder start is the model's own (it shifts the labels
    right). keep_mb: the inputs of each batch of examples kept, up to this much, for when the same batches
    come again (evaluate.py scores every method on the same splits: the processor's work once,
    not once per method)."""

    def __init__(self, processor, device=None, max_len: int = 512, keep_mb: int = 0, generation=None):
        self.processor = processor  # a Florence-2 processor, or a text-only model's tokenizer
        self.tok = getattr(processor, "tokenizer", processor)
        self.device = torch.device(device or "cpu")  # where the tensors it returns live (the model's device)
        self.max_len = max_len
        # the examples' ids -> (the examples, kept alive so no id is reused; inputs)
        self.kept: dict[tuple, tuple] = {}
        self.room = keep_mb << 20
        self.answer_ids: dict[str, list[int]] = {}  # answer -> its label ids: candidates come again and again
        self.generation = (
            generation  # the checkpoint's GenerationConfig (None: the tokenizer's eos, nothing forced)
        )
        forced = getattr(generation, "forced_bos_token_id", None)
        self.forced = [forced] if forced is not None else []  # tokens every answer starts with, not chosen
        eos = getattr(generation, "eos_token_id", None)
        self.eos = (eos[0] if isinstance(eos, list) else eos) if eos is not None else self.tok.eos_token_id

    def inputs(self, exs: list[Example]) -> dict[str, torch.Tensor]:
        key = tuple(map(id, exs))
        if key in self.kept:
            return dict(self.kept[key][1])
        out = self._inputs(exs)
        size = sum(v.numel() * v.element_size() for v in out.values())
        if size <= self.room:
            self.kept[key], self.room = (list(exs), out), self.room - size
        return dict(out)

    def _inputs(self, exs: list[Example]) -> dict[str, torch.Tensor]:
        with_image = [e.image is not None for e in exs]
        if any(with_image) and not all(with_image):
            raise ValueError("a batch mixes image and text-only examples")
        if all(with_image):
            if self.tok is self.processor:
                raise UserError(
                    "this task has images but backbone.source is a text-only model; use a Florence-2 "
                    "backbone or text tasks in tasks.pool"
                )
            out = self.processor(
                text=[e.prompt for e in exs], images=[e.image for e in exs], return_tensors="pt", padding=True
            )
        # the same <s> prompt </s> layout Florence-2 builds after the image
        elif self.tok.bos_token is not None:
            texts = [f"{self.tok.bos_token}{e.prompt}{self.tok.eos_token}" for e in exs]
            out = self.tok(
                texts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=True,
                max_length=self.max_len,
            )
        else:  # T5: prompt </s>
            out = self.tok(
                [e.prompt.strip() for e in exs],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_len,
            )
        return {k: v.to(self.device, non_blocking=True) for k, v in out.items()}

    def labels(self, answers: list[str]) -> torch.Tensor:
        """The forced tokens (a BART checkpoint's <s>), the answer's tokens and the end of sequence, padded
        with -100 (ignored by the loss)."""
        ids = [self._answer(a) for a in answers]
        width = max(map(len, ids))
        return torch.tensor([x + [-100] * (width - len(x)) for x in ids], device=self.device)

    def _answer(self, answer: str) -> list[int]:
        if answer in self.answer_ids:
            return self.answer_ids[answer]
        ids = self.forced + self.tok(answer, add_special_tokens=False)["input_ids"] + [self.eos]
        if len(self.answer_ids) < 4096:  # closed answer sets; open answers (captions) are not all kept
            self.answer_ids[answer] = ids
        return ids

    def targets(self, exs: list[Example]) -> int:
        """How many answer tokens the loss of enc.batch(exs) averages over
        (each answer's tokens and its </s>)."""
        return sum(len(self._answer(e.answer)) for e in exs)

    def batch(self, exs: list[Example]) -> dict[str, torch.Tensor]:
        out = self.inputs(exs)
        out["labels"] = self.labels([e.answer for e in exs])
        return out


def batches(
    exs: list[Example],
    batch_size: int,
    rng: random.Random | None = None,
    shard: bool = False,
    order: list[int] | None = None,
):
    """Mini-batches in order (or in `order`, a permutation of the indices), or shuffled (one epoch) when an
    rng is given; shard: only this rank's share of them under torchrun (batches rank, rank + world, ...). A
    lazily read split with workers (readers.Rows, data.num_workers) is decoded in that many DataLoader worker
    processes, a few batches ahead."""
    order = list(range(len(exs))) if order is None else list(order)
    if rng is not None:
        rng.shuffle(order)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shard:
        chunks = dist.shard(chunks)
    if not getattr(exs, "workers", 0) or not chunks:
        yield from ([exs[j] for j in chunk] for chunk in chunks)
    else:
        yield from _in_workers(_Decoded(exs), chunks, exs.workers)


def by_length(exs) -> list[int]:
    """The examples' indices, shortest prompt first (its characters; no image read): batches of alike lengths
    pad less, as transformers' group_by_length does. nli's validation batches were 23%
    padding in prompt order."""
    texts = exs.texts() if hasattr(exs, "texts") else exs
    return sorted(range(len(texts)), key=lambda i: len(texts[i].prompt))


def _in_workers(dataset, batch_sampler, workers: int, pin: bool = False):
    """The batches of a dataset whose __getitems__ makes them (or returns a UserError), read in `workers`
    DataLoader processes (0: this one): a returned UserError is raised here, in the stage, as its one line."""
    if workers:  # the tokenizer's own threads and forked workers do not mix (its warning)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # its own generator: the workers' seeds are not drawn from torch's global one (dropout, init)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=_as_is,
        num_workers=workers,
        pin_memory=pin,
        generator=torch.Generator(),
    )
    for batch in loader:
        if isinstance(batch, UserError):
            raise batch
        yield batch


class _Decoded(torch.utils.data.Dataset):
    """A split's examples decoded a batch at a time (in a DataLoader worker): a row that does not read is
    returned as its one-line error, raised by the stage (not a worker's traceback around it)."""

    def __init__(self, exs):
        self.exs = exs

    def __len__(self) -> int:
        return len(self.exs)

    def __getitems__(self, idx):
        try:
            return [self.exs[i] for i in idx]
        except UserError as e:
            return e


def infinite_batches(exs: list[Example], batch_size: int, seed: int):
    """Endless shuffled epochs (for a fixed number of training steps)."""
    rng = random.Random(seed)
    while True:
        yield from batches(exs, min(batch_size, len(exs)), rng)


class _Order:
    """The batch sampler of a Loader: infinite_batches' order of example indices, from batch `start` on, each
    batch as (its size, this rank's share of its indices)."""

    def __init__(self, n: int, batch_size: int, seed: int, field: str, desc: str):
        self.n, self.batch_size, self.seed, self.field, self.desc, self.start = (
            n,
            batch_size,
            seed,
            field,
            desc,
            0,
        )

    def __iter__(self):
        for i, idx in enumerate(infinite_batches(range(self.n), self.batch_size, self.seed)):
            if i >= self.start:
                mine = Batch.share(idx, len)
                yield len(idx), mine.inputs, mine.targets == 0 and dist.active()  # (a masked row: weighted 0)


class _Encoded(torch.utils.data.Dataset):
    """A split's examples, read and encoded a rank's share of a batch at a time (DataLoader's batched fetch):
    a lazily read split (readers.Rows) decodes its rows here, in the worker."""

    def __init__(self, exs, processor, generation=None):
        # CPU tensors: the loop moves them
        self.exs, self.enc = exs, Encoder(processor, generation=generation)

    def __len__(self) -> int:
        return len(self.exs)

    def __getitems__(self, key):
        size, idx, masked = key
        try:
            inputs = self.enc.batch([self.exs[i] for i in idx])
        except UserError as e:  # a row that does not read: its one line, not a worker's traceback around it
            return e
        # the loss's terms: the answer tokens the labels hold (Encoder.targets, without tokenizing them again)
        return Batch(inputs, size, 0 if masked else int((inputs["labels"] != -100).sum()))


def _as_is(batch):  # the collate: __getitems__ made the batch
    return batch


class Loader:
    """A training loop's batches (common.training.Batch): endless shuffled epochs of exs in infinite_batches'
    order, each rank's share of every batch read and encoded by the processor in `workers` DataLoader worker
    processes (0: this one), pinned for a CUDA device. The same batches, bit for bit, whatever the number of
    workers. skip(n) before the first batch passes n batches without reading them (a resumed loop).
    field: the batch size's config field, for the error when a batch is too small to share."""

    def __init__(
        self,
        exs,
        batch_size: int,
        seed: int,
        processor,
        workers: int = 0,
        pin: bool = False,
        field: str = "expert.batch_size",
        desc: str = "train",
        generation=None,
    ):
        self.order = _Order(len(exs), batch_size, seed, field, desc)
        self.dataset, self.workers, self.pin, self._it = (
            _Encoded(exs, processor, generation),
            workers,
            pin,
            None,
        )

    def skip(self, n: int) -> None:
        assert self._it is None, "skip() before the first batch"
        self.order.start += n

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = _in_workers(self.dataset, self.order, self.workers, self.pin)
        return next(self._it)


def train_batches(cfg, exs, batch_size: int, seed: int, enc: Encoder, field: str, desc: str) -> Loader:
    """A stage's training batches: read in data.num_workers workers, pinned when the model is on a GPU."""
    return Loader(
        exs,
        batch_size,
        seed,
        enc.processor,
        cfg.data.num_workers,
        enc.device.type == "cuda",
        field,
        desc,
        enc.generation,
    )
