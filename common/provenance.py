"""Provenance: what each artifact is made from, and where it lives.

An artifact's path carries a digest of what it is made from: runs/<profile>/experts/nli@1f3a9c0e/. The digest
hashes the artifact's own config fields (those whose value differs from the code's default, so a field added
to the code later changes no digest) and the digests of the artifacts it is made from. So a config change
makes new paths and keeps the old artifacts; switching back finds them; a stage run by hand writes exactly the
path make asks for; and make needs nothing but files (no stamps: `make -n` writes nothing). Beside each
artifact, a readable name (experts/nli) links to the one made last (`link`).

    python -m common.provenance CONFIG [key=value ...] --get run_dir tasks.pool  # values, for the Makefile
    python -m common.provenance CONFIG [key=value ...] --rules TARGET SEED [--study report|loto]
                                                                                 # pipeline.mk's
    python -m common.provenance CONFIG [key=value ...] --prune                   # drop what it would not make

The graph (each kind's own fields, and what it is made from):
    backbone      world (but the scored sizes), backbone, pretrain, precision
    expert <t>    backbone; data (but the scored sizes and other tasks' files), the task's own definition,
                  expert; where the overlap guard reads them, the definitions of the pool's image tasks
                  (imported, tasks.imported: backbone; the hash of its files, the task's definition)
    target <run>  the task's expert fields; tasks.shots_per_class      (fold: + interpolate.holdout)
    similarity    the target's expert, the pool's experts; tasks.pool, embed (as the embedding sets it)
    interpolated  the similarity (fold); interpolate          (pair-<t>: the target's and t's experts instead)
    result        the interpolation, the target's expert; evaluate and the scored splits' sizes
    transfer      the target's expert and its pair runs; evaluate, the scored sizes
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import yaml

from common import dist
from common.config import OLD_SECTION, Config, load_config, split_overrides
from common.embeddings import ASKED_FOR, variants
from common.errors import UserError, cli
from common.imported import adapter_dir, files_hash
from common.methods import NULL, PAIR_PREFIX, by_variant, inputs_of, interpolations, studied

# fields that change how an artifact is made, not what it is: in no digest
HOW_NOT_WHAT = tuple(
    f"{section}.{name}"
    for section in ("pretrain", "expert", "interpolate")
    for name in ("gradient_checkpointing", "checkpoint_every")
) + ("data.num_workers",)
# the sizes of the splits that scoring reads: a result is made from them; the backbone, the experts and the
# Fishers are not (they train on train), so a larger test split rebuilds none of them
SCORED_SIZES = ("world.val_size", "world.test_size", "data.val_size", "data.test_size")
# fields no artifact is made from: where and how a run happens
RUNTIME = (
    "profile",
    "runs_dir",
    "seed",
    "threads",
    "device",
    "log_every",
    "log_with",
    "feature_cache_mb",
    "debug",
    "tasks.target_shots",
)
DIGEST = 8  # hex characters of an artifact's digest
HEX_DIGEST = f"[0-9a-f]{{{DIGEST}}}"  # its pattern
TARGET_RUN = re.compile(
    r"^(?P<task>.+)-(?:(?P<shots>\d+)shot|full)-s(?P<seed>\d+)(?:\.(?P<variant>[^.@]+))?$"
)
CATALOGUE = Path(__file__).resolve().parent.parent / "configs" / "paper_tasks.yaml"


def _flat(tree, prefix: str = "") -> dict:
    """{dotted field: value} of a config subtree."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {
        k: v
        for name, sub in tree.items()
        for k, v in _flat(sub, f"{prefix}.{name}" if prefix else name).items()
    }


def _under(field: str, keys) -> bool:
    return any(field == k or field.startswith(k + ".") for k in keys)


@functools.cache
def _defaults() -> dict:
    return _flat(Config().to_dict())


def _values(cfg, keys: tuple, drop: tuple = ()) -> dict:
    """The fields under `keys` (sections or fields) whose value differs from the code's default, but those in
    HOW_NOT_WHAT and under `drop`."""
    missing = object()
    return {
        k: v
        for k, v in _flat(cfg.to_dict()).items()
        if _under(k, keys) and not _under(k, HOW_NOT_WHAT + drop) and _defaults().get(k, missing) != v
    }


@functools.cache
def _catalogue() -> dict:
    return yaml.safe_load(CATALOGUE.read_text())


