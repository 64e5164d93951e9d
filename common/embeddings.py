"""Every retrieval embedding, one object each: how a task is embedded by its expert, how two tasks' embeddings
compare, what the similarity file records and the report calls it. Config validation (`fisher.embedding`),
embed_tasks.py and make report read EMBEDDINGS; a new embedding is one entry here (its computing code may live
anywhere). VARIANTS are the study's alternatives: an embedding with some `fisher` fields changed. Light to import
(no torch until an embedding is computed)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Embedding:
    """embed(cfg, names) -> ([one embedding per expert name], what it did: "2 Fisher computed, 1 cached");
    similarity(a, b) -> how alike two embeddings are (1 for the same task)."""
    name: str
    what: str  # the report's words for it (its heading, the similarity plot's title)
    embed: Callable
    similarity: Callable
    settings: tuple = ()  # the `fisher` fields that change it, recorded in the similarity file beside its name
    examples: Callable | None = None  # (cfg, names) -> {expert: which of its examples it took}, recorded too


def _similarity(attr: str) -> Callable:
    """common.similarity's function `attr`, imported when first called (torch stays out of config reads)."""
    def call(*args):
        from common import similarity
        return getattr(similarity, attr)(*args)
    return call


def _each(attr: str, work: str) -> Callable:
    """embed(): common.similarity's per-expert function `attr` over the names, no cache to report."""
    def embed(cfg, names):
        return [_similarity(attr)(cfg, n) for n in names], work
    return embed


EMBEDDINGS = {e.name: e for e in (
    # π-Tuning's: the diagonal Fisher of each expert on its own data, compared by the paper's normalised cosine
    Embedding("fisher", "diagonal Fisher of each expert", _similarity("fisher_embeddings"),
              _similarity("task_similarity"), ("estimator", "samples", "normalize", "passes", "at", "answers"),
              _similarity("fisher_samples")),
    # SPoT-style: what each expert changed at each site, by plain cosine (no backbone pass)
    Embedding("weights", "cosine of the experts' updates", _each("weight_embedding", "weight updates"),
              _similarity("update_similarity")),
    # Arrow-style (peft's Arrow routing): per site the input direction each expert's update acts on most (its top
    # right-singular vector, from the LoRA factors without the d x d product), compared by |cos|
    Embedding("prototypes", "top singular direction of each expert's update per site",
              _each("prototype_embedding", "update prototypes"), _similarity("prototype_similarity")),
)}

# embed_tasks.py --embedding NAME: computed beside retrieval's own for comparison (make report ranks them by
# Spearman against the measured transfer); each is the Fisher with these `fisher` fields set, and what it is
FISHER_VARIANTS = {
    "fisher-batch": ({"estimator": "batch"}, "the original code's squared batch gradient"),
    "fisher-raw": ({"normalize": "none"}, "the paper's formula on unnormalised values"),
    "fisher-passes": ({"passes": 4}, "the few shots passed 4 times with dropout on, up to fisher.samples gradients"),
    # as Task2Vec's probe network: what each task's data asks, not where its own expert ended up
    "fisher-common": ({"at": "pool-mean"}, "every task's Fisher at one common point, the mean pool expert"),
    "fisher-model": ({"answers": "model"}, "answers drawn from the model's own distribution (over the candidates "
                                           "where closed): the true Fisher, not the empirical one"),
}
# make report computes every variant (pipeline.mk's EMBED_AS lists them, tested) but these, asked for by name
# (EMBED_AS=...): each computes the pool's Fishers anew (about 3 min more each on the mini profile)
ASKED_FOR = ("fisher-passes", "fisher-common", "fisher-model")


def variants() -> dict[str, dict]:
    """name -> the `fisher` fields it sets: every embedding as itself, and the Fisher's variants."""
    return {**{n: {"embedding": n} for n in EMBEDDINGS},
            **{n: {"embedding": "fisher", **f} for n, (f, _) in FISHER_VARIANTS.items()}}


def described() -> dict[str, str]:
    """name -> what it is, for every variant."""
    return {**{n: e.what for n, e in EMBEDDINGS.items()}, **{n: what for n, (_, what) in FISHER_VARIANTS.items()}}


def recorded(fc) -> dict:
    """What a similarity file records of how it was embedded: the embedding and the settings that change it."""
    return {"embedding": fc.embedding, **{f: getattr(fc, f) for f in EMBEDDINGS[fc.embedding].settings}}


def heading(fc) -> str:
    """The same, as the reports name it: `fisher.embedding: fisher, estimator: per_sample, ...`."""
    return "fisher." + ", ".join(f"{k}: {v}" for k, v in recorded(fc).items())
