"""What the retrieval embeddings (common/embeddings.py) compute, and the similarity between tasks: COMPUTE,
one entry per embedding.

fisher: the diagonal Fisher of an expert's own parameters, compared with π-Tuning's normalised cosine.
weights: what the expert changed (SPoT-style): each site's weight update (LoRA B·A, IA3 scale - 1, the
adapter's up·down, the prompt's / prefix layer's mean token), compared by plain cosine per site."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common import data, dist
from common.artifacts import atomic_file, read_json
from common.backbone import backbone_dir, fingerprint, load_backbone
from common.data import Encoder, Example, batches
from common.device import accelerator
from common.embeddings import DATA_FREE, EMBEDDINGS
from common.errors import UserError
from common.expert_types import EXPERT_TYPES
from common.experts import (
    WEIGHTS,
    attach,
    expert_dir,
    load_expert_weights,
    read_expert_meta,
    set_weights,
    tensor_shapes,
)
from common.imported import file_hash
from common.metrics import answer_logprobs, sampled_answers
from common.provenance import SCORED_SIZES

EPS = 1e-6


def fisher_diagonal(
    model,
    enc: Encoder,
    exs: list[Example],
    estimator: str = "per_sample",
    batch_size: int = 16,
    desc: str = "fisher",
    autocast=contextlib.nullcontext,
    answers=None,
) -> dict[str, torch.Tensor]:
    """E[(d log p(y|x) / d phi)^2] over exs for every trainable tensor phi, at the current weights.

    per_sample: the squared gradient of each example's log-likelihood (the diagonal empirical Fisher).
    batch: the squared gradient of each mini-batch's summed log-likelihood, divided by the number of
    examples (what the original code computed). `answers(chunk, i)` gives the answers to differentiate for the
    i-th mini-batch (None: the examples' own, the empirical Fisher). No optimizer step is ever taken. The
    forward runs under `autocast` (the stage's precision); the squared gradients accumulate in fp32 whatever
    it is. Under torchrun each rank takes its share of the examples
    (or mini-batches) and the sums are added over ranks."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    step = 1 if estimator == "per_sample" else batch_size
    mine = batches(exs, step, shard=True)  # decoded as taken (data.num_workers workers), not all held at once
    total = len(range(dist.rank(), -(-len(exs) // step), dist.world()))
    for i, chunk in tqdm(
        zip(range(dist.rank(), total * dist.world(), dist.world()), mine),
        total=total,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=None if dist.is_main() else True,
    ):
        with autocast():
            targets = [e.answer for e in chunk] if answers is None else answers(chunk, i)
            logp = answer_logprobs(model, enc, chunk, targets).sum()
        grads = torch.autograd.grad(logp, list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            fisher[n] += g.float() ** 2
    summed = dist.all_sum(list(fisher.values()))
    return {n: f / len(exs) for n, f in zip(fisher, summed)}


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fisher_cache(cfg, name: str, reference: str = "") -> tuple[Path, dict[str, str]]:
    """Where expert `name`'s Fisher under cfg.embed is cached, and the key the cached file must carry: every
    setting that changes the Fisher (the expert's tensors and config, or the hash of the common `reference`
    weights it is taken at; the backbone, the data that feeds it, the estimator, the answers). One pass with
    per-sample gradients at the expert's own weights is the plain file,
    every other estimate sits beside it."""
    fc, path = cfg.embed, expert_dir(cfg, name)
    meta = json.loads((path / "meta.json").read_text())
    sampled = meta["shots"] is not None  # a target's k-shot sample
    fed_by = [
        {k: v for k, v in cfg.to_dict()[s].items() if f"{s}.{k}" not in SCORED_SIZES}
        for s in ("world", "data")
    ] + ([cfg.tasks.shots_per_class] if sampled else [])  # the train split: not the scored splits' sizes
    expert_config = json.loads((path / "adapter_config.json").read_text())
    expert_config.pop("base_model_name_or_path", None)  # where the backbone was: moving runs/ changes nothing
    own = fc.at == "own"  # at the common point the expert's own tensors change nothing: not read
    key = {
        # the sha256 of its bytes, remembered by the file's size and times (read once, not at every use)
        "expert": file_hash(path / WEIGHTS, cfg.run_dir / "fisher" / ".hashes.json", True)
        if own
        else reference,
        "backbone": fingerprint(backbone_dir(cfg)),
        "expert_config": _hash(json.dumps(expert_config, sort_keys=True).encode()),
        "data": _hash(json.dumps(fed_by, sort_keys=True).encode()),
        "estimator": fc.estimator,
        "samples": str(fc.samples),
    }
    if cfg.precision != "fp32":  # the forward's precision (fp32 keys stay as they were before the field)
        key["precision"] = cfg.precision
    variant = "" if fc.estimator == "per_sample" else f".{fc.estimator}"
    if fc.estimator == "batch":  # a per-sample Fisher takes one example at a time, whatever the batch size
        key["batch_size"] = str(fc.batch_size)
    if fc.passes > 1:
        key["passes"] = str(fc.passes)
        variant += f".passes{fc.passes}"
    if not own:
        key["at"] = fc.at
        variant += f".at-{fc.at}"
    if fc.answers != "truth":
        key["answers"] = fc.answers
        variant += f".{fc.answers}-answers"
    # a file's examples: a seeded sample of them, not its first rows
    if not data.from_world(cfg, meta["task"]):
        key["sample"] = "seeded"
    return cfg.run_dir / "fisher" / f"{path.name}{variant}.safetensors", key  # the expert's name@digest


SAMPLED = "sampled"  # the cache's note of which examples the Fisher took (data.subset), beside its key


def cached_fisher(path: Path, key: dict) -> dict[str, torch.Tensor] | None:
    """The stored tensors (a Fisher, an expert's prototypes) if they were computed with this key (None:
    compute them)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if {k: v for k, v in (f.metadata() or {}).items() if k != SAMPLED} != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a corrupt cache entry is simply recomputed
        return None


def fisher_samples(cfg, names: list[str]) -> dict[str, str]:
    """Which examples each expert's cached Fisher under cfg.embed took (its cache's note; '-' where the cache
    predates the note), for the similarity file."""
    out = {}
    for name in names:
        path = fisher_cache(cfg, name)[0]
        try:
            with safe_open(str(path), "pt") as f:
                out[name] = (f.metadata() or {}).get(SAMPLED, "-")
        except Exception:
            out[name] = "-"
    return out


def normalized(fisher: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """Scale each tensor to mean 1: raw values (~1e-8..1e-13 here) would drown in the 1e-6 epsilon."""
    if mode == "none":
        return fisher
    return {n: f / f.mean().clamp_min(1e-30) for n, f in fisher.items()}


def _sites(a: dict, b: dict) -> list[str]:
    """The sites two embeddings share, in one order whatever order they were listed in (a Fisher just computed
    lists its tensors in module order, one read back from its cache sorted;
    float sums depend on the order)."""
    if a.keys() != b.keys():
        raise ValueError("experts have different tensors; embed experts of one type and one backbone")
    return sorted(a)


def task_similarity(fa: dict[str, torch.Tensor], fb: dict[str, torch.Tensor]) -> float:
    """Symmetric normalised cosine per tensor: a'=Fa/(Fa+Fb+eps), b'=Fb/(Fa+Fb+eps), s=cos(a',b');
    mean over tensors."""
    sims = []
    for n in _sites(fa, fb):
        a, b = fa[n].flatten().double(), fb[n].flatten().double()
        denom = a + b + EPS
        sims.append(F.cosine_similarity(a / denom, b / denom, dim=0).item())
    return sum(sims) / len(sims)


def expert_update(weights: dict[str, torch.Tensor], method: str, layers: int = 1) -> dict[str, torch.Tensor]:
    """{site: what the expert adds there} from its saved tensors (no backbone needed), as its type defines it
    (common/expert_types.py: LoRA's B·A, IA3's scales - 1, an adapter's up·down, a prompt's mean token)."""
    out = EXPERT_TYPES[method].update(weights, layers)
    if not out:
        raise ValueError(f"no {method} expert tensors found")
    return out


class LowRank:
    """An update b @ a kept as its factors (out x r, r x in, fp32: a thousand Florence-2-base LoRAs in 7 GB),
    never formed: <b1 a1, b2 a2> = sum((b1^T b2) * (a1 a2^T)), r x r work summed in fp64, and its squared norm
    computed once."""

    def __init__(self, b: torch.Tensor, a: torch.Tensor):
        self.b, self.a = b.float(), a.float()
        self.norm2 = self.dot(self)

    def dot(self, other: LowRank) -> float:
        return float(((self.b.T @ other.b).double() * (self.a @ other.a.T).double()).sum())


def _cosine(x, y) -> float:
    if isinstance(x, LowRank):
        den = math.sqrt(x.norm2 * y.norm2)
        return x.dot(y) / den if den > 0 else 0.0
    return F.cosine_similarity(x.flatten().double(), y.flatten().double(), dim=0).item()


def _either(a: dict, b: dict) -> list[str]:
    """The sites either of two experts adapts, in one order (experts of different recipes, imported ones, may
    adapt different modules: at a site only one adapts, the other's update is nothing, its cosine 0)."""
    return sorted(a.keys() | b.keys())


def update_similarity(ua: dict, ub: dict) -> float:
    """Mean over the sites either adapts of the cosine between the two experts' updates there (each a tensor,
    or a LowRank; 0 where one has none)."""
    sites = _either(ua, ub)
    return sum(_cosine(ua[n], ub[n]) if n in ua and n in ub else 0.0 for n in sites) / len(sites)


def update_embedding(weights: dict[str, torch.Tensor], method: str, layers: int = 1) -> dict:
    """{site: the expert's update there}: a LowRank where its type's update is a product of factors (LoRA,
    DoRA's direction, adapters), so no d x d matrix is formed; the tensor otherwise."""
    etype = EXPERT_TYPES[method]
    if etype.factors is not None and (factors := etype.factors(weights)):
        return {site: LowRank(b, a) for site, (b, a) in factors.items()}
    return expert_update(weights, method, layers)


def weights_of(path: Path, method: str) -> dict:
    """The update_embedding of the expert saved in folder `path` (an artifact, or any peft adapter folder)."""
    layers = read_json(path / "adapter_config.json", "expert config", "retrain it").get("num_layers") or 1
    try:
        return update_embedding(load_expert_weights(path), method, layers)
    except ValueError as e:
        raise UserError(
            f"{path}: {e}; embed.embedding=weights needs experts of expert.method={method}"
        ) from None


def weight_embedding(cfg, name: str) -> dict:
    return weights_of(expert_dir(cfg, name), cfg.expert.method)


def fisher_embeddings(cfg, names: list[str]) -> tuple[list[dict[str, torch.Tensor]], str]:
    """Each expert's diagonal Fisher on its own training data (cached per expert and settings), normalised;
    and how many had to be computed. Runs that want the same Fishers at once (make study: several targets
    and seeds share the pool) share the work: each first computes those no other process is computing
    (a lock beside each cache file), then waits for the others' and reads them."""
    fc = cfg.embed
    loaded: list = []  # (peft model, encoder, accelerator), once something needs computing
    fishers, computed = {}, []
    reference = common_reference(cfg, names) if fc.at == "pool-mean" else None
    ref_hash = (
        _hash(b"".join(v.float().numpy().tobytes() for _, v in sorted(reference.items())))
        if reference
        else ""
    )
    where = {n: fisher_cache(cfg, n, ref_hash) for n in names}  # every variant kept: the study compares them

    def compute(name: str) -> dict[str, torch.Tensor]:
        if not loaded:  # load the backbone only when something needs computing
            accel = accelerator(cfg)
            model, processor = load_backbone(cfg, accel.device)
            enc = data.Encoder(processor, accel.device, generation=model.generation_config)
            loaded.extend([attach(model, cfg.expert), enc, accel])
        fisher, sampled = _fisher_of(cfg, name, reference, *loaded)
        with atomic_file(where[name][0]) as tmp:
            save_file(fisher, str(tmp), metadata={**where[name][1], SAMPLED: sampled})
        computed.append(name)
        return fisher

    for wait in (False, True):
        for name in (n for n in names if n not in fishers):
            out, key = where[name]
            fisher = cached_fisher(out, key)
            if fisher is None:
                with _turn(out, wait) as mine:
                    if not mine:  # another process is computing it: back to it once the free ones are done
                        continue
                    # another process may have just written it
                    fisher = cached_fisher(out, key) or compute(name)
            fishers[name] = normalized(fisher, fc.normalize)
    return [
        fishers[n] for n in names
    ], f"{len(computed)} Fisher computed, {len(names) - len(computed)} cached"


@contextlib.contextmanager
def _turn(out: Path, wait: bool = True):
    """Hold the lock beside cache file `out`: yields True once held; with wait=False, False at once when
    another process holds it. Under torchrun the ranks compute together, so no lock (rank 1 waiting on it
    while rank 0 waits for rank 1's share would never end)."""
    if dist.launched():
        yield True
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def _fisher_of(
    cfg, name: str, reference: dict | None, peft_model, enc, accel
) -> tuple[dict[str, torch.Tensor], str]:
    """Expert `name`'s Fisher under cfg.embed, and which examples it took: at its own weights (or the common
    reference), on embed.samples of its own training data as it saw it (the low-shot sample for the target;
    data.subset); with embed.passes, a low-shot sample is passed again (dropout on, so each pass differs) up
    to `samples`."""
    fc, path = cfg.embed, expert_dir(cfg, name)
    meta = read_expert_meta(path)
    set_weights(peft_model, reference or load_expert_weights(path))
    train = data.train_split(cfg, meta["task"], meta["shots"] or 0, meta["seed"])
    exs, sampled = data.subset(cfg, meta["task"], train, fc.samples, f"fisher/{name}")
    exs = exs * min(fc.passes, math.ceil(fc.samples / max(len(exs), 1)))
    peft_model.train(fc.passes > 1)
    torch.manual_seed(0)  # the same dropout whichever process computes (and caches) this Fisher
    task = data.task(cfg, meta["task"])
    drawn = (
        None
        if fc.answers == "truth"
        else lambda chunk, i: sampled_answers(peft_model, enc, task, chunk, torch.Generator().manual_seed(i))
    )
    fisher = fisher_diagonal(
        peft_model,
        enc,
        exs,
        fc.estimator,
        fc.batch_size,
        desc=f"fisher {name}",
        autocast=accel.autocast,
        answers=drawn,
    )
    fisher = {k.replace(".default", ""): v.contiguous().cpu() for k, v in fisher.items()}
    if not all(torch.isfinite(v).all() for v in fisher.values()):
        raise UserError(
            f"{path}: its Fisher is not finite, nothing written; retrain the expert with a lower expert.lr"
        )
    return fisher, sampled


def top_direction(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The unit top right-singular vector of b @ a (out x r times r x in) by r x r work, no out x in matrix:
    a^T = Qa Ra and b = Qb Rb, so b a = Qb (Rb Ra^T) Qa^T, whose right singular vectors are Qa times those of
    the small middle."""
    qa, ra = torch.linalg.qr(a.double().T)
    _, rb = torch.linalg.qr(b.double())
    return qa @ torch.linalg.svd(rb @ ra.T)[2][0]


def prototypes(embedding: dict) -> dict[str, torch.Tensor]:
    """{site: the input direction the expert's update acts on most} (peft's Arrow routing prototypes) from its
    update_embedding: the top right-singular vector of a LowRank; the direction of a vector-valued update
    (IA3's scales - 1, a prompt's mean token)."""
    return {
        site: top_direction(u.b, u.a) if isinstance(u, LowRank) else F.normalize(u.double().flatten(), dim=0)
        for site, u in embedding.items()
    }


def prototypes_of(path: Path, method: str, cache: Path) -> dict[str, torch.Tensor]:
    """The prototypes of the expert saved in folder `path`, computed once per expert file: cached in `cache`
    under the hash of its weights (a QR and an SVD per site: 24 s for 1,000 Florence-2-base LoRAs, each time
    a target was embedded; bench/README), the hash itself remembered by the file's size and time."""
    weights = Path(path) / WEIGHTS
    out = cache / f"{Path(path).name}.prototypes.safetensors"  # an artifact's name@digest
    key = {
        "expert": file_hash(weights, cache / ".hashes.json", True) if weights.is_file() else "",
        "method": method,
    }
    if (cached := cached_fisher(out, key)) is not None:
        return cached
    protos = prototypes(weights_of(path, method))
    with atomic_file(out) as tmp:
        save_file({k: v.contiguous() for k, v in protos.items()}, str(tmp), metadata=key)
    return protos


def prototype_embedding(cfg, name: str) -> dict[str, torch.Tensor]:
    return prototypes_of(expert_dir(cfg, name), cfg.expert.method, cfg.run_dir / "embeddings")


def prototype_similarity(pa: dict[str, torch.Tensor], pb: dict[str, torch.Tensor]) -> float:
    """Mean over the sites either adapts of |cos| of the two prototypes (a singular vector's sign is
    arbitrary; 0 where one has none)."""
    sites = _either(pa, pb)
    return sum(
        abs(F.cosine_similarity(pa[n], pb[n], dim=0).item()) if n in pa and n in pb else 0.0 for n in sites
    ) / len(sites)


def common_reference(cfg, names: list[str]) -> dict[str, torch.Tensor]:
    """embed.at: pool-mean: one set of expert weights for every task's Fisher, the mean of the pool's
    full-data experts among `names` (every tensor averaged; the target's own expert left out, so the pool's
    Fishers do not depend on the target). A LoRA at its init (B = 0) would pass no gradient to A; the mean of
    trained experts has both factors non-zero, and a task's Fisher there says what its data asks, not where
    its own expert ended up."""
    pool = [n for n in names if n in cfg.tasks.pool]
    if not pool:
        raise UserError(f"{cfg.path}: embed.at: pool-mean needs pool experts to average; use embed.at: own")
    weights = [load_expert_weights(expert_dir(cfg, n)) for n in pool]
    return {
        k: torch.stack([w[k].float() for w in weights]).mean(0)
        for k in weights[0]  # fp32, as the experts are
    }


def similarity_matrix(embeddings: Iterable, sim=task_similarity) -> list[list[float]]:
    embeddings = list(embeddings)
    n = len(embeddings)
    m = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            m[i][j] = m[j][i] = sim(embeddings[i], embeddings[j])
    return m


def similarity_row(embeddings: Iterable, sim=task_similarity) -> list[float]:
    """The first embedding's similarity to each (itself: 1): what retrieval for a target needs, N - 1
    comparisons instead of the N^2 / 2 of the whole matrix. Read one at a time: from a generator, only the
    first and the one compared are held (a library of thousands streams from disk)."""
    embeddings = iter(embeddings)
    first = next(embeddings)
    return [1.0] + [sim(first, e) for e in embeddings]


@dataclass(frozen=True)
class Computed:
    """How an embedding is computed. embed(cfg, names) -> ([one embedding per expert name], what it did: "2
    Fisher computed, 1 cached"); similarity(a, b) -> how alike two embeddings are (1 for the same task);
    examples(cfg, names) -> {expert: which of its examples it took}, recorded in the similarity file."""

    embed: Callable
    similarity: Callable
    examples: Callable | None = None


def _each(embedding: Callable, work: str) -> Callable:
    """embed(): a per-expert embedding over the names, each made when the comparison reaches it (a
    generator: similarity_row holds two at a time), no cache to report."""
    return lambda cfg, names: ((embedding(cfg, n) for n in names), work)


# one entry per embedding of common/embeddings.py, under its name
COMPUTE = {
    "fisher": Computed(fisher_embeddings, task_similarity, fisher_samples),
    "weights": Computed(_each(weight_embedding, "weight updates"), update_similarity),
    "prototypes": Computed(_each(prototype_embedding, "update prototypes"), prototype_similarity),
}


def ranked_by(cfg, names: list[str]) -> dict[str, str]:
    """{expert: the embedding it is compared by}: embed.embedding, but one computed from data (the Fisher)
    takes an imported expert only where it brings data and has the configured expert's parameters (the same
    tensors, at the same scale); any other import is compared by the data-free DATA_FREE instead."""
    configured = cfg.embed.embedding
    if not EMBEDDINGS[configured].needs_data:
        return dict.fromkeys(names, configured)
    own = next((n for n in names if n not in cfg.tasks.imported), None)
    shapes = tensor_shapes(expert_dir(cfg, own)) if own else None
    scale = [round(cfg.expert.alpha / cfg.expert.r, 6)]

    def takes_it(n: str) -> bool:
        if n not in cfg.tasks.imported:
            return True
        if not data.has_data(cfg, n):
            return False
        path = expert_dir(cfg, n)
        return tensor_shapes(path) == shapes and read_expert_meta(path)["recipe"]["scales"] == scale

    return {n: configured if takes_it(n) else DATA_FREE for n in names}


def compared(cfg, names: list[str], target: bool) -> tuple[list[list[float]], str]:
    """(the target's row, or the pool's matrix; what was computed): each pair by the embedding both its
    experts are ranked by, the data-free one where either lacks the Fisher (ranked_by)."""
    by, configured = ranked_by(cfg, names), cfg.embed
    sims, works = {}, []
    for e in dict.fromkeys(by.values()):
        part = [n for n in names if by[n] == e or e == DATA_FREE]  # every pair can fall back to the data-free
        if len(part) == 1:  # the target alone: nothing to compare it with by this embedding
            sims[e] = {(part[0], part[0]): 1.0}
            continue
        cfg.embed, how = dataclasses.replace(configured, embedding=e), COMPUTE[e]
        try:
            embeddings, work = how.embed(cfg, part)
            works.append(work)
            if target:
                sims[e] = {(part[0], n): v for n, v in zip(part, similarity_row(embeddings, how.similarity))}
            else:
                m = similarity_matrix(embeddings, how.similarity)
                sims[e] = {(a, b): m[i][j] for i, a in enumerate(part) for j, b in enumerate(part)}
        except ValueError as err:
            raise UserError(
                f"{cfg.path}: {err} (expert.method / backbone must be the same for all of {names})"
            ) from None
        finally:
            cfg.embed = configured

    def pair(a: str, b: str) -> float:
        return sims[by[a] if by[a] == by[b] else DATA_FREE][(a, b)]

    rows = [[pair(names[0], n) for n in names]] if target else [[pair(a, b) for b in names] for a in names]
    return rows, ", ".join(works)
