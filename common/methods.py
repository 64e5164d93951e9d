"""Every method the tables compare, one object each: π-Tuning, its variants and the baselines. A method says
how it is made (the stage run and its artifact), how its experts are picked (interpolate.py --variant), how
evaluate.py loads it, what its artifact is made from (provenance), whether choices are made on its
validation score, and its row in the tables (its place in METHODS). The stages, provenance and the report
read METHODS and dispatch on these fields, never on a method's name: a new baseline is one Method here
(tests/test_methods.py adds one in the test alone). It imports no stage and no torch, so config and
provenance can.

The pair runs (pair-<expert>: one pool expert beside the target's, a cell of the transfer matrix) are one
family, PAIR; they feed the transfer matrix, not the tables."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from common.embeddings import EMBEDDINGS
from common.errors import UserError
from common.expert_types import EXPERT_TYPES

NULL = "null"  # the transfer row's control: an expert that adds nothing (interpolate.py --variant pair-null)
PAIR_PREFIX = "pair-"


def top_k_similar(names: list[str], row: list[float], k: int) -> list[str]:
    """The k tasks most similar to names[0] (the target;
    itself excluded) by its similarity row, best first."""
    order = sorted(range(1, len(names)), key=lambda j: -row[j])
    return [names[j] for j in order[:k]]


def select_from(cfg) -> list[str]:
    """The embeddings whose top-k retrievals selection chooses among
    (interpolate.select_from; [] = every one)."""
    return list(cfg.interpolate.select_from or EMBEDDINGS)


# A pick: (cfg, run, variant, pool, read) -> (the pool experts interpolated beside the target's, how they
# were picked, in words). read(input) -> (its JSON, refuse): one of the method's inputs (below), read with a
# fix that names the command making it; refuse(why) raises the one-line error naming the file.
# Inputs: (cfg, run, variant, fold) -> the artifacts it is made from besides its own fields, as provenance's
# keys ((kind, name[, variant])), in order: the digest hashes them in this order.


def ranked_otherwise(sim: dict, names, embedding: str) -> dict[str, str]:
    """{expert: embedding} of those of `names` a similarity file compared by another embedding than
    `embedding`: imported experts it could not take (common.similarity.ranked_by)."""
    return {e: b for e, b in sim.get("ranked_by", {}).items() if e in names and b != embedding}


def _retrieved(cfg, run, variant, pool, read):
    """π-Tuning's retrieval: interpolate.experts by hand, or the top-k by embed.embedding's similarity."""
    ic = cfg.interpolate
    if ic.experts:
        return list(ic.experts), "by hand (interpolate.experts)"
    sim, _ = read(("similarity", run))
    row = sim["row"] if "row" in sim else sim["matrix"][0]  # (a similarity file of the whole pool's matrix)
    top = top_k_similar(sim["names"], row, ic.top_k)
    by = "; ".join(f"{e} by {b}" for e, b in ranked_otherwise(sim, top, cfg.embed.embedding).items())
    return top, f"top-{ic.top_k} similar" + (f" ({by})" if by else "")


def _random(cfg, run, variant, pool, read):  # a seeded draw: each seed its own random set
    return random.Random(f"random-{cfg.seed}").sample(pool, min(cfg.interpolate.top_k, len(pool))), "random"


def _oracle(cfg, run, variant, pool, read):
    """An upper bound: the experts that measurably help most on this run's test split."""
    row, refuse = read(("transfer", run))
    transfer = row.get("transfer", {})
    if len(transfer) < len(pool):
        refuse(f"transfer measured for {len(transfer)} of {len(pool)} pool experts")
    return sorted(pool, key=lambda s: -transfer[s])[: cfg.interpolate.top_k], "oracle (measured transfer)"


def _paper(cfg, run, variant, pool, read):
    """The paper's retrieval: top-k by the Fisher embedding, whatever embed.embedding says."""
    sim, _ = read(("similarity", run, "fisher"))
    k = cfg.interpolate.top_k
    return top_k_similar(sim["names"], sim["row"], k), f"top-{k} by the Fisher (the paper's)"


