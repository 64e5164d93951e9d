"""Run configuration: one YAML per profile, `key=value` overrides, validated at the door."""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.embeddings import EMBEDDINGS
from common.errors import UserError
from common.expert_types import EXPERT_TYPES
from common.methods import NULL
from common.tasks import define

VENV_PYTHON = ".venv/bin/python"  # what make creates; the commands an error names run with it


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: lo <= x <= hi (strict where open; None = unbounded)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x) -> bool:
        if not math.isfinite(x):
            return False
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"above {self.lo}" if self.lo_open else f"{self.lo} or more"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def outside(self):
        """A value this range refuses (the schema test feeds one to every ranged field)."""
        return self.lo if self.lo_open else self.lo - 1


def ranged(default, lo, hi=None, lo_open=False, hi_open=False):
    """A numeric field and the values it accepts, checked where the config is read."""
    return field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open)})


def nonempty(factory):
    """A list field that must hold at least one item."""
    return field(default_factory=factory, metadata={"nonempty": True})


@dataclass
class WorldConfig:
    seed: int = ranged(1234, 0)
    image_size: int = ranged(64, 16)
    train_size: int = ranged(1500, 1)
    val_size: int = ranged(200, 1)
    test_size: int = ranged(400, 1)


@dataclass
class DataConfig:
    source: str = (
        "mini"  # mini: the embedded world | files: the paper's tasks (configs/paper_tasks.yaml) under root
    )
    root: str = "data"  # OFA's *_data/ folders, CoOp folders, `hf download` copies of hub datasets
    download: bool = False  # fetch hub-hosted tasks (GLUE) into root when their files are missing
    # per task, split -> file under root instead of the catalogue's default, e.g.
    # {snli-ve: {train: snli_ve/snli_ve_train.jsonl}} (SNLI-VE's own annotations + root/flickr30k-images/)
    files: dict = field(default_factory=dict)
    # at most this many rows of a split, a seeded random sample of the file's (0 = all of them)
    train_size: int = ranged(0, 0)
    val_size: int = ranged(1000, 1)
    test_size: int = ranged(0, 0)
    # leave out of every task's training data the examples whose image is in a scored split (val or test) of
    # any task in the pool (by image id where the task names one,
    # else by the image's bytes): data.without_scored
    exclude_scored_images: bool = True
    # DataLoader worker processes that read and encode the training batches (0: the stage's own process);
    # how a batch is made, not what it is: the same batches either way
    num_workers: int = ranged(0, 0)


@dataclass
class BackboneConfig:
    source: str = "embedded"  # "embedded" = built and pre-trained here; else a hub id or local dir
    d_model: int = ranged(128, 1)
    encoder_layers: int = ranged(2, 1)
    decoder_layers: int = ranged(2, 1)
    heads: int = ranged(4, 1)
    ffn_dim: int = ranged(256, 1)
    vision_dims: list = nonempty(lambda: [32, 64, 96])
    vision_heads: list = nonempty(lambda: [2, 4, 4])
    dropout: float = ranged(0.1, 0, 1, hi_open=True)


@dataclass
class PretrainConfig:
    steps: int = ranged(1500, 1)
    batch_size: int = ranged(32, 1)
    # with 1,500 steps, warm-up and cosine decay (docs/mini-world.md)
    lr: float = ranged(1e-3, 0, lo_open=True)
    grad_clip: float = ranged(1.0, 0)  # 0 = no clipping
    warmup: int = ranged(100, 0)
    # batches per optimizer step (the effective batch is batch_size x grad_accum)
    grad_accum: int = ranged(1, 1)
    gradient_checkpointing: bool = (
        False  # recompute activations in backward: less memory, same result, slower
    )
    # keep the loop's state every N steps, to resume after a crash (0 = never)
    checkpoint_every: int = ranged(0, 0)


@dataclass
class TasksConfig:
    pool: list = nonempty(lambda: ["snli-ve", "nli"])
    # the target's training data: a seeded k-shot sample (0 = its whole train split)
    target_shots: int = ranged(64, 0)
    shots_per_class: bool = False  # CoOp style: k examples of every answer class instead of k in all
    # tasks read from a researcher's own files, by name: {mine: {files: {train: .., test: ..}, prompt: ..,
    # answer: .., image: .., ...}} (common/tasks.py DEFINE_FIELDS);
    # a defined task can be in pool or the target
    define: dict = field(default_factory=dict)
    # pool experts trained elsewhere, by name: {mine: adapter directory or hub id} (peft LoRA adapters;
    # common/imported.py); a name that is also a task (catalogue or define) brings its data, else none
    imported: dict = field(default_factory=dict)


