"""Run configuration: one YAML per profile, `key=value` overrides, validated at the door."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.embeddings import EMBEDDINGS
from common.expert_types import EXPERT_TYPES

NULL = "null"  # the transfer row's control: an expert that adds nothing (interpolate.py --variant pair-null)


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2, no traceback."""


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
    source: str = "mini"  # mini: the embedded world | files: the paper's tasks (configs/paper_tasks.yaml) under root
    root: str = "data"  # OFA's *_data/ folders, CoOp folders, `hf download` copies of hub datasets
    download: bool = False  # fetch hub-hosted tasks (GLUE) into root when their files are missing
    # per task, split -> file under root instead of the catalogue's default, e.g.
    # {snli-ve: {train: snli_ve/snli_ve_train.jsonl}} (SNLI-VE's own annotations + root/flickr30k-images/)
    files: dict = field(default_factory=dict)
    # at most this many rows of a split, a seeded random sample of the file's (0 = all of them)
    train_size: int = ranged(0, 0)
    val_size: int = ranged(1000, 1)
    test_size: int = ranged(0, 0)
    # leave out of every task's training data the examples whose image is in a scored split (val or test) of any
    # task in the pool (by image id where the task names one, else by the image's bytes): data.without_scored
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
    lr: float = ranged(1e-3, 0, lo_open=True)  # measured on mini: 1,500 steps at 1e-3 see what 3,000 at 3e-4 did (README)
    grad_clip: float = ranged(1.0, 0)  # 0 = no clipping
    warmup: int = ranged(100, 0)
    grad_accum: int = ranged(1, 1)  # batches per optimizer step (the effective batch is batch_size x grad_accum)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, same result, slower
    checkpoint_every: int = ranged(0, 0)  # keep the loop's state every N steps, to resume after a crash (0 = never)


@dataclass
class TasksConfig:
    pool: list = nonempty(lambda: ["snli-ve", "nli"])
    target_shots: int = ranged(64, 0)  # the target's training data: a seeded k-shot sample (0 = its whole train split)
    shots_per_class: bool = False  # CoOp style: k examples of every answer class instead of k in all
    # tasks read from a researcher's own files, by name: {mine: {files: {train: .., test: ..}, prompt: ..,
    # answer: .., image: .., ...}} (common/tasks.py DEFINE_FIELDS); a defined task can be in pool or the target
    define: dict = field(default_factory=dict)


@dataclass
class ExpertConfig:
    method: str = "lora"  # one of common/expert_types.py: lora | dora | ia3 | prompt | prefix | adapter
    r: int = ranged(8, 1)  # lora rank
    alpha: float = ranged(16.0, 0, lo_open=True)  # lora scale alpha/r
    dropout: float = ranged(0.0, 0, 1, hi_open=True)  # lora / adapter dropout
    target_modules: str = ""  # full-name regex of the modules to adapt; "" = the method's default (experts.py)
    virtual_tokens: int = ranged(16, 1)  # prompt / prefix length
    adapter_dim: int = ranged(128, 1)  # bottleneck width of the Houlsby adapters
    steps: int = ranged(300, 1)
    batch_size: int = ranged(32, 1)
    lr: float = ranged(0.0, 0)  # 0 = the type's own (expert_types.py: 1e-3 lora/dora/adapter, 1e-2 ia3/prefix, 3e-2 prompt)
    grad_clip: float = ranged(1.0, 0)  # 0 = no clipping
    eval_size: int = ranged(200, 1)  # validation examples scored after training
    grad_accum: int = ranged(1, 1)  # batches per optimizer step (the effective batch is batch_size x grad_accum)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, same result, slower
    checkpoint_every: int = ranged(0, 0)  # keep the loop's state every N steps, to resume after a crash (0 = never)
    full_ft_lr: float = ranged(1e-4, 0, lo_open=True)  # the full fine-tuning baseline (train_expert.py --variant full-ft)