def definition(cfg, task: str) -> dict | None:
    """A task's definition as written (tasks.define's, or the paper catalogue's under data.source files), with
    its data.files; None for the mini world's (its tasks are code)."""
    if task in cfg.tasks.define:
        spec = cfg.tasks.define[task]
    elif cfg.data.source == "files":
        spec = _catalogue().get(task)
    else:
        return None
    return {"definition": spec, "files": cfg.data.files.get(task, {})}


def _guarded_by(cfg, task: str) -> list:
    """What the overlap guard reads for a task's training data (data.exclude_scored_images): the definitions
    of the pool's image tasks read from files, where the task is one of them
    (the mini world's images all differ)."""
    mine = definition(cfg, task)
    if not cfg.data.exclude_scored_images or not mine or not (mine["definition"] or {}).get("image"):
        return []
    return [
        (t, d)
        for t in sorted(cfg.tasks.pool)
        if (d := definition(cfg, t)) and (d["definition"] or {}).get("image")
    ]


def expert_name(task: str, shots: int | None = None, seed: int = 0) -> str:
    """Pool experts are named by task; a target's expert by its shots (0 = its whole train split) and seed."""
    if shots is None:
        return task
    return f"{task}-{shots}shot-s{seed}" if shots else f"{task}-full-s{seed}"


def parse_run(name: str) -> dict | None:
    """A target run's parts (task, shots, seed, variant) from its name, or None for a pool expert's name."""
    m = TARGET_RUN.match(name)
    return m.groupdict() if m else None


def _node(cfg, kind: str, name: str = "", variant: str = "") -> tuple[dict, list]:
    """(own fields, the nodes it is made from) of an artifact."""
    if kind == "backbone":
        return _values(cfg, ("world", "backbone", "pretrain", "precision"), SCORED_SIZES), []
    if kind == "expert" and name in cfg.tasks.imported:  # made elsewhere: its files, checked on this backbone
        return {"imported": files_hash(cfg, name), "task": definition(cfg, name)}, [("backbone",)]
    if kind == "expert":
        run = parse_run(name)
        task = run["task"] if run else name
        own = _values(cfg, ("data", "expert"), SCORED_SIZES + ("data.files",))
        own["task"] = definition(cfg, task)
        if guard := _guarded_by(cfg, task):
            own["scored_by"] = guard
        if run:  # a target's k-shot expert (shots and seed are in its name), or a baseline or fold of it
            own |= _values(cfg, ("tasks.shots_per_class",))
            if run["variant"] == "fold":
                own |= _values(cfg, ("interpolate.holdout",)) | {"holdout": cfg.interpolate.holdout}
        return own, [("backbone",)]
    run = parse_run(name) or {}
    target = ("expert", name.split(".")[0])
    if kind == "similarity":  # a target run's row, or "pool": the pool's whole matrix
        embed = dataclasses.replace(cfg.embed, **variants()[variant]) if variant else cfg.embed
        as_set = dataclasses.replace(cfg, embed=embed)
        pool = [("expert", t) for t in sorted(cfg.tasks.pool) if t != run.get("task")]
        return _values(as_set, ("tasks.pool", "embed")), [target, *pool] if run else pool
    fold = [("expert", f"{name}.fold")] if cfg.interpolate.holdout else []
    if kind == "interpolated":
        own = _values(cfg, ("interpolate",)) | {"variant": variant}
        method = by_variant(variant)
        if method.chosen(cfg):  # chosen on validation: made from the scored splits' sizes too
            own |= _values(cfg, SCORED_SIZES)
        return own, inputs_of(method, cfg, name, variant, fold)
    scored = _values(cfg, ("evaluate",) + SCORED_SIZES)
    if kind == "result":
        return scored, [("interpolated", name), target]
    if kind == "transfer":
        others = [t for t in sorted(cfg.tasks.pool) if t != run.get("task")]
        return scored, [target, *(("interpolated", name, f"{PAIR_PREFIX}{t}") for t in others)]
    raise ValueError(f"no artifact kind {kind!r}")


def _hashed(values: dict) -> dict:
    """Fields as digests hash them: the embed section's under its former name, fisher (until 2026-12), so that
    what was made before the rename stays current."""
    return {(f"{OLD_SECTION}.{k[6:]}" if k.startswith("embed.") else k): v for k, v in values.items()}


def digest(cfg, kind: str, name: str = "", variant: str = "") -> str:
    """The artifact's digest: its own fields and its inputs' digests, hashed."""
    own, inputs = _node(cfg, kind, name, variant)
    made_from = [_hashed(own), [digest(cfg, *node) for node in inputs]]
    return hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()[:DIGEST]