def _pair(cfg, run, variant, pool, read):
    other = variant[len(PAIR_PREFIX) :]
    if other == NULL:  # the transfer row's control: the same run with nothing to add
        if EXPERT_TYPES[cfg.expert.method].null is None:
            raise UserError(
                f"--variant {variant}: expert.method={cfg.expert.method} has no expert that changes "
                f"nothing (lora, adapter and ia3 have); leave {variant} out"
            )
        return [NULL], "nothing (an expert that changes nothing: the transfer row's control)"
    if other not in pool:
        raise UserError(f"--variant '{variant}': use {PAIR_PREFIX}<expert> with one of {', '.join(pool)}")
    return [other], "one expert (transfer matrix)"


def _by_similarity(cfg, run, variant, fold):  # the retrieval's similarity file (embed.embedding's)
    return [("similarity", run), *fold]


def _chosen_inputs(cfg, run, variant, fold):  # every embedding selection chooses among
    return [*(("similarity", run, e) for e in select_from(cfg)), *fold]


def _pair_inputs(cfg, run, variant, fold):  # its two experts, not the pool or the retrieval
    other = variant[len(PAIR_PREFIX) :]
    return [("expert", run.split(".")[0]), *fold, *([] if other == NULL else [("expert", other)])]


@dataclass(frozen=True)
class Method:
    """A row of the results tables. `on_val`: scored on the validation split too, as a method choices are
    made among (a recipe, a default: π-Tuning's runs, target-only they are measured against, the pair runs);
    the other baselines are reported on test only."""

    name: str
    what: str
    made_by: str
    on_val: bool = False
    # how evaluate.py loads it: base (the backbone alone), expert (a peft expert directory), full (a fully
    # fine-tuned backbone), uniform (π-Tuning's experts merged with equal weights, no training), peft-linear
    # / peft-ties (peft's add_weighted_adapter over them, where the expert type allows)
    loads: str = "expert"
    # train_expert.py --variant that makes it: experts/<run>[.<trained>]@<d>/ ("" the target's own expert)
    trained: str | None = None
    steps_x: int = 1  # a trained baseline's steps: expert.steps times this
    # interpolate.py --variant that makes it: interpolated/<run>[.<variant>]@<d>/ ("" π-Tuning as configured)
    variant: str | None = None
    pick: Callable | None = None  # how its pool experts are picked (above)
    inputs: Callable = _by_similarity  # what its artifact is made from (above)
    # its place among the baselines the report sets π-Tuning against seed by seed (paired gains, intervals);
    # 0: not one of them
    against: int = 0
    # the studies that make it beside π-Tuning: report (make report), loto (make loto); not where it is
    # π-Tuning itself under the config (same_as_pi)
    studies: tuple = ()
    same_as_pi: Callable = field(default=lambda cfg: False)
    frozen: bool = False  # the experts stay as they are: only the mixing weights learn
    # chosen on the target's validation split among candidate retrievals (interpolate.select), given the
    # config: True for every config, or a function of it
    chosen: Callable = field(default=lambda cfg: False)


PI = Method(
    "pi-tuning",
    "π-Tuning: the target's and its top-k similar experts interpolated",
    "interpolate.py",
    on_val=True,
    variant="",
    pick=_retrieved,
    chosen=lambda cfg: cfg.interpolate.retrieval == "select",
)
PAIR = Method(
    "pair-<expert>",
    "the target's expert and one pool expert interpolated: a cell of the transfer matrix",
    "interpolate.py --variant pair-<expert>",
    on_val=True,
    variant=PAIR_PREFIX,
    pick=_pair,
    inputs=_pair_inputs,
)

