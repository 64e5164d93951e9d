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


def _fisher(cfg, names):
    from common.similarity import fisher_embeddings
    return fisher_embeddings(cfg, names)


def _fisher_similarity(a, b):
    from common.similarity import task_similarity
    return task_similarity(a, b)


def _weights(cfg, names):
    from common.similarity import weight_embedding
    return [weight_embedding(cfg, n) for n in names], "weight updates"


def _update_similarity(a, b):
    from common.similarity import update_similarity
    return update_similarity(a, b)


def _prototypes(cfg, names):
    from common.similarity import prototype_embedding
    return [prototype_embedding(cfg, n) for n in names], "update prototypes"


def _prototype_similarity(a, b):
    from common.similarity import prototype_similarity
    return prototype_similarity(a, b)


EMBEDDINGS = {e.name: e for e in (
    # π-Tuning's: the diagonal Fisher of each expert on its own data, compared by the paper's normalised cosine
    Embedding("fisher", "diagonal Fisher of each expert", _fisher, _fisher_similarity,
              ("estimator", "samples", "normalize", "passes", "at", "answers")),
    # SPoT-style: what each expert changed at each site, by plain cosine (no backbone pass)
    Embedding("weights", "cosine of the experts' updates", _weights, _update_similarity),
    # Arrow-style (peft's Arrow routing): per site the input direction each expert's update acts on most (its top
    # right-singular vector, from the LoRA factors without the d x d product), compared by |cos|
    Embedding("prototypes", "top singular direction of each expert's update per site", _prototypes,
              _prototype_similarity),
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