def made_from(cfg, kind: str, name: str = "", variant: str = "") -> dict:
    """What an artifact is made from, readably (written beside it as made_from.json): its own fields and its
    inputs' names and digests."""
    own, inputs = _node(cfg, kind, name, variant)
    return {
        "kind": kind,
        "name": name,
        "variant": variant,
        "digest": digest(cfg, kind, name, variant),
        "fields": own,
        "inputs": [
            {
                "kind": n[0],
                "name": n[1] if len(n) > 1 else "",
                "variant": n[2] if len(n) > 2 else "",
                "digest": digest(cfg, *n),
            }
            for n in inputs
        ],
    }


def artifact(cfg, kind: str, name: str = "", variant: str = "") -> Path:
    """Where an artifact of this config lives: a folder (backbone, experts, interpolated) or a .json file."""
    d, rd = digest(cfg, kind, name, variant), cfg.run_dir
    if kind == "backbone":
        return rd / f"backbone@{d}"
    if kind == "expert":
        return rd / "experts" / f"{name}@{d}"
    if kind == "similarity":
        return rd / "similarity" / f"{name}{'.' + variant if variant else ''}@{d}.json"
    if kind == "interpolated":
        return rd / "interpolated" / f"{name}{'.' + variant if variant else ''}@{d}"
    return rd / "results" / f"{name}{'.transfer' if kind == 'transfer' else ''}@{d}.json"


def readable(path: Path) -> Path:
    """The readable name beside an artifact: experts/nli@1f3a9c0e -> experts/nli."""
    return path.with_name(re.sub(f"@{HEX_DIGEST}", "", path.name))