@dataclass
class FisherConfig:
    # common/embeddings.py: fisher (π-Tuning's: the diagonal Fisher of each expert) | weights (the cosine of
    # what each expert changed, SPoT-style, no backbone pass); the mini profile ships weights (README: retrieval)
    embedding: str = "fisher"
    estimator: str = "per_sample"  # per_sample | batch (the original code's squared batch gradient)
    samples: int = ranged(256, 1)
    batch_size: int = ranged(16, 1)
    normalize: str = "mean"  # mean: each tensor scaled to mean 1 before comparing | none
    passes: int = ranged(1, 1)  # > 1: up to this many passes over an expert's examples, dropout on, until `samples` gradients
    at: str = "own"  # own: each expert's Fisher at its own weights | pool-mean: every task's at the mean pool expert
    answers: str = "truth"  # truth: the examples' answers (empirical Fisher) | model: drawn from the model's own distribution


@dataclass
class InterpolateConfig:
    top_k: int = ranged(2, 1)
    experts: list = field(default_factory=list)  # pick the pool experts by hand (as the original did); [] = top-k
    groups: str = "site"  # global | layer | site | tensor
    train_experts: bool = True
    # short and gentle (the paper's 1e-4): at 150 steps and 1e-3 the mix drifted back to the target's own
    # expert (README)
    steps: int = ranged(60, 1)
    batch_size: int = ranged(16, 1)
    lr: float = ranged(1e-4, 0, lo_open=True)  # experts
    logits_lr: float = ranged(5e-2, 0, lo_open=True)  # interpolation logits
    grad_clip: float = ranged(1.0, 0)  # 0 = no clipping
    grad_accum: int = ranged(1, 1)  # batches per optimizer step (the effective batch is batch_size x grad_accum)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, same result, slower
    checkpoint_every: int = ranged(0, 0)  # keep the loop's state every N steps, to resume after a crash (0 = never)
    # stacking: the fraction of the target's training examples held out of the expert the mix is learned with.
    # The mix learns on them (the experts frozen) with the target's expert refitted on the rest (experts/<run>.fold,
    # train_expert.py --variant fold); its weights then apply to the expert fitted on all of them, and with
    # train_experts the experts train on all of them under those weights. 0 = the paper's: the mix learns on the
    # very examples the target's expert fitted, and in the few-shot runs settles near 0.8 on it whatever the
    # other experts are (README "The mini world")
    holdout: float = ranged(0.0, 0, 1, hi_open=True)


@dataclass
class EvaluateConfig:
    batch_size: int = ranged(64, 1)


@dataclass
class DebugConfig:
    kill_at_step: int = ranged(0, 0)  # end a training stage with SIGKILL after this step (tests of resume; 0 = off)
    fail_rank: int = ranged(-1, -1)  # under torchrun: this rank raises after a training stage's last step (-1 = off)


