"""Every retrieval embedding by name: what it is and the `embed` fields that change it. Config validation
(`embed.embedding`, `interpolate.select_from`), provenance, embed_tasks.py and the reports read EMBEDDINGS;
it imports nothing, so config can. How each is computed (torch, the experts) is its entry in
common/similarity.py's COMPUTE: a new embedding is one entry here and one there. FISHER_VARIANTS are the
study's alternatives: the Fisher with some `embed` fields changed."""

from __future__ import annotations

from dataclasses import dataclass

ALONE = (
    "k = 0: the target's expert alone"  # selection's candidate without retrieval (interpolate.py, report.py)
)


@dataclass(frozen=True)
class Embedding:
    """An embedding as the config and the reports name it (common.similarity.COMPUTE[name]:
    how it is computed)."""

    name: str
    what: str  # the report's words for it (its heading, the similarity plot's title)
    # the `embed` fields that change it, recorded in the similarity file beside its name
    settings: tuple = ()
    # computed from each expert's own data: an expert imported without data, or of another recipe than the
    # target's, is compared by DATA_FREE instead (common.similarity.ranked_by)
    needs_data: bool = False


EMBEDDINGS = {
    e.name: e
    for e in (
        # π-Tuning's: the diagonal Fisher of each expert on its own data,
        # compared by the paper's normalised cosine
        Embedding(
            "fisher",
            "diagonal Fisher of each expert",
            ("estimator", "samples", "normalize", "passes", "at", "answers"),
            needs_data=True,
        ),
        # SPoT-style: what each expert changed at each site, by plain cosine (no backbone pass)
        Embedding("weights", "cosine of the experts' updates"),
        # Arrow-style (peft's Arrow routing): per site the input direction each expert's update acts on most
        # (its top right-singular vector, from the LoRA factors without the d x d product), compared by |cos|
        Embedding("prototypes", "top singular direction of each expert's update per site"),
    )
}

DATA_FREE = "weights"  # what an expert the configured embedding cannot take is compared by

# embed_tasks.py --embedding NAME: computed beside retrieval's own for comparison (make report ranks them by
# Spearman against the measured transfer); each is the Fisher with these `embed` fields set, and what it is
FISHER_VARIANTS = {
    "fisher-batch": ({"estimator": "batch"}, "the original code's squared batch gradient"),
    "fisher-raw": ({"normalize": "none"}, "the paper's formula on unnormalised values"),
    "fisher-passes": (
        {"passes": 4},
        "the few shots passed 4 times with dropout on, up to embed.samples gradients",
    ),
    # as Task2Vec's probe network: what each task's data asks, not where its own expert ended up
    "fisher-common": ({"at": "pool-mean"}, "every task's Fisher at one common point, the mean pool expert"),
    "fisher-model": (
        {"answers": "model"},
        "answers drawn from the model's own distribution (over the candidates "
        "where closed): the true Fisher, not the empirical one",
    ),
}
# make report computes every variant (pipeline.mk's EMBED_AS lists them, tested) but these, asked for by name
# (EMBED_AS=...): each computes the pool's Fishers anew (about 3 min more each on the mini profile)
ASKED_FOR = ("fisher-passes", "fisher-common", "fisher-model")


def variants() -> dict[str, dict]:
    """name -> the `embed` fields it sets: every embedding as itself, and the Fisher's variants."""
    return {
        **{n: {"embedding": n} for n in EMBEDDINGS},
        **{n: {"embedding": "fisher", **f} for n, (f, _) in FISHER_VARIANTS.items()},
    }


def described() -> dict[str, str]:
    """name -> what it is, for every variant."""
    return {
        **{n: e.what for n, e in EMBEDDINGS.items()},
        **{n: what for n, (_, what) in FISHER_VARIANTS.items()},
    }


def recorded(fc) -> dict:
    """What a similarity file records of how it was embedded:
    the embedding and the settings that change it."""
    return {"embedding": fc.embedding, **{f: getattr(fc, f) for f in EMBEDDINGS[fc.embedding].settings}}


def heading(fc) -> str:
    """The same, as the reports name it: `embed.embedding: fisher, estimator: per_sample, ...`."""
    return "embed." + ", ".join(f"{k}: {v}" for k, v in recorded(fc).items())


def settings_of(sim: dict) -> dict:
    """The embed fields a similarity file recorded (under `fisher` in the files written before that section
    was named embed)."""
    return sim.get("embed", sim.get("fisher", {}))
