"""Stage 3: π-Tuning — interpolate the target's expert with its top-k similar experts, on the target.

    python interpolate.py --target snli-ve

phi = sum_i softmax(w_g)_i phi_i over i in {target, top-k}, one learnable logit vector w_g per group
(per site by default: a LoRA / IA3 / adapter module, a prefix layer), trained with the experts (unless
interpolate.train_experts=false) on the target's low-shot split. With interpolate.holdout (stacking) the
mix learns, experts frozen, on that fraction of the split with the target's expert refitted on the rest
(experts/<run>.fold); the full expert then takes its place under those weights, and the experts (unless
train_experts=false) train on the whole split with the weights fixed. LoRA updates are merged exactly
(sum_i p_i B_i A_i, one LoRA of rank k*r); other methods by the weighted sum of their tensors.
Writes runs/<profile>/interpolated/<target>-<shots>shot-s<seed>/: one ordinary expert of the
configured method (peft dir, or adapter dir), weights.json (final weights per group) and meta.json.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a stage's own process: no garbage collections while the imports load (run_stage)
    gc.disable()

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from common import data
from common.artifacts import atomic_dir, read_json, write_json, write_text
from common.backbone import backbone_dir, fingerprint, load_backbone, looks_like_path
from common.device import accelerator
from common.embeddings import ALONE
from common.errors import UserError
from common.expert_types import EXPERT_TYPES
from common.experts import (
    MergedExpert,
    expert_dir,
    expert_name,
    folded,
    load_expert,
    load_pool,
    unload_expert,
)
from common.imported import sources
from common.methods import METHODS, NULL, PAIR, PAIR_PREFIX, by_variant, select_from, top_k_similar
from common.metrics import task_scores
from common.provenance import artifact, link, made_from, parse_run, readable
from common.stage import parse_stage, run_stage, stage_parser
from common.training import Checkpoint, checkpointing, train_steps


def reader(cfg, target: str):
    """read(input) for a method's pick: the JSON of one of its inputs (a similarity file, the transfer row),
    refused in one line with the command that makes it; and refuse(why), naming that file."""

    def read(key: tuple) -> tuple[dict, object]:
        kind, run, *variant = key
        path = artifact(cfg, kind, run, *variant)
        if kind == "similarity":
            embedding = ["--embedding", variant[0]] if variant else []
            fix = f"run `{cfg.command('embed_tasks.py', '--target', target, *embedding)}` (make does)"
        else:  # the transfer row
            fix = (
                f"run `{cfg.command('interpolate.py', '--target', target, '--variant', 'pairs')}`, then "
                f"`{cfg.command('evaluate.py', '--target', target, '--transfer')}` (make report does)"
            )

        def refuse(why: str):
            raise UserError(f"{path}: {why}; {fix}")

        return read_json(path, "similarity" if kind == "similarity" else "transfer matrix row", fix), refuse

    return read


def due_pairs(cfg, run: str, pool: list[str]) -> list[str]:
    """The pair runs of the transfer row (each pool expert, and the control where the type has one) that are
    missing or older than an expert they are made from: a pool that grows adds its new pair runs."""
    control = [NULL] if cfg.control != "-" else []
    due = []
    for other in pool + control:
        made = artifact(cfg, "interpolated", run, f"{PAIR_PREFIX}{other}") / "meta.json"
        # the experts it is made from, as provenance records them (the pair method's inputs)
        recorded = made_from(cfg, "interpolated", run, f"{PAIR_PREFIX}{other}")["inputs"]
        inputs = [artifact(cfg, i["kind"], i["name"], i["variant"]) for i in recorded]
        if not made.is_file() or any(
            (d / "meta.json").is_file() and (d / "meta.json").stat().st_mtime_ns > made.stat().st_mtime_ns
            for d in inputs
        ):
            due.append(f"{PAIR_PREFIX}{other}")
    return due


@dataclass
class Mixed:
    """A trained mix on the loaded backbone
    (merge.model holds it until unloaded) and what the artifact records."""

    merge: MergedExpert
    logits: torch.Tensor
    loss: float
    train_size: int
    mix_size: int
    checkpoints: list


@dataclass(frozen=True)
class Job:
    """One interpolation to make: the target, its run, the variant's name ("" = π-Tuning as configured), the
    experts (the target's first), how they were picked, and whether they train with the mix."""

    target: str
    run: str
    name: str
    experts: list
    how: str
    train_experts: bool


def mix(cfg, accel, model, enc, job: Job, out: Path) -> Mixed:
    """Train the job's interpolation on the target's shots, seeded as if alone, its checkpoints beside
    `out`."""
    target, run, experts, train_experts = job.target, job.run, job.experts, job.train_experts
    ic, shots = cfg.interpolate, cfg.tasks.target_shots
    torch.manual_seed(cfg.seed)
    etype = EXPERT_TYPES[cfg.expert.method]
    frozen = tuple(i for i, e in enumerate(experts) if e == NULL and etype.merge == "sum")

    def stack(names: list[str], trainable: bool) -> MergedExpert:
        weights = load_pool(cfg, [e for e in names if e != NULL])
        if NULL in names:  # LoRA's B = A = 0 get no gradient; a summed type's null is held as it is
            weights.append(etype.null(weights[0]))
            if weights.keep:  # nor do its biases (a pool with LoRA biases)
                weights.keep.append({k: torch.zeros_like(v) for k, v in weights.keep[0].items()})
        return MergedExpert(model, cfg.expert, weights, ic.groups, trainable=trainable, frozen=frozen)

    def fit(
        merge: MergedExpert, train, learn_logits: bool, learn_experts: bool, ckpt: Checkpoint, desc: str
    ) -> float:
        merge.model.train()
        groups = [{"params": [logits], "lr": ic.logits_lr}] if learn_logits else []
        if learn_experts:
            groups.append({"params": list(merge.stack.parameters()), "lr": ic.lr})
        batches = data.train_batches(cfg, train, ic.batch_size, cfg.seed, enc, "interpolate.batch_size", desc)
        return train_steps(
            lambda inputs: merge(logits, **inputs).loss,
            groups,
            batches,
            ic.steps,
            ic.grad_clip,
            warmup=min(20, ic.steps // 10),
            desc=desc,
            accel=accel,
            grad_accum=ic.grad_accum,
            lr_field="interpolate.lr" if learn_experts else "interpolate.logits_lr",
            checkpoint=ckpt,
            log_every=cfg.log_every,
        )

    ckpts = [Checkpoint.beside(out, ic.checkpoint_every, cfg)]
    desc = f"interpolate {run}"
    train = data.train_split(cfg, target, shots, cfg.seed)
    mix_on = data.fold_split(cfg, train, cfg.seed)[1] if ic.holdout else train
    # stacking (holdout): the mix learns on examples that the target's expert in it
    # (the fold expert) never saw
    merge = stack(
        [f"{run}.fold" if e == run and ic.holdout else e for e in experts],
        trainable=train_experts and not ic.holdout,
    )
    # uniform
    logits = torch.zeros(len(merge.group_names), len(experts), device=accel.device, requires_grad=True)
    loss = fit(merge, mix_on, True, train_experts and not ic.holdout, ckpts[0], desc)
    if ic.holdout:  # those weights on the expert fitted to every example; trained experts then fit them all
        unload_expert(merge.model)
        merge = stack(experts, trainable=train_experts)
        if train_experts:
            logits.requires_grad_(False)
            ckpts.append(Checkpoint.beside(out.with_name(f"{out.name}.experts"), ic.checkpoint_every, cfg))
            loss = fit(merge, train, False, True, ckpts[1], f"{desc} (experts)")
    return Mixed(merge, logits, loss, len(train), len(mix_on), ckpts)


def model_card(cfg, saved: dict, arch: str, out: Path, job: Job, groups) -> str:
    """The exported expert's README.md, as the hub shows an adapter: what it is, how to load it (on the
    backbone's class `arch`), the experts merged and their learned weights per group, the command and the
    config that made it."""
    target, name, experts, how = job.target, job.name, job.experts, job.how
    imported = sources(cfg)
    origin = {e: f"`{imported[e]}`" if e in imported else "train_expert.py" for e in experts}
    origin |= {NULL: "nothing (the expert that changes nothing)"} if NULL in experts else {}
    mean = {e: sum(w[e] for w in groups.values()) / len(groups) for e in experts}
    source = cfg.backbone.source
    hub = (
        source if source != "embedded" and not looks_like_path(source) else ""
    )  # an id: the hub takes no path
    recipe = f", r {saved['r']}, lora_alpha {saved['lora_alpha']}" if "r" in saved else ""
    command = cfg.command("interpolate.py", "--target", target, *(("--variant", name) if name else ()))
    shots = f"{cfg.tasks.target_shots}-shot" if cfg.tasks.target_shots else "whole"
    # a peft type loads with peft; the Houlsby adapters with this harness's own class
    loader = (
        "from peft import PeftModel" if "peft_type" in saved else "from common.adapters import AdapterModel"
    )
    lines = [
        "---\n" + (f"base_model: {json.dumps(hub)}\n" if hub else "") + "library_name: peft\n"
        f"tags: [pi-tuning, {cfg.expert.method}]\n---",
        f"# {out.name}: π-Tuning's mix of {len(experts)} experts for {target}",
        f"One peft adapter ({saved.get('peft_type', cfg.expert.method)}{recipe}) for the backbone at "
        f"`{backbone_dir(cfg)}`: the experts below merged with the weights learned on {target}'s {shots} "
        f"training sample (seed {cfg.seed}), retrieved by {how}.",
        f"```python\n{loader}\nfrom transformers import {arch}\n\n"
        f'base = {arch}.from_pretrained("{backbone_dir(cfg)}")\n'
        f'model = {loader.rsplit(" ", 1)[-1]}.from_pretrained(base, "{out}")\n```',
        "| expert | from | mean weight |\n|---|---|---|\n"
        + "\n".join(f"| {e} | {origin[e]} | {mean[e]:.3f} |" for e in experts),
        f"Learned weights per group (interpolate.groups: {cfg.interpolate.groups}; each row sums to 1):",
        f"| group | {' | '.join(experts)} |\n|---|{'---|' * len(experts)}\n"
        + "\n".join(
            f"| {g} | " + " | ".join(f"{w[e]:.3f}" for e in experts) + " |" for g, w in groups.items()
        ),
        f"Made by:\n\n```\n{command}\n```",
        f"Config:\n\n```yaml\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}```",
    ]
    return "\n\n".join(lines) + "\n"


def write(cfg, mixed: Mixed, out: Path, job: Job, t0: float, extra: dict | None = None) -> str:
    """Export a trained mix as ONE ordinary expert at `out` (+ weights.json, meta.json, README.md), unload it
    from the backbone and return the stage's summary line."""
    target, run, name, experts, how = job.target, job.run, job.name, job.experts, job.how
    ic, merge = cfg.interpolate, mixed.merge
    probs = torch.softmax(mixed.logits.detach(), dim=-1)
    groups = {g: dict(zip(experts, p.tolist())) for g, p in zip(merge.group_names, probs)}
    with atomic_dir(out) as tmp:
        merge.export(mixed.logits).save_pretrained(tmp)
        write_json(tmp / "weights.json", {"experts": experts, "groups": groups})
        saved = read_json(tmp / "adapter_config.json", "exported config", "run it again")
        arch = type(getattr(merge.model, "get_base_model", lambda: merge.model)()).__name__
        card = model_card(cfg, saved, arch, out, job, groups)
        write_text(tmp / "README.md", card)
        write_json(
            tmp / "meta.json",
            {
                "target": target,
                "run": run,
                "experts": experts,
                "shots": cfg.tasks.target_shots,
                "seed": cfg.seed,
                "retrieval": how,
                "variant": name,
                "method": cfg.expert.method,
                "train_size": mixed.train_size,
                "mix_size": mixed.mix_size,
                "groups": ic.groups,
                "num_groups": len(merge.group_names),
                "train_experts": job.train_experts,
                "steps": ic.steps,
                "final_loss": mixed.loss,
                "mean_weights": dict(zip(experts, probs.mean(0).tolist())),
                "backbone": fingerprint(backbone_dir(cfg)),
                "seconds": round(time.time() - t0, 1),
                "config": cfg.to_dict(),
                "made_from": made_from(cfg, "interpolated", run, name),
                **(extra or {}),
            },
        )
    link(out)
    for ckpt in mixed.checkpoints:
        ckpt.done()
    unload_expert(merge.model)
    mean = ", ".join(f"{e} {p:.2f}" for e, p in zip(experts, probs.mean(0).tolist()))
    return (
        f"interpolated {out.name} ({cfg.expert.method}, {how}): {len(merge.group_names)} groups, mean "
        f"weights [{mean}], loss {mixed.loss:.3f}, {time.time() - t0:.0f}s -> {out}"
    )


def interpolate(cfg, accel, model, enc, job: Job) -> str:
    """One π-Tuning run (or baseline run) on the loaded backbone, written to
    interpolated/<run>[.<name>]@<digest>/; the backbone comes back unchanged, so one process can do several.
    Returns its summary line."""
    t0, out = time.time(), artifact(cfg, "interpolated", job.run, job.name)
    return write(cfg, mix(cfg, accel, model, enc, job, out), out, job, t0)


def candidate_sets(cfg, run: str) -> list[dict]:
    """The retrievals selection chooses among: k = 0 (the target's expert alone), then the top-k of each
    embedding of interpolate.select_from for each k of select_k, each expert set once
    (the embeddings and ks that give it)."""
    sets, read = {(): []}, reader(cfg, parse_run(run)["task"])
    for emb in select_from(cfg):
        sim, _ = read(("similarity", run, emb))
        for k in sorted(cfg.interpolate.select_k):
            sets.setdefault(tuple(top_k_similar(sim["names"], sim["row"], k)), []).append(f"{emb} top-{k}")
    return [
        {"experts": list(e), "by": by or [ALONE]} for e, by in sorted(sets.items(), key=lambda kv: len(kv[0]))
    ]


def select(cfg, accel, model, enc, target: str, run: str, name: str, candidates: list[dict]) -> str:
    """π-Tuning chosen on the target's validation split: every candidate retrieval (candidate_sets)
    interpolated as π-Tuning would be, scored on validation (test is never read), the best kept (ties: the
    earlier, fewer experts); k = 0 keeps the target's expert as it is. Every candidate's score goes in the
    artifact's meta.json (`candidates`). One backbone load; the encoded validation batches and image features
    are kept across candidates (data.Encoder keep_mb, the feature cache)."""
    t0, out, ic = time.time(), artifact(cfg, "interpolated", run, name), cfg.interpolate
    task, val = data.task(cfg, target), data.split(cfg, target, "val")
    work = out.with_name(f".{out.name}.candidates")  # the best candidate's export so far, until the end
    shutil.rmtree(work, ignore_errors=True)
    best = None
    for c in candidates:
        job = Job(target, run, name, [run, *c["experts"]], " / ".join(c["by"]), ic.train_experts)
        if c["experts"]:
            mixed = mix(cfg, accel, model, enc, job, out)
            scored = mixed.merge.export(mixed.logits).eval()  # trained in train mode: dropout off to score
        else:
            scored = load_expert(model, expert_dir(cfg, run))
        with folded(scored), accel.autocast():
            metric, c["val"], _ = task_scores(scored, enc, task, val, cfg.evaluate.batch_size)
        if best is None or c["val"] > best["val"]:
            best = c
            shutil.rmtree(work, ignore_errors=True)
            if c["experts"]:  # written (and unloaded) now: the next candidate trains on the bare backbone
                write(cfg, mixed, work, job, t0)
                continue
            shutil.copytree(expert_dir(cfg, run), work)
            write_json(work / "weights.json", {"experts": [run], "groups": {}})
        if c["experts"]:
            for ckpt in mixed.checkpoints:
                ckpt.done()
        model = unload_expert(scored)
    print(
        f"select {run} on validation ({metric}, {len(val)} examples): "
        + ", ".join(f"[{', '.join(c['experts']) or 'alone'}] {c['val']:.3f}" for c in candidates),
        flush=True,
    )
    meta = read_json(work / "meta.json", "candidate", "run it again")
    how = f"selected on validation: {' / '.join(best['by'])}"
    with atomic_dir(out) as tmp:
        for f in work.iterdir():
            if f.name != "meta.json":
                shutil.copy2(f, tmp / f.name)
        write_json(
            tmp / "meta.json",
            {
                **(
                    meta
                    if best["experts"]
                    else {
                        "target": target,
                        "run": run,
                        "shots": cfg.tasks.target_shots,
                        "seed": cfg.seed,
                        "method": cfg.expert.method,
                        "backbone": fingerprint(backbone_dir(cfg)),
                        "config": cfg.to_dict(),
                    }
                ),
                "experts": [run, *best["experts"]],
                "retrieval": how,
                "variant": name,
                "candidates": candidates,
                "seconds": round(time.time() - t0, 1),
                "made_from": made_from(cfg, "interpolated", run, name),
            },
        )
    link(out)
    shutil.rmtree(work, ignore_errors=True)
    readable(work).unlink(missing_ok=True)  # write() pointed a readable name at the candidates' folder
    return (
        f"interpolated {out.name} ({cfg.expert.method}, {how}): val {metric} {best['val']:.3f}, "
        f"{len(candidates)} candidates, {time.time() - t0:.0f}s -> {out}"
    )


def main() -> None:
    ap = stage_parser(__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="target task (its low-shot expert must exist)")
    ap.add_argument(
        "--variant",
        default="pi",
        help="pi (π-Tuning as configured, interpolated/<run>@<d>/), or a method's run instead, written to "
        "interpolated/<run>.<variant>@<d>/: "
        + "; ".join(f"{m.variant} ({m.what})" for m in METHODS.values() if m.variant)
        + f"; {PAIR_PREFIX}<expert> ({PAIR.what}); {PAIR_PREFIX}{NULL} (an expert that adds nothing: the "
        "row's control); pairs (every pair run missing or older than its experts). Several, comma-separated, "
        "share one backbone load (pi,random,frozen)",
    )
    args, cfg = parse_stage(ap)
    data.task(cfg, args.target, where="--target")
    ic = cfg.interpolate
    run = expert_name(args.target, cfg.tasks.target_shots, cfg.seed)
    pool = [t for t in cfg.tasks.pool if t != args.target]
    for name in ic.experts:
        if name not in pool:
            raise UserError(
                f"{cfg.path}: interpolate.experts names '{name}', not a pool expert of {run} "
                f"(pool: {', '.join(pool)})"
            )

    if ic.holdout and not (expert_dir(cfg, f"{run}.fold") / "meta.json").is_file():
        fold = cfg.command(
            "train_expert.py",
            "--task",
            args.target,
            "--shots",
            str(cfg.tasks.target_shots),
            "--variant",
            "fold",
        )
        raise UserError(
            f"{expert_dir(cfg, f'{run}.fold')}: not found; {cfg.path}: field 'interpolate.holdout' is "
            f"{ic.holdout}, so the mix needs the target's expert refitted without the examples it holds "
            f"out: run `{fold}` (make does)"
        )
    names = []
    for v in args.variant.split(","):
        names += due_pairs(cfg, run, pool) if v == "pairs" else ["" if v == "pi" else v]
    read, todo = reader(cfg, args.target), []
    for name in names:  # every input read and every pick made before the backbone loads
        method = by_variant(name)
        if method.chosen(cfg):  # chosen on validation: its candidate retrievals, every similarity read
            todo.append((name, method, candidate_sets(cfg, run), None))
        else:
            todo.append((name, method, *method.pick(cfg, run, name, pool, read)))
    if not todo:
        return print(f"interpolate {run}: every pair run is made and current")
    accel = accelerator(cfg)
    model, processor = load_backbone(cfg, accel.device)
    checkpointing(model, ic.gradient_checkpointing)
    # selection scores the same batches; answers as the checkpoint emits them (its generation config)
    enc = data.Encoder(
        processor, accel.device, keep_mb=cfg.feature_cache_mb, generation=model.generation_config
    )
    for name, method, pool_experts, how in todo:
        if how is None:  # chosen on validation among these candidates
            print(select(cfg, accel, model, enc, args.target, run, name, pool_experts), flush=True)
        else:
            trains = ic.train_experts and not method.frozen
            job = Job(args.target, run, name, [run] + pool_experts, how, trains)
            print(interpolate(cfg, accel, model, enc, job), flush=True)


if __name__ == "__main__":
    run_stage(main)
