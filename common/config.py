"""Run configuration: one YAML per profile, `key=value` overrides, validated at the door."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2, no traceback."""


@dataclass
class WorldConfig:
    seed: int = 1234
    image_size: int = 64
    train_size: int = 1500
    val_size: int = 200
    test_size: int = 400


@dataclass
class DataConfig:
    source: str = "mini"  # mini: the embedded world | files: the real tasks of common/readers.py under root
    root: str = "data"  # OFA's *_data/ folders, CoOp folders, `hf download` copies of hub datasets
    download: bool = False  # fetch hub-hosted tasks (GLUE) into root when their files are missing
    # per task, split -> file under root instead of the catalogue's default, e.g.
    # {snli-ve: {train: snli_ve/snli_ve_train.jsonl}} (SNLI-VE's own annotations + root/flickr30k-images/)
    files: dict = field(default_factory=dict)
    train_size: int = 0  # read at most this many training rows per task (0 = all)
    val_size: int = 1000
    test_size: int = 0  # 0 = the whole test split


@dataclass
class BackboneConfig:
    source: str = "embedded"  # "embedded" = built and pre-trained here; else a hub id or local dir
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    ffn_dim: int = 256
    vision_dims: list = field(default_factory=lambda: [32, 64, 96])
    vision_heads: list = field(default_factory=lambda: [2, 4, 4])
    dropout: float = 0.1


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    grad_clip: float = 1.0
    warmup: int = 100


@dataclass
class TasksConfig:
    pool: list = field(default_factory=lambda: ["snli-ve", "nli"])
    target_shots: int = 64  # the target's training data: a seeded k-shot sample (0 = its whole train split)
    shots_per_class: bool = False  # CoOp style: k examples of every answer class instead of k in all


@dataclass
class ExpertConfig:
    method: str = "lora"  # lora | ia3 | prompt | prefix | adapter
    r: int = 8  # lora rank
    alpha: float = 16.0  # lora scale alpha/r
    dropout: float = 0.0  # lora / adapter dropout
    target_modules: str = ""  # full-name regex of the modules to adapt; "" = the method's default (experts.py)
    virtual_tokens: int = 16  # prompt / prefix length
    adapter_dim: int = 128  # bottleneck width of the Houlsby adapters
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.0  # 0 = the method's default (experts.py DEFAULT_LR: 1e-3 lora/adapter, 1e-2 ia3/prefix, 3e-2 prompt)
    grad_clip: float = 1.0
    eval_size: int = 200  # validation examples scored after training
    full_ft_lr: float = 1e-4  # the full fine-tuning baseline (train_expert.py --variant full-ft)


@dataclass
class FisherConfig:
    # fisher: π-Tuning's task embedding (the diagonal Fisher of each expert) | weights: the cosine of what
    # each expert changed (SPoT-style, no backbone pass); the mini profile ships weights (README: retrieval)
    embedding: str = "fisher"
    estimator: str = "per_sample"  # per_sample | batch (the original code's squared batch gradient)
    samples: int = 256
    batch_size: int = 16
    normalize: str = "mean"  # mean: each tensor scaled to mean 1 before comparing | none
    passes: int = 1  # > 1: up to this many passes over an expert's examples, dropout on, until `samples` gradients


@dataclass
class InterpolateConfig:
    top_k: int = 2
    experts: list = field(default_factory=list)  # pick the pool experts by hand (as the original did); [] = top-k
    groups: str = "site"  # global | layer | site | tensor
    train_experts: bool = True
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3  # experts
    logits_lr: float = 5e-2  # interpolation logits
    grad_clip: float = 1.0


@dataclass
class EvaluateConfig:
    batch_size: int = 64


@dataclass
class Config:
    profile: str = "mini"
    runs_dir: str = "runs"
    seed: int = 0
    threads: int = 0  # 0 = torch default
    feature_cache_mb: int = 1024  # Florence-2's frozen vision tower memoised per image, up to this much (0 = off)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    interpolate: InterpolateConfig = field(default_factory=InterpolateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    # where this config was read from, for error messages (not part of the run's identity)
    path: str = field(default="<defaults>", compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.profile

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


CHOICES = {
    "expert.method": ("lora", "ia3", "prompt", "prefix", "adapter"),
    "data.source": ("mini", "files"),
    "fisher.embedding": ("fisher", "weights"),
    "fisher.estimator": ("per_sample", "batch"),
    "fisher.normalize": ("mean", "none"),
    "interpolate.groups": ("global", "layer", "site", "tensor"),
}
MINIMUM = {"fisher.passes": 1}


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
        if name in MINIMUM and kwargs[key] < MINIMUM[name]:
            raise UserError(f"{path}: field '{name}' is {value!r}; use {MINIMUM[name]} or more")
    return cls(**kwargs)


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


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Read a profile YAML and apply `section.key=value` overrides (values parsed as YAML)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found; pass --config configs/<profile>.yaml (see configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the file")
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
    return args, cfg


def run_stage(main) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


STAMPED_SECTIONS = ("world", "data", "backbone", "pretrain", "expert", "fisher", "interpolate", "evaluate")


def write_stamps(cfg: Config) -> None:
    """runs/<profile>/.config/<section>.json, rewritten only when that section changes: make's view of the config."""
    d = cfg.run_dir / ".config"
    d.mkdir(parents=True, exist_ok=True)
    for section in STAMPED_SECTIONS:
        text = json.dumps(dataclasses.asdict(getattr(cfg, section)), indent=1, sort_keys=True) + "\n"
        path = d / f"{section}.json"
        if not path.is_file():
            path.write_text(text)
            os.utime(path, (0, 0))  # first sight is not a change: artifacts made before stamps stay valid
        elif path.read_text() != text:
            path.write_text(text)


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
