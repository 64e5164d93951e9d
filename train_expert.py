"""Stage 1: train one parameter-efficient expert for one task on the frozen backbone.

    python train_expert.py --task nli                      # a pool expert, on the task's full train split
    python train_expert.py --task snli-ve --shots 64       # the target's low-shot expert (seeded sample)
    python train_expert.py --task snli-ve --shots 0        # the target's expert on its whole train split
    python train_expert.py --task mine                     # an imported expert (tasks.imported): checked
    python train_expert.py --pretrain                      # build + pre-train the embedded backbone first
                                                           # (a real backbone: check it loads, record it)

Writes runs/<profile>/experts/<name>/ (peft adapter dir + meta.json), or runs/<profile>/backbone/.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a stage's own process: no garbage collections while the imports load (run_stage)
    gc.disable()

import random
import shutil
import time

import torch

from common import data, world as W
from common.artifacts import atomic_dir, write_json
from common.backbone import (
    backbone_dir,
    build_model,
    build_processor,
    fingerprint,
    init_unseen_embeddings,
    load_backbone,
)
from common.device import accelerator
from common.errors import UserError
from common.experts import attach, expert_dir, expert_name, import_expert, learning_rate
from common.imported import CONFIG as IMPORTED_CONFIG, WEIGHTS, adapter_dir, files_hash
from common.methods import trained_baselines
from common.metrics import task_metric, token_accuracy
from common.provenance import artifact, link, made_from
from common.stage import parse_stage, run_stage, stage_parser
from common.training import Checkpoint, checkpointing, train_steps


def pretrain(cfg) -> None:
    """Build the tiny Florence-2 and pre-train it on captioning + description infilling
    (not the downstream tasks)."""
    out = backbone_dir(cfg)
    if cfg.backbone.source != "embedded":
        return record_backbone(cfg)
    accel = accelerator(cfg)
    torch.manual_seed(0)  # one backbone for every seed (make builds it once), like the pool experts
    w, pc = cfg.world, cfg.pretrain
    vocab = data.world_vocabulary(w)
    model, n_image_tokens = build_model(cfg.backbone, len(vocab), w.image_size)
    processor = build_processor(vocab, w.image_size, n_image_tokens)
    model.to(accel.device)
    checkpointing(model, pc.gradient_checkpointing)
    enc = data.Encoder(processor, accel.device)

    # pre-training draws fresh scenes every step from a seeded stream (never the downstream splits)
    rng = random.Random(0)

    def batches():
        # infilling is learned fast; captions need the image
        task_cycle = ["pt-caption", "pt-caption", "pt-infill"]
        step = 0
        while True:
            task = data.PRETRAIN_TASKS[task_cycle[step % len(task_cycle)]]
            step += 1
            yield [task.make(rng, w.image_size) for _ in range(pc.batch_size)]

    model.train()
    t0 = time.time()
    ckpt = Checkpoint.beside(out, pc.checkpoint_every, cfg)
    loss = train_steps(
        lambda b: model(**enc.batch(b)).loss,
        [{"params": list(model.parameters()), "lr": pc.lr}],
        batches(),
        pc.steps,
        pc.grad_clip,
        pc.warmup,
        desc="pretrain backbone",
        lr_field="pretrain.lr",
        accel=accel,
        grad_accum=pc.grad_accum,
        checkpoint=ckpt,
        log_every=cfg.log_every,
        count=enc.targets,
    )
    model.eval()
    checkpointing(model, False)

    # words the decoder never had to produce keep tiny embeddings: initialise them like new label tokens
    seen = torch.zeros(len(vocab), dtype=torch.bool)
    for t in data.PRETRAIN_TASKS:
        for e in data.examples(t, "train", w, 1000):
            seen[enc.labels([e.answer])[0].clamp(min=0).cpu()] = True
    n_new = init_unseen_embeddings(model, seen, 0)

    val = {t: data.examples(t, "val", w, 200) for t in data.PRETRAIN_TASKS}
    with torch.no_grad(), accel.autocast():
        accuracy = {t: token_accuracy(model, enc, v) for t, v in val.items()}
        attrs = attribute_probe(model, enc, val["pt-caption"])
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(
            tmp / "meta.json",
            {
                "kind": "embedded-florence2",
                "params": sum(p.numel() for p in model.parameters()),
                "vocab_size": len(vocab),
                "image_tokens": n_image_tokens,
                "steps": pc.steps,
                "final_loss": loss,
                "val_token_accuracy": accuracy,
                "val_caption_word_accuracy": attrs,
                "new_label_tokens": n_new,
                "seconds": round(time.time() - t0, 1),
                "config": cfg.to_dict(),
                "made_from": made_from(cfg, "backbone"),
            },
        )
    link(out)
    ckpt.done()
    print(
        f"backbone: {out} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | caption token "
        f"accuracy {accuracy['pt-caption']:.3f} ({', '.join(f'{k} {v:.2f}' for k, v in attrs.items())}) | "
        f"infill "
        f"{accuracy['pt-infill']:.3f} | {time.time() - t0:.0f}s"
    )


def record_backbone(cfg) -> None:
    """A real backbone is not built here: check that it loads (offline: one line saying how to get it) and
    record what it is in runs/<profile>/backbone/meta.json, the file the Makefile's later stages depend on."""
    t0 = time.time()
    model, processor = load_backbone(cfg)
    out = artifact(cfg, "backbone")
    with atomic_dir(out) as tmp:
        write_json(
            tmp / "meta.json",
            {
                "kind": model.config.model_type,
                "source": cfg.backbone.source,
                "fingerprint": fingerprint(backbone_dir(cfg)),
                "params": sum(p.numel() for p in model.parameters()),
                "config": cfg.to_dict(),
                "made_from": made_from(cfg, "backbone"),
            },
        )
    link(out)
    print(
        f"backbone: {cfg.backbone.source} ({model.config.model_type}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) loads | "
        f"{time.time() - t0:.0f}s -> {out}"
    )