@dataclass
class ExpertConfig:
    method: str = "lora"  # one of common/expert_types.py: lora | dora | ia3 | prompt | prefix | adapter
    r: int = ranged(8, 1)  # lora rank
    alpha: float = ranged(16.0, 0, lo_open=True)  # lora scale alpha/r
    dropout: float = ranged(0.0, 0, 1, hi_open=True)  # lora / adapter dropout
    target_modules: str = (
        ""  # full-name regex of the modules to adapt; "" = the method's default (experts.py)
    )
    virtual_tokens: int = ranged(16, 1)  # prompt / prefix length
    adapter_dim: int = ranged(128, 1)  # bottleneck width of the Houlsby adapters
    steps: int = ranged(300, 1)
    batch_size: int = ranged(32, 1)
    # 0 = the type's own (expert_types.py: 1e-3 lora/dora/adapter, 1e-2 ia3/prefix, 3e-2 prompt)
    lr: float = ranged(0.0, 0)
    grad_clip: float = ranged(1.0, 0)  # 0 = no clipping
    eval_size: int = ranged(200, 1)  # validation examples scored after training
    # batches per optimizer step (the effective batch is batch_size x grad_accum)
    grad_accum: int = ranged(1, 1)
    gradient_checkpointing: bool = (
        False  # recompute activations in backward: less memory, same result, slower
    )
    # keep the loop's state every N steps, to resume after a crash (0 = never)
    checkpoint_every: int = ranged(0, 0)
    # the full fine-tuning baseline (train_expert.py --variant full-ft)
    full_ft_lr: float = ranged(1e-4, 0, lo_open=True)


OLD_SECTION = "fisher"  # the embed section's name until 2026-12 (it holds embed.embedding: weights too)


@dataclass
class EmbedConfig:
    # common/embeddings.py: fisher (π-Tuning's: the diagonal Fisher of each expert) | weights (the cosine of
    # what each expert changed, SPoT-style, no backbone pass);
    # the mini profile ships weights (docs/retrieval.md)
    embedding: str = "fisher"
    estimator: str = "per_sample"  # per_sample | batch (the original code's squared batch gradient)
    samples: int = ranged(256, 1)
    batch_size: int = ranged(16, 1)
    normalize: str = "mean"  # mean: each tensor scaled to mean 1 before comparing | none
    # > 1: up to this many passes over an expert's examples, dropout on, until `samples` gradients
    passes: int = ranged(1, 1)
    # own: each expert's Fisher at its own weights | pool-mean: every task's at the mean pool expert
    at: str = "own"
    # truth: the examples' answers (empirical Fisher) | model: drawn from the model's own distribution
    answers: str = "truth"


@dataclass
class InterpolateConfig:
    top_k: int = ranged(2, 1)
    # pick the pool experts by hand (as the original did); [] = top-k
    experts: list = field(default_factory=list)
    groups: str = "site"  # global | layer | site | tensor
    train_experts: bool = True
    # short and gentle (the paper's 1e-4): longer or faster, the mix drifts back to the target's own expert
    # (docs/configs.md)
    steps: int = ranged(60, 1)
    batch_size: int = ranged(16, 1)
    lr: float = ranged(1e-4, 0, lo_open=True)  # experts
    logits_lr: float = ranged(5e-2, 0, lo_open=True)  # interpolation logits
    grad_clip: float = ranged(1.0, 0)  # 0 = no clipping
    # batches per optimizer step (the effective batch is batch_size x grad_accum)
    grad_accum: int = ranged(1, 1)
    gradient_checkpointing: bool = (
        False  # recompute activations in backward: less memory, same result, slower
    )
    # keep the loop's state every N steps, to resume after a crash (0 = never)
    checkpoint_every: int = ranged(0, 0)
    # stacking: the fraction of the target's training examples held out of the expert the mix is learned with.
    # The mix learns on them (the experts frozen) with the target's expert refitted on the rest
    # (experts/<run>.fold, train_expert.py --variant fold); its weights then apply to the expert fitted on all
    # of them, and with train_experts the experts train on all of them under those weights. 0 = the paper's:
    # the mix learns on the very examples the target's expert fitted, where that expert can win the mix by
    # memory (docs/mini-world.md)
    holdout: float = ranged(0.0, 0, 1, hi_open=True)
    # how π-Tuning picks its experts: fixed (the top_k most similar by embed.embedding, the paper's) | select
    # (on the target's own validation split, among the top-k of each embedding of select_from for each k of
    # select_k and k = 0, the target's expert alone: the interpolation scoring best there;
    # test is never read to choose)
    retrieval: str = "fixed"
    # embeddings (common/embeddings.py); [] = every registered one
    select_from: list = field(default_factory=list)
    select_k: list = nonempty(lambda: [1, 2])