# every method the tables compare, by name, in their order (evaluate.py scores those whose artifacts exist);
# one scored but missing here is shown after these, not hidden
_METHODS = (
    ZERO_SHOT := Method("zero-shot", "the backbone alone", "the backbone stage", loads="base"),
    TARGET_ONLY := Method(
        "target-only",
        "the target's own expert",
        "train_expert.py --task T --shots N",
        on_val=True,
        trained="",
        against=1,
    ),
    Method(
        "target-only-2x",
        "the target's expert trained twice as long",
        "train_expert.py --variant 2x",
        trained="2x",
        steps_x=2,
        studies=("report",),
        against=2,
    ),
    Method(
        "full-ft",
        "the whole backbone fine-tuned on the target",
        "train_expert.py --variant full-ft",
        loads="full",
        trained="full-ft",
        studies=("report",),
    ),
    Method(
        "uniform-merge",
        "the target's and the top-k experts averaged, no training",
        "evaluate.py",
        loads="uniform",
        against=4,
    ),
    Method(
        "linear-merge",
        "peft add_weighted_adapter 'linear' (A and B averaged apart)",
        "evaluate.py",
        loads="peft-linear",
    ),
    Method("ties-merge", "peft add_weighted_adapter 'ties' (density 0.5)", "evaluate.py", loads="peft-ties"),
    RANDOM_K := Method(
        "pi-random",
        "π-Tuning with k random pool experts",
        "interpolate.py --variant random",
        on_val=True,
        variant="random",
        pick=_random,
        studies=("report", "loto"),
        against=3,
    ),
    Method(
        "pi-frozen",
        "π-Tuning with the experts frozen (only the weights learn)",
        "interpolate.py --variant frozen",
        on_val=True,
        variant="frozen",
        pick=_retrieved,
        studies=("report",),
        frozen=True,
    ),
    PAPER := Method(
        "pi-paper",
        "π-Tuning with the paper's retrieval: the top-k by the Fisher embedding",
        "interpolate.py --variant paper",
        on_val=True,
        variant="paper",
        pick=_paper,
        studies=("loto",),
        # the paper's is π-Tuning's where π-Tuning retrieves by the Fisher's fixed top-k
        same_as_pi=lambda cfg: cfg.embed.embedding == "fisher" and cfg.interpolate.retrieval == "fixed",
        inputs=lambda cfg, run, variant, fold: [("similarity", run, "fisher"), *fold],
    ),
    SELECT := Method(
        "pi-select",
        "π-Tuning with its retrieval chosen on the target's validation split (k = 0 among them)",
        "interpolate.py --variant select",
        on_val=True,
        variant="select",
        chosen=lambda cfg: True,
        studies=("loto",),
        same_as_pi=lambda cfg: cfg.interpolate.retrieval == "select",
    ),
    PI,
    ORACLE := Method(
        "pi-oracle",
        "π-Tuning with the k experts that help most on test (an upper bound)",
        "interpolate.py --variant oracle",
        variant="oracle",
        pick=_oracle,
        studies=("report",),
        inputs=lambda cfg, run, variant, fold: [("similarity", run), *fold, ("transfer", run)],
    ),
)
METHODS = {m.name: m for m in _METHODS}


def inputs_of(method: Method, cfg, run: str, variant: str, fold: list) -> list:
    """What an interpolation is made from besides its own fields: a run chosen on validation reads every
    embedding selection chooses among, any other its method's inputs."""
    return (_chosen_inputs if method.chosen(cfg) else method.inputs)(cfg, run, variant, fold)


def by_variant(variant: str) -> Method:
    """The method interpolate.py --variant <variant> makes ("" π-Tuning; pair-<expert> the pair family)."""
    if variant.startswith(PAIR_PREFIX):
        return PAIR
    found = next((m for m in METHODS.values() if m.variant == variant), None)
    if found is None:
        names = [m.variant for m in METHODS.values() if m.variant] + [
            f"{PAIR_PREFIX}{NULL}",
            f"{PAIR_PREFIX}<expert>",
        ]
        raise UserError(f"--variant '{variant}': use pi, {', '.join(names)} or pairs")
    return found


def studied(cfg, study: str) -> list[Method]:
    """The methods a study makes beside π-Tuning under this config ("": none, make all)."""
    return [m for m in METHODS.values() if study in m.studies and not m.same_as_pi(cfg)]


def trained_baselines() -> dict[str, Method]:
    """Every train_expert.py --variant that makes a baseline, and its method."""
    return {m.trained: m for m in METHODS.values() if m.trained}


def interpolations() -> list[str]:
    """Every interpolate.py --variant but the pair family ("" π-Tuning's own)."""
    return [m.variant for m in METHODS.values() if m.variant is not None]


def row_name(variant: str) -> str:
    """The tables' row of an interpolate.py --variant run (a pair run keeps its variant's name)."""
    return variant if variant.startswith(PAIR_PREFIX) else by_variant(variant).name


def on_val(method: str) -> bool:
    """Is this method scored on validation too? Listed ones as METHODS says; pair runs yes, and a method the
    list lacks (a result written when the registry held another) yes."""
    return METHODS[method].on_val if method in METHODS else True


def ordered(runs: list[dict]) -> list[str]:
    """The methods scored in any of these results, in the tables' order; any not in METHODS (a result written
    when the registry held another) after them, not hidden."""
    scored = {m for r in runs for m in r["scores"] if not m.startswith(PAIR_PREFIX)}
    order = list(METHODS)
    return [m for m in order if m in scored] + sorted(scored - set(order))