@dataclass
class Config:
    profile: str = "mini"
    runs_dir: str = "runs"
    seed: int = ranged(0, 0)
    threads: int = ranged(0, 0)  # 0 = torch default
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only): autocast through accelerate; weights stay fp32
    log_every: float = ranged(30.0, 0)  # seconds between progress lines without a terminal (0 = every step)
    log_with: str = "none"  # none | tensorboard | wandb: loss, lr, examples/s of every step to accelerate's tracker
    # what the frozen backbone would compute again and again, memoised, each up to this much (0 = off): Florence-2's
    # vision tower per image, and evaluate.py's encoded inputs per batch (every method scores the same batches)
    feature_cache_mb: int = ranged(1024, 0)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    interpolate: InterpolateConfig = field(default_factory=InterpolateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    # where this config was read from, for error messages (not part of the run's identity)
    path: str = field(default="<defaults>", compare=False)

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
        d.pop("path")
        return d


CHOICES = {
    "precision": ("fp32", "bf16", "fp16"),
    "log_with": ("none", "tensorboard", "wandb"),
    "expert.method": EXPERT_TYPES,  # read as they are: a type or an embedding added later is a choice too
    "data.source": ("mini", "files"),
    "fisher.embedding": EMBEDDINGS,
    "fisher.estimator": ("per_sample", "batch"),
    "fisher.normalize": ("mean", "none"),
    "fisher.at": ("own", "pool-mean"),
    "fisher.answers": ("truth", "model"),
    "interpolate.groups": ("global", "layer", "site", "tensor"),
}


def _fill(cls, data: dict, path: str, prefix: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown fields and wrong types by name."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: field '{prefix.rstrip('.') or '<root>'}' must be a mapping; fix the YAML")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    kwargs = {}
    for key, value in data.items():
        name = prefix + key
        if key not in known:
            raise UserError(f"{path}: unknown field '{name}' (known: {', '.join(sorted(known))})")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _fill(type(default), value or {}, path, name + ".")
            continue
        kwargs[key] = _check_type(value, default, name, path)
        if name in CHOICES and kwargs[key] not in CHOICES[name]:
            raise UserError(f"{path}: field '{name}' is {value!r}; use one of {', '.join(CHOICES[name])}")
        allowed = known[key].metadata.get("range")
        if allowed and kwargs[key] not in allowed:
            raise UserError(f"{path}: field '{name}' is {value!r}; use a value {allowed}")
        if known[key].metadata.get("nonempty") and not kwargs[key]:
            raise UserError(f"{path}: field '{name}' is empty; list at least one")
    return cls(**kwargs)


def _check_together(cfg: Config, path: str) -> None:
    """The checks that span fields."""
    pool, b = cfg.tasks.pool, cfg.backbone
    odd = [t for t in pool if not isinstance(t, str) or not t]
    if odd:  # YAML reads a bare null, yes or 12 as None, True, 12
        raise UserError(f"{path}: field 'tasks.pool' holds {odd[0]!r}, not a task name; write task names as strings "
                        f"(quoted where YAML would read them otherwise)")
    if len(set(pool)) != len(pool):
        raise UserError(f"{path}: field 'tasks.pool' names a task twice ({pool}); list each once")
    if NULL in pool:
        raise UserError(f"{path}: field 'tasks.pool' names a task '{NULL}', the name of the transfer row's control "
                        f"(interpolate.py --variant pair-{NULL}); rename the task")
    if not cfg.interpolate.experts and cfg.interpolate.top_k > len(pool) - 1:
        raise UserError(f"{path}: field 'interpolate.top_k' is {cfg.interpolate.top_k}, but tasks.pool has "
                        f"{len(pool) - 1} tasks beside the target; use at most {len(pool) - 1} or add tasks")
    if b.d_model % b.heads:
        raise UserError(f"{path}: field 'backbone.heads' is {b.heads}, which does not divide backbone.d_model "
                        f"{b.d_model}; pick a divisor")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise UserError(f"{path}: field 'device' is {cfg.device!r}; use auto, cpu, cuda or cuda:N")
    from common.tasks import define

    for name, spec in cfg.tasks.define.items():  # each definition checked here; its files when read
        define(str(name), spec, path)
    if len(b.vision_dims) != len(b.vision_heads):
        raise UserError(f"{path}: field 'backbone.vision_heads' has {len(b.vision_heads)} entries, vision_dims "
                        f"{len(b.vision_dims)}; give one head count per vision stage")


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
        raise UserError(f"{path}: field '{name}' is {value!r}; expected {type(default).__name__} like {default!r}")
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
        raise UserError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the file")
    if not isinstance(data, dict) or "base" not in data:
        return data
    if p.resolve() in seen:
        raise UserError(f"{p}: field 'base' makes a loop ({' -> '.join(str(s) for s in seen)}); remove one")
    base = _read_profile(p.parent / str(data.pop("base")), seen + (p.resolve(),))

    def merged(under: dict, over: dict) -> dict:
        return {**under, **{k: merged(under[k], v) if isinstance(v, dict) and isinstance(under.get(k), dict)
                            else v for k, v in over.items()}}
    return merged(base, data)


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Read a profile YAML and apply `section.key=value` overrides (values parsed as YAML)."""
    data = _read_profile(Path(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}': expected key=value, e.g. expert.steps=100")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    cfg = _fill(Config, data, path)
    _check_together(cfg, path)
    cfg.path = str(path)
    return cfg


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The command line every stage shares: --config, key=value overrides."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default="configs/mini.yaml", help="profile YAML (default: configs/mini.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. expert.steps=100")
    return ap


def parse_stage(ap: argparse.ArgumentParser):
    """Parse a stage's command line (overrides may sit anywhere) and load its config."""
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if not gc.isenabled():
        # the stage's own process (run_stage): the libraries every stage loads next, with the collector off;
        # then it runs on everything made after them
        import accelerate  # noqa: F401
        import peft  # noqa: F401
        import transformers.modeling_utils  # noqa: F401

        gc.freeze()
        gc.enable()
    return args, cfg


def run_stage(main) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit code 2. Under torchrun only rank 0
    prints (every rank runs the same code on the same inputs, so a UserError is everyone's); each exits alike."""
    import contextlib
    import os

    from common import dist

    # A stage script run as a process turns the cyclic garbage collector off before its imports (torch,
    # transformers, peft, accelerate: about a million objects that live as long as the process); collections
    # that scan them cost seconds of each stage's start and of its exit (bench/startup_bench.py). parse_stage
    # loads the libraries, freezes their objects out of the collector and turns it on for everything made
    # after; at exit everything is frozen again, so the exit collects nothing.
    own_process = not gc.isenabled()
    main_rank = dist.is_main()  # before the process group: the launcher's RANK
    try:
        with contextlib.nullcontext() if main_rank else contextlib.redirect_stdout(open(os.devnull, "w")):
            main()
    except UserError as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if own_process:
            gc.freeze()


# What each kind of artifact is made from, beyond what its name says (task, shots, seed): config sections
# or single fields. An artifact whose recorded config differs in one of them is stale: make rebuilds it
# (each entry is a stamp file), a stage refuses it, evaluate and the report leave it out.
MADE_FROM = {"backbone": ("world", "backbone", "pretrain", "precision")}
MADE_FROM["expert"] = MADE_FROM["backbone"] + ("data", "tasks.define", "expert")
MADE_FROM["target"] = MADE_FROM["expert"] + ("tasks.shots_per_class",)
MADE_FROM["similarity"] = MADE_FROM["target"] + ("tasks.pool", "fisher")
MADE_FROM["fold"] = MADE_FROM["target"] + ("interpolate.holdout",)  # the target's expert refitted without them
MADE_FROM["interpolated"] = MADE_FROM["similarity"] + ("interpolate",)
# a pair run (one pool expert with the target's: a cell of the transfer row) is made from those two experts,
# not from the pool or the retrieval: a pool that grows adds pair runs and keeps the others
MADE_FROM["pair"] = MADE_FROM["target"] + ("interpolate",)


def interpolated_kind(variant: str) -> str:
    """The MADE_FROM entry of an interpolate.py run of this --variant ('' = π-Tuning): a pair run's or the others'."""
    return "pair" if variant.startswith("pair-") else "interpolated"
# the sizes of the splits that scoring reads: a result is made from them; the backbone, the experts and the
# Fishers are not (they train on train; an expert's and the backbone's validation figures in their meta.json
# read at most expert.eval_size and 200 examples), so a larger test split rebuilds none of them
SCORED_SIZES = ("world.val_size", "world.test_size", "data.val_size", "data.test_size")
MADE_FROM["result"] = MADE_FROM["interpolated"] + ("evaluate",) + SCORED_SIZES
# fields that change how an artifact is made, not what it is: never stale, never stamped
HOW_NOT_WHAT = tuple(f"{section}.{name}" for section in ("pretrain", "expert", "interpolate")
                     for name in ("gradient_checkpointing", "checkpoint_every")) + ("data.num_workers",)


_MISSING = object()


def _at(tree, key: str, missing=None):
    for part in key.split("."):
        tree = tree.get(part, _MISSING) if isinstance(tree, dict) else _MISSING
        if tree is _MISSING:
            return missing
    return tree


def _leaves(tree, prefix: str, key: str = "") -> dict:
    """{field: value} of the MADE_FROM entry `key` (a section or a field) at `prefix`; a section leaves out the
    scored sizes, which are their own entries (SCORED_SIZES)."""
    if tree is _MISSING:
        return {}
    if not isinstance(tree, dict):
        return {} if prefix in HOW_NOT_WHAT or (prefix in SCORED_SIZES and prefix != (key or prefix)) \
            else {prefix: tree}
    return {k: v for name, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{name}", key or prefix).items()}


def changed_fields(recorded: dict | None, cfg: Config, kind: str) -> list[str]:
    """The fields of MADE_FROM[kind] in which an artifact's recorded config differs from cfg ([] = current),
    as 'field: recorded -> config'. A field the recorded config lacks is newer than the artifact: it had its
    default then. No recorded config at all: every field differs."""
    now, defaults, out = cfg.to_dict(), Config().to_dict() if recorded else {}, []
    for key in MADE_FROM[kind]:
        old = _leaves(_at(recorded or {}, key, _MISSING), key)
        for k, v in _leaves(_at(defaults, key, _MISSING), key).items():
            if _at(recorded, k, _MISSING) is _MISSING:
                old[k] = v
        new = _leaves(_at(now, key), key)
        out += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return out


def require_current(recorded: dict | None, cfg: Config, kind: str, where, fix: str, made: str = "made") -> None:
    """A UserError naming `where`, the first field that differs and `fix`, unless the artifact is current."""
    changed = changed_fields(recorded, cfg, kind)
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise UserError(f"{where}: {made} under another config ({changed[0]}{more}); {fix}")


def _stamped(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def write_stamps(cfg: Config) -> None:
    """runs/<profile>/.config/<section or field>.json, one per entry of MADE_FROM, rewritten only when its
    values change: make's view of the config. A stamp holds every value; one that lacks a field (a field
    added to the code since, or a stamp written before they held every value) reads it at its default, so
    neither a new field nor a default changed under a value the profile sets makes anything stale."""
    from common.artifacts import write_text  # atomic: two makes of one study read the stamps at once

    d = cfg.run_dir / ".config"
    d.mkdir(parents=True, exist_ok=True)
    now, defaults = cfg.to_dict(), Config().to_dict()
    for key in sorted({k for keys in MADE_FROM.values() for k in keys}):
        values = _leaves(_at(now, key), key)
        text = json.dumps(values, indent=1, sort_keys=True) + "\n"
        path = d / f"{key}.json"
        if not path.is_file():
            write_text(path, text)
            # first sight is not a change: artifacts made before stamps stay valid; nor is a field that moved
            # out of its section's stamp (SCORED_SIZES) unless its value differs from what that stamp held
            section = d / f"{key.rsplit('.', 1)[0]}.json"
            held = _stamped(section) if "." in key and section.is_file() else {}
            if all(held.get(k, v) == v for k, v in values.items()):
                os.utime(path, (0, 0))
            continue
        stamped = _stamped(path)
        # a field the entry no longer holds (moved to an entry of its own, removed from the code) changes nothing
        old = {**_leaves(_at(defaults, key), key), **stamped} if isinstance(stamped, dict) else {}
        if any(old.get(k, _MISSING) != v for k, v in values.items()):
            write_text(path, text)


if __name__ == "__main__":  # python -m common.config CONFIG [key=value ...] [--stamp] --get a.b c.d  (for the Makefile)
    def _get(cfg, key):
        for part in key.split("."):
            cfg = getattr(cfg, part)
        return " ".join(map(str, cfg)) if isinstance(cfg, list) else cfg

    argv = sys.argv[1:]
    keys = argv[argv.index("--get") + 1:] if "--get" in argv else []
    argv = argv[:argv.index("--get")] if "--get" in argv else argv
    stamp = "--stamp" in argv
    argv = [a for a in argv if a != "--stamp"]
    try:
        c = load_config(argv[0], argv[1:])
        if stamp:
            write_stamps(c)
        print(" ".join(str(_get(c, k)) for k in keys))
    except (UserError, AttributeError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