@torch.no_grad()
def attribute_probe(model, enc, exs, batch_size: int = 200) -> dict[str, float]:
    """Teacher-forced accuracy on the caption words of each attribute: does the backbone see it?"""
    attrs = {
        "shape": W.SHAPES,
        "colour": tuple(W.COLOURS),
        "size": W.SIZES,
        "count": W.NUMBERS[1:4],
        "position": ("top", "bottom", "left", "right", "center"),
    }
    ids = {
        a: torch.tensor(enc.tok.convert_tokens_to_ids(list(words)), device=enc.device)
        for a, words in attrs.items()
    }
    right, total = dict.fromkeys(attrs, 0), dict.fromkeys(attrs, 0)
    for chunk in data.batches(exs, batch_size):
        b = enc.batch(chunk)
        pred = model(**b).logits.argmax(-1)
        for a in attrs:
            hit = torch.isin(b["labels"], ids[a])
            right[a] += ((pred == b["labels"]) & hit).sum().item()
            total[a] += hit.sum().item()
    return {a: round(right[a] / max(total[a], 1), 3) for a in attrs}


def import_pool_expert(cfg, name: str) -> None:
    """A pool expert trained elsewhere (tasks.imported): copied into runs/, the copy checked against the
    backbone (common.experts.import_expert), kept only if it passes."""
    t0 = time.time()
    src = adapter_dir(cfg, name, download=True)
    files_hash(cfg, name, remember=True)  # once: the digest below and the check of the copy use it
    out = expert_dir(cfg, name)
    model, _ = load_backbone(cfg, "cpu")
    with atomic_dir(out) as tmp:
        for f in (IMPORTED_CONFIG, WEIGHTS, "README.md"):
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
        meta = import_expert(cfg, name, model, tmp)
        meta["task"] = name if data.has_data(cfg, name) else None  # its data: a Fisher, a transfer row
        write_json(tmp / "meta.json", meta | {"seconds": round(time.time() - t0, 1)})
    link(out)
    r, has = meta["recipe"], "with data" if meta["task"] else "without data"
    print(
        f"imported {name} from {meta['imported']['source']}: LoRA r {r['r']}, {r['sites']} sites, scales "
        f"{r['scales']}{', biases' if r['bias'] else ''}, {has} -> {out}"
    )