@dataclass
class EvaluateConfig:
    batch_size: int = ranged(64, 1)
    merges: bool = (
        True  # score the untrained merges of π-Tuning's experts too (uniform, peft's linear and TIES)
    )
    validation: bool = (
        True  # score on the validation split too the methods choices are made among (report.on_val)
    )


@dataclass
class DebugConfig:
    # end a training stage with SIGKILL after this step (tests of resume; 0 = off)
    kill_at_step: int = ranged(0, 0)
    # under torchrun: this rank raises after a training stage's last step (-1 = off)
    fail_rank: int = ranged(-1, -1)


@dataclass
class Config:
    profile: str = "mini"
    runs_dir: str = "runs"
    seed: int = ranged(0, 0)
    threads: int = ranged(0, 0)  # 0 = torch default
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only): autocast through accelerate; weights stay fp32
    log_every: float = ranged(30.0, 0)  # seconds between progress lines without a terminal (0 = every step)
    log_with: str = (
        "none"  # none | tensorboard | wandb: loss, lr, examples/s of every step to accelerate's tracker
    )
    # what the frozen backbone would compute again and again, memoised, each up to this much (0 = off):
    # Florence-2's vision tower per image, and evaluate.py's encoded inputs per batch
    # (every method scores the same batches)
    feature_cache_mb: int = ranged(1024, 0)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    interpolate: InterpolateConfig = field(default_factory=InterpolateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    # where this config was read from and the overrides applied, for error messages and the commands they name
    # (not part of the run's identity)
    path: str = field(default="<defaults>", compare=False)
    overrides: tuple = field(default=(), compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.profile

    @property
    def control(self) -> str:
        """The transfer row's control run's expert name, or "-" where expert.method has no expert that changes
        nothing (ExpertType.null); the Makefile reads it through --get."""
        return NULL if EXPERT_TYPES[self.expert.method].null else "-"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path"), d.pop("overrides")
        return d

    def where(self, name: str) -> str:
        """What set a field, for an error: the override that did, else the profile file."""
        hit = next(
            (
                o
                for o in self.overrides
                if (k := o.split("=", 1)[0]) == name or name.startswith(k + ".") or k.startswith(name + ".")
            ),
            None,
        )
        return f"override '{hit}'" if hit else self.path

    def command(self, script: str, *args: str) -> str:
        """The command that runs a stage under this config, as typed (the venv's python,
        --config, overrides)."""
        words = [script, *args, "--config", self.path, *(shlex.quote(o) for o in self.overrides)]
        return f"{VENV_PYTHON} {' '.join(words)}"


CHOICES = {
    "precision": ("fp32", "bf16", "fp16"),
    "log_with": ("none", "tensorboard", "wandb"),
    "expert.method": EXPERT_TYPES,  # read as they are: a type or an embedding added later is a choice too
    "data.source": ("mini", "files"),
    "embed.embedding": EMBEDDINGS,
    "embed.estimator": ("per_sample", "batch"),
    "embed.normalize": ("mean", "none"),
    "embed.at": ("own", "pool-mean"),
    "embed.answers": ("truth", "model"),
    "interpolate.groups": ("global", "layer", "site", "tensor"),
    "interpolate.retrieval": ("fixed", "select"),
}


def _fill(cls, data: dict, where, prefix: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown fields and wrong types by name; where(field) names
    what set it (the profile file, or an override)."""
    if not isinstance(data, dict):
        name = prefix.rstrip(".") or "<root>"
        raise UserError(f"{where(name)}: field '{name}' must be a mapping; fix the YAML")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("path", "overrides")}
    kwargs = {}
    for key, value in data.items():
        name = prefix + key
        if key not in known:
            raise UserError(f"{where(name)}: unknown field '{name}' (known: {', '.join(sorted(known))})")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _fill(type(default), value or {}, where, name + ".")
            continue
        kwargs[key] = _check_type(value, default, name, where(name))
        if name in CHOICES and kwargs[key] not in CHOICES[name]:
            raise UserError(
                f"{where(name)}: field '{name}' is {value!r}; use one of {', '.join(CHOICES[name])}"
            )
        allowed = known[key].metadata.get("range")
        if allowed and kwargs[key] not in allowed:
            raise UserError(f"{where(name)}: field '{name}' is {value!r}; use a value {allowed}")
        if known[key].metadata.get("nonempty") and not kwargs[key]:
            raise UserError(f"{where(name)}: field '{name}' is empty; list at least one")
    return cls(**kwargs)


def _check_together(cfg: Config, where) -> None:
    """The checks that span fields (where(field): the file or override that set it)."""
    pool, b = cfg.tasks.pool, cfg.backbone
    odd = [t for t in pool if not isinstance(t, str) or not t]
    if odd:  # YAML reads a bare null, yes or 12 as None, True, 12
        raise UserError(
            f"{where('tasks.pool')}: field 'tasks.pool' holds {odd[0]!r}, not a task name; write task "
            f"names as strings (quoted where YAML would read them otherwise)"
        )
    if len(set(pool)) != len(pool):
        raise UserError(
            f"{where('tasks.pool')}: field 'tasks.pool' names a task twice ({pool}); list each once"
        )
    if NULL in pool:
        raise UserError(
            f"{where('tasks.pool')}: field 'tasks.pool' names a task '{NULL}', the name of the transfer "
            f"row's control (interpolate.py --variant pair-{NULL}); rename the task"
        )
    if not cfg.interpolate.experts and cfg.interpolate.top_k > len(pool) - 1:
        set_by = where("interpolate.top_k")  # or the override of the pool that left too few tasks
        set_by = where("tasks.pool") if where("tasks.pool").startswith("override") else set_by
        raise UserError(
            f"{set_by}: field 'interpolate.top_k' is {cfg.interpolate.top_k}, but "
            f"tasks.pool has {len(pool) - 1} tasks beside the target; use at most {len(pool) - 1} or add "
            f"tasks"
        )
    if b.d_model % b.heads:
        raise UserError(
            f"{where('backbone.heads')}: field 'backbone.heads' is {b.heads}, which does not divide "
            f"backbone.d_model {b.d_model}; pick a divisor"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise UserError(f"{where('device')}: field 'device' is {cfg.device!r}; use auto, cpu, cuda or cuda:N")
    for name, spec in cfg.tasks.define.items():  # each definition checked here; its files by common.checks
        define(str(name), spec, where(f"tasks.define.{name}"))
    for name, source in cfg.tasks.imported.items():
        if name == NULL:
            raise UserError(
                f"{where('tasks.imported')}: tasks.imported names '{NULL}', the transfer row's control; "
                f"rename it (in tasks.pool too)"
            )
        if not isinstance(name, str) or name not in pool:
            raise UserError(
                f"{where('tasks.imported')}: tasks.imported names {name!r}, which is not in tasks.pool "
                f"({', '.join(map(str, pool))}); add it to tasks.pool or drop it from tasks.imported"
            )
        if not isinstance(source, str) or not source:
            raise UserError(
                f"{where('tasks.imported')}: tasks.imported.{name} is {source!r}; give a peft adapter "
                f"directory or hub id: tasks.imported.{name}=DIR"
            )
    if cfg.tasks.imported and EXPERT_TYPES[cfg.expert.method].merge != "lowrank":
        raise UserError(
            f"{where('expert.method')}: field 'expert.method' is {cfg.expert.method}, but tasks.imported "
            f"names peft adapters, which join a pool of LoRA experts; set expert.method=lora or drop "
            f"tasks.imported"
        )
    unknown = [e for e in cfg.interpolate.select_from if e not in EMBEDDINGS]
    bad_k = [k for k in cfg.interpolate.select_k if not isinstance(k, int) or isinstance(k, bool) or k < 1]
    if unknown:
        raise UserError(
            f"{where('interpolate.select_from')}: field 'interpolate.select_from' names {unknown[0]!r}; "
            f"use embeddings of {', '.join(EMBEDDINGS)} ([] = all of them)"
        )
    if bad_k:
        raise UserError(
            f"{where('interpolate.select_k')}: field 'interpolate.select_k' holds {bad_k[0]!r}; use ks of "
            f"1 or more (k = 0, the target's expert alone, is always a candidate; a k beyond the pool takes "
            f"all of it)"
        )
    if len(b.vision_dims) != len(b.vision_heads):
        raise UserError(
            f"{where('backbone.vision_heads')}: field 'backbone.vision_heads' has {len(b.vision_heads)} "
            f"entries, vision_dims {len(b.vision_dims)}; give one head count per vision stage"
        )


def _check_type(value, default, name, path):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(
            f"{path}: field '{name}' is {value!r}; expected {type(default).__name__} like {default!r}"
        )
    return value


def _read_profile(p: Path, seen: tuple = ()) -> dict:
    """A profile's YAML; with `base: other.yaml` (beside it), that profile's fields under this one's."""
    if not p.is_file():
        what = f"the base of {seen[-1]}" if seen else "config file"
        raise UserError(f"{p}: {what} not found; pass --config configs/<profile>.yaml (see configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the file") from None
    if isinstance(data, dict) and OLD_SECTION in data:
        raise UserError(
            f"{p}: section '{OLD_SECTION}' is now 'embed' (the same fields: embedding, estimator, samples, "
            f"...); rename it to 'embed:'"
        )
    if not isinstance(data, dict) or "base" not in data:
        return data
    if p.resolve() in seen:
        raise UserError(f"{p}: field 'base' makes a loop ({' -> '.join(str(s) for s in seen)}); remove one")
    base = _read_profile(p.parent / str(data.pop("base")), seen + (p.resolve(),))

    def merged(under: dict, over: dict) -> dict:
        return {
            **under,
            **{
                k: merged(under[k], v) if isinstance(v, dict) and isinstance(under.get(k), dict) else v
                for k, v in over.items()
            },
        }

    return merged(base, data)


def split_overrides(words: list[str]) -> list[str]:
    """key=value overrides from command-line words: a value that the shell split at its spaces (make's
    OVERRIDES do: tasks.pool=[snli-ve, nli]) is joined again while its brackets are open."""
    out: list[str] = []
    for word in words:
        if out and out[-1].count("[") + out[-1].count("{") > out[-1].count("]") + out[-1].count("}"):
            out[-1] += " " + word
        else:
            out.append(word)
    return out


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Read a profile YAML and apply `section.key=value` overrides (values parsed as YAML). A bad value names
    what set it: the profile file, or the override."""
    data = _read_profile(Path(path))
    given = {}  # field -> the override that set it
    for item in split_overrides(list(overrides)):
        if "=" not in item:
            raise UserError(f"override '{item}': expected key=value, e.g. expert.steps=100")
        key, raw = item.split("=", 1)
        if key.split(".")[0] == OLD_SECTION:
            new_key = "embed" + key[len(OLD_SECTION) :]
            raise UserError(
                f"override '{item}': section '{OLD_SECTION}' is now 'embed'; write {new_key}={raw}"
            )
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UserError(
                f"override '{item}': the value is not valid YAML ({getattr(e, 'problem', e)}); write "
                f"a list as {key}=[a,b]"
            ) from None
        given[key] = item

    def where(name: str) -> str:
        hit = next(
            (
                item
                for key, item in given.items()
                if name == key or name.startswith(key + ".") or key.startswith(name + ".")
            ),
            None,
        )
        return f"override '{hit}'" if hit else str(path)

    cfg = _fill(Config, data, where)
    _check_together(cfg, where)
    cfg.path, cfg.overrides = str(path), tuple(given.values())
    return cfg