def link(path: Path) -> None:
    """Point the readable name at this artifact (the one made last), atomically; a file or folder already
    there under that name (a run folder from before digests) is left as it is."""
    name = readable(Path(path))
    if not dist.is_main() or (name.exists() and not name.is_symlink()):
        return
    tmp = name.with_name(f".{name.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(Path(path).name, tmp)
    os.replace(tmp, name)


def config_id(cfg) -> str:
    """The digest of everything a result depends on but its seed and shots: results of one config_id form one
    table (evaluate.py, the report)."""
    keys = tuple(f.name for f in dataclasses.fields(Config) if f.name != "path")
    values = _values(cfg, keys, RUNTIME + ("tasks.define",))
    values["tasks.define"] = {t: cfg.tasks.define[t] for t in sorted(cfg.tasks.define) if t in cfg.tasks.pool}
    return hashlib.sha256(json.dumps(_hashed(values), sort_keys=True, default=str).encode()).hexdigest()[
        :DIGEST
    ]


def differs(config: dict, profile: str) -> list[str]:
    """The fields of a recorded config that differ from the profile file's own, as 'field=value': the
    overrides that make this config from the profile (what names a config beside another)."""
    try:
        base = _flat(load_config(profile).to_dict())
    except UserError:
        base = {}
    missing = object()
    config = {
        ("embed" if k == OLD_SECTION else k): v for k, v in config.items()
    }  # recorded before the rename
    return [
        f"{k}={v if isinstance(v, str) else json.dumps(v)}"
        for k, v in sorted(_flat(config).items())
        if base.get(k, missing) != v and not _under(k, RUNTIME + HOW_NOT_WHAT)
    ]


# ---- what make asks for ----


def _pipeline(cfg, target: str, seed: int, study: str, transfer_row: bool, embed_as: list[str]):
    """pipeline.mk's rules for one target / shots / seed, one per line: 'targets: inputs ; recipe' (the recipe
    with $(STAGE_CMD) and $(ARGS) for make to expand), and the phony targets' files. study: "" (make all),
    "report" (make report's baselines; the transfer row with transfer_row) or "loto" (make loto's: π-Tuning as
    configured, random-k, the paper's Fisher retrieval, the retrieval chosen on validation)."""
    cfg = dataclasses.replace(cfg, seed=seed)
    ic, shots, run = (
        cfg.interpolate,
        cfg.tasks.target_shots,
        expert_name(target, cfg.tasks.target_shots, seed),
    )
    meta = lambda p: f"{p}/meta.json"  # noqa: E731
    j = " ".join
    backbone = meta(artifact(cfg, "backbone"))
    others = [t for t in cfg.tasks.pool if t != target]
    pool = {t: meta(artifact(cfg, "expert", t)) for t in cfg.tasks.pool}
    tgt = meta(artifact(cfg, "expert", run))
    fold = [meta(artifact(cfg, "expert", f"{run}.fold"))] if ic.holdout else []
    sim = str(artifact(cfg, "similarity", run))
    interp = {v: meta(artifact(cfg, "interpolated", run, v)) for v in interpolations()}
    result, row = str(artifact(cfg, "result", run)), str(artifact(cfg, "transfer", run))
    control = [NULL] if cfg.control != "-" else []
    pairs = [meta(artifact(cfg, "interpolated", run, f"{PAIR_PREFIX}{t}")) for t in others + control]
    # the interpolations the study makes: π-Tuning as configured and its methods (none that is π-Tuning itself
    # under this config); a run picked from the transfer row after the row
    made = ["", *(m.variant for m in studied(cfg, study) if m.variant)]
    after_row = [v for v in made if ("transfer", run) in inputs_of(by_variant(v), cfg, run, v, [])]
    made = [v for v in made if v not in after_row]
    after_row = after_row if transfer_row else []

    def similarities(variants: list[str]) -> list[tuple]:  # the similarity files those runs are made from
        return [
            k for v in variants for k in inputs_of(by_variant(v), cfg, run, v, []) if k[0] == "similarity"
        ]

    def made_of(variants: list[str]) -> str:
        return j(dict.fromkeys([*(str(artifact(cfg, *k)) for k in similarities(variants)), *fold]))

    embs = [k[2] for k in similarities(made + after_row) if len(k) > 2]
    embs = list(dict.fromkeys([*embs, *(embed_as if transfer_row else [])]))
    embeds = {e: str(artifact(cfg, "similarity", run, e)) for e in embs}
    train = f"$(STAGE_CMD) train_expert.py --task {target} --shots {shots}"
    interpolate = f"$(STAGE_CMD) interpolate.py --target {target}"
    rules = [
        f"{backbone}: ; $(STAGE_CMD) train_expert.py --pretrain $(ARGS)",
        *(f"{pool[t]}: {backbone} ; $(STAGE_CMD) train_expert.py --task {t} $(ARGS)" for t in cfg.tasks.pool),
        f"{tgt}: {backbone} ; {train} $(ARGS)",
        *(f"{f}: {backbone} ; {train} --variant fold $(ARGS)" for f in fold),
        f"{sim}: {j(pool[t] for t in others)} {tgt} ; $(STAGE_CMD) embed_tasks.py --target {target} $(ARGS)",
        f"{result}: {interp['']} {tgt} ; $(STAGE_CMD) evaluate.py --target {target} $(ARGS)",
    ]
    if embeds:
        rules.append(
            f"{j(embeds.values())} &: {j(pool[t] for t in others)} {tgt} ; $(STAGE_CMD) embed_tasks.py "
            f"--target {target} --embedding {','.join(embeds)} $(ARGS)"
        )
    phony = {
        "backbone": [backbone],
        "experts": [pool[t] for t in others] + [tgt] + fold,
        "pool-experts": list(pool.values()),
        "embed": [sim],
        "interpolate": [interp[""]],
        "evaluate": [result],
    }
    # the interpolations in one process (one backbone load)
    variants = ",".join(v or "pi" for v in made)
    rules.append(
        f"{j(interp[v] for v in made)}{' &:' if len(made) > 1 else ':'} {made_of(made)} ; {interpolate}"
        + (f" --variant {variants} $(ARGS)" if study else " $(ARGS)")
    )
    needs = [interp[v] for v in made if v]
    trained = [m.trained for m in studied(cfg, study) if m.trained]
    if trained:  # the target-side baselines train_expert.py makes, in one process
        baselines = [meta(artifact(cfg, "expert", f"{run}.{v}")) for v in trained]
        rules.append(f"{j(baselines)} &: {backbone} ; {train} --variant {','.join(trained)} $(ARGS)")
        needs = baselines + needs
    # every pair run the row lacks, or older than its experts, in one process (--variant pairs)
    if transfer_row:
        rules += [
            f"{j(pairs)} &: {j(pool[t] for t in others)} {tgt} {j(fold)} | {sim} ; {interpolate} "
            "--variant pairs $(ARGS)",
            f"{row}: {j(pairs)} {tgt} ; $(STAGE_CMD) evaluate.py --target {target} --transfer $(ARGS)",
            *(f"{interp[v]}: {row} {made_of([v])} ; {interpolate} --variant {v} $(ARGS)" for v in after_row),
        ]
        needs += [*(interp[v] for v in after_row), *embeds.values()]
    if needs:
        rules.append(f"{result}: {j(needs)}")
    return rules, phony


def _get(cfg, key: str) -> str:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


# ---- what no current config uses ----


def _current(cfg, path: Path) -> bool:
    """Would this config make the artifact at `path` (name@digest) as it is?"""
    m = re.fullmatch(f"(?P<name>.+?)@(?P<digest>{HEX_DIGEST})(?P<rest>.*)", path.name)
    if not m:
        return True  # not an artifact (a readable link, a lock, a cache): left alone
    name, folder = m["name"], path.parent.name
    try:
        if path.parent == cfg.run_dir:
            return m["digest"] == digest(cfg, "backbone")
        if folder == "experts":
            return m["digest"] == digest(cfg, "expert", name)
        run = name.split(".")[0]
        variant = name[len(run) + 1 :]
        if folder == "similarity":
            return m["digest"] == digest(cfg, "similarity", run, variant)
        if folder == "interpolated":
            return m["digest"] == digest(cfg, "interpolated", run, variant)
        if folder == "results" and parse_run(run) is None:  # a target's tables: <target>@<config_id>.md
            return m["digest"] == config_id(cfg)
        if folder == "results":
            return m["digest"] == digest(cfg, "transfer" if variant == "transfer" else "result", run)
        if folder in ("fisher", "embeddings"):  # caches of an expert: kept with it
            return m["digest"] == digest(cfg, "expert", name)
    except (KeyError, ValueError, UserError):  # an embedding or variant this code does not know
        return False
    return True


def prune(cfg, dry_run: bool = False) -> list[Path]:
    """Remove the artifacts (and caches of experts) under the run folder that this config would not make, and
    the readable links left pointing at nothing; returns what was (or, with dry_run, would be) removed."""
    rd = cfg.run_dir
    for name in cfg.tasks.imported:  # an adapter out of reach has no digest: nothing could be told current
        adapter_dir(cfg, name)
    found = [p for p in rd.glob("backbone@*")] + [
        p
        for d in ("experts", "similarity", "interpolated", "results", "fisher", "embeddings")
        for p in (rd / d).glob("*@*")
    ]
    gone = sorted(p for p in found if not p.is_symlink() and not _current(cfg, p))
    if not dry_run:
        for p in gone:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in rd.rglob("*"):
            if p.is_symlink() and not p.exists():
                p.unlink()
    return gone


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        raise UserError(
            "usage: python -m common.provenance CONFIG [key=value ...] (--get KEY ... | --rules TARGET "
            "SEED [--study report|loto] [--transfer-row] [--embed-as 'A B'] | --prune)"
        )
    flags = [i for i, a in enumerate(argv) if a.startswith("--")]
    first = flags[0] if flags else len(argv)
    cfg = load_config(argv[0], split_overrides(argv[1:first]))
    opts = argv[first:]
    if opts[:1] == ["--get"]:
        return print(" ".join(_get(cfg, k) for k in opts[1:]))
    if opts[:1] == ["--rules"]:  # one line a rule, ended by %%NL%% (make's $(shell) joins lines with spaces)
        target, seed = opts[1], int(opts[2])
        asked = opts[opts.index("--embed-as") + 1].split() if "--embed-as" in opts else ["default"]
        embed_as = [
            e
            for a in asked
            for e in (
                [v for v in variants() if v not in ASKED_FOR]
                if a == "default"
                else list(variants())
                if a == "all"
                else [a]
            )
        ]
        unknown = sorted(set(embed_as) - set(variants()))
        if unknown:
            raise UserError(
                f"EMBED_AS names {', '.join(unknown)}; use any of {', '.join(variants())}, default or all"
            )
        if target not in cfg.tasks.pool:
            raise UserError(
                f"TARGET={target} is not in tasks.pool of {cfg.path} ({' '.join(cfg.tasks.pool)}); pick "
                f"one of those or add it there"
            )
        study = opts[opts.index("--study") + 1] if "--study" in opts else ""
        if study not in ("", "report", "loto"):
            raise UserError(f"common.provenance --study {study!r}: use report or loto")
        rules, phony = _pipeline(cfg, target, seed, study, "--transfer-row" in opts, embed_as)
        lines = [*rules, *(f"{k}: {' '.join(v)}" for k, v in phony.items())]
        print("".join(f"{line}%%NL%%" for line in lines))
        return
    if opts[:1] == ["--prune"]:
        gone = prune(cfg)
        print(
            f"removed {len(gone)} artifacts this config would not make: "
            + (", ".join(str(p.relative_to(cfg.run_dir)) for p in gone) if gone else "none")
        )
        return
    raise UserError(f"common.provenance: unknown option {opts[0]!r}")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