def train_expert(cfg, task_name: str, shots: int | None, variant: str = "") -> None:
    """variant: a target-side baseline with the same data: 2x (twice the steps) or full-ft (every weight
    of the backbone trains, no expert); or fold, the expert refitted without the examples that
    interpolate.holdout keeps for the mix (stacking); written to experts/<name>.<variant>/."""
    task = data.task(cfg, task_name, where="--task")
    name = expert_name(task_name, shots, cfg.seed) + (f".{variant}" if variant else "")
    # pool experts are trained once per profile; the seed varies only the target's side
    seed = cfg.seed if shots is not None else 0
    accel = accelerator(cfg)
    torch.manual_seed(seed)
    model, processor = load_backbone(cfg, accel.device)
    enc = data.Encoder(processor, accel.device, generation=model.generation_config)
    train = data.train_split(cfg, task_name, shots or 0, seed, where="--shots")
    if variant == "fold":
        train = data.fold_split(cfg, train, seed)[0]
    val = data.split(cfg, task_name, "val", cfg.expert.eval_size)
    data.check_words(cfg, task_name, enc.tok.get_vocab(), train, val)

    ec, method = cfg.expert, trained_baselines().get(variant)  # (none for the target's expert or its fold)
    full = method is not None and method.loads == "full"  # every weight of the backbone trains, no expert
    steps, lr = ec.steps * (method.steps_x if method else 1), ec.full_ft_lr if full else learning_rate(ec)
    checkpointing(model, ec.gradient_checkpointing)
    model = model.requires_grad_(True) if full else attach(model, ec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.time()
    out = expert_dir(cfg, name)
    ckpt = Checkpoint.beside(out, ec.checkpoint_every, cfg)
    desc = f"expert {name}"
    batches = data.train_batches(cfg, train, ec.batch_size, seed, enc, "expert.batch_size", desc)
    loss = train_steps(
        lambda inputs: model(**inputs).loss,
        [{"params": params, "lr": lr}],
        batches,
        steps,
        ec.grad_clip,
        warmup=min(30, steps // 10),
        desc=desc,
        lr_field="expert.full_ft_lr" if full else "expert.lr",
        accel=accel,
        grad_accum=ec.grad_accum,
        checkpoint=ckpt,
        log_every=cfg.log_every,
    )
    model.eval()
    with accel.autocast():
        metric, value = task_metric(model, enc, task, val, cfg.evaluate.batch_size)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        write_json(
            tmp / "meta.json",
            {
                "name": name,
                "task": task_name,
                "family": task.family,
                "method": ec.method if variant == "fold" else variant or ec.method,
                "shots": shots,
                **({"holdout": cfg.interpolate.holdout} if variant == "fold" else {}),
                "seed": seed,
                "train_size": len(train),
                "train_rows": data.train_rows(cfg, task_name),
                "val_size": len(val),
                "steps": steps,
                "final_loss": loss,
                "val_metric": metric,
                "val_value": value,
                "trainable_params": sum(p.numel() for p in params),
                "backbone": fingerprint(backbone_dir(cfg)),
                "seconds": round(time.time() - t0, 1),
                "config": cfg.to_dict(),
                "made_from": made_from(cfg, "expert", name),
            },
        )
    link(out)
    ckpt.done()
    print(
        f"expert {name}: {len(train)} train examples, {steps} steps, loss {loss:.3f}, "
        f"val {metric} {value:.3f}, {time.time() - t0:.0f}s -> {out}"
    )


def main() -> None:
    ap = stage_parser(__doc__.split("\n")[0])
    ap.add_argument("--task", help="task to train an expert for (see common/data.py TASKS)")
    ap.add_argument(
        "--shots",
        type=int,
        help="train the target's expert on a seeded k-shot sample (0 = its whole "
        "train split); without it, the task's pool expert",
    )
    ap.add_argument(
        "--variant",
        default="",
        help="with --shots: a target-side baseline instead, in experts/<name>.<variant>/: "
        + "; ".join(f"{v} ({m.what})" for v, m in trained_baselines().items())
        + "; or fold, the expert without the examples interpolate.holdout keeps for the mix. Several, "
        "comma-separated, share one process (2x,full-ft)",
    )
    ap.add_argument(
        "--pretrain",
        action="store_true",
        help="build and pre-train the embedded backbone (a real "
        "backbone.source: check that it loads and record it)",
    )
    args, cfg = parse_stage(ap)
    if args.pretrain:
        pretrain(cfg)
    elif args.task:
        if args.shots is not None and args.shots < 0:
            raise UserError(
                f"--shots {args.shots}: use 0 (the whole train split) or a positive number of examples"
            )
        variants, known = args.variant.split(","), [*trained_baselines(), "fold"]
        if args.variant and (args.shots is None or set(variants) - set(known)):
            raise UserError(
                f"--variant '{args.variant}': use {', '.join(known)} or several of them, with --shots (the "
                f"baselines of the target's low-shot expert; fold: its expert for stacking)"
            )
        if "fold" in variants and not cfg.interpolate.holdout:
            raise UserError(
                f"--variant fold: {cfg.path}: field 'interpolate.holdout' is 0, so no examples are held "
                f"out for the mix; set it (0.5 holds out half) or leave fold out"
            )
        if args.task in cfg.tasks.imported and args.shots is None:
            return import_pool_expert(cfg, args.task)
        for variant in variants:  # each on a freshly loaded backbone, seeded as if run alone
            train_expert(cfg, args.task, args.shots, variant)
    else:
        raise UserError("train_expert.py: say what to train: --task NAME (or --pretrain); see --help")


if __name__ == "__main__":
    run_stage(main)
