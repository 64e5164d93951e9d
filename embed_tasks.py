"""Stage 2: embed every task by its expert (diagonal Fisher, or the expert's weight update), and compare the tasks.

    python embed_tasks.py --target snli-ve     # the pool's experts + the target's low-shot expert
    python embed_tasks.py                      # the pool's full-data experts only

Writes runs/<profile>/fisher/<expert>.safetensors (cached: recomputed only when the expert or the
Fisher settings change) and runs/<profile>/similarity/<name>.csv + .json with the matrix and top-k.
With fisher.embedding=weights no Fisher is computed: the experts' saved updates are compared directly.
--embedding fisher,weights,fisher-batch,fisher-raw,fisher-passes computes those into
similarity/<name>.<embedding>.json, beside the one retrieval uses (make report compares them all against the measured transfer).
"""
from __future__ import annotations

import gc

if __name__ == "__main__":  # a stage's own process: no garbage collections while the imports load (run_stage)
    gc.disable()

import dataclasses
import math
import time

import torch
from safetensors.torch import save_file

from common import data
from common.artifacts import atomic_file, read_json, write_json, write_text
from common.backbone import load_backbone
from common.config import UserError, parse_stage, run_stage, stage_parser
from common.device import accelerator
from common.experts import (attach, current_expert, expert_dir, expert_name, load_expert_weights, read_expert_meta,
                            set_weights)
from common.similarity import (EMBEDDINGS, cached_fisher, expert_update, fisher_cache, fisher_diagonal, normalized,
                               similarity_matrix, task_similarity, top_k_similar, update_similarity)


def pool_experts(cfg, target: str | None) -> list[str]:
    """Expert names to compare: the pool's full-data experts, and the target's low-shot one in place of its own;
    each checked to be made on this backbone under this config."""
    for t in cfg.tasks.pool:
        data.task(cfg, t)
    names = list(cfg.tasks.pool)
    if target is not None:
        data.task(cfg, target, where="--target")
        names = [expert_name(target, cfg.tasks.target_shots, cfg.seed)] + [t for t in names if t != target]
    for name in names:
        current_expert(cfg, name)
    return names


def weight_embedding(cfg, name: str) -> dict[str, torch.Tensor]:
    path = expert_dir(cfg, name)
    layers = read_json(path / "adapter_config.json", "expert config", "retrain it").get("num_layers") or 1
    try:
        return expert_update(load_expert_weights(path), cfg.expert.method, layers)
    except ValueError as e:
        raise UserError(f"{path}: {e}; fisher.embedding=weights needs experts of expert.method={cfg.expert.method}")


def fisher_embeddings(cfg, names: list[str]) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Each expert's diagonal Fisher on its own training data (cached per expert and settings), normalised;
    and the names whose Fisher had to be computed."""
    fc = cfg.fisher
    peft_model = None
    fishers, computed = [], []
    for name in names:
        path = expert_dir(cfg, name)
        meta = read_expert_meta(path)
        out, key = fisher_cache(cfg, name)  # every variant kept: the study compares them
        fisher = cached_fisher(out, key)
        if fisher is None:
            if peft_model is None:  # load the backbone only when something needs computing
                acc = accelerator(cfg)
                model, processor = load_backbone(cfg, acc.device)
                enc = data.Encoder(processor, acc.device)
                peft_model = attach(model, cfg.expert)
                peft_model.eval()
            set_weights(peft_model, load_expert_weights(path))
            # the expert's own training data, as it saw it (the low-shot sample for the target); with
            # fisher.passes, a low-shot sample is passed again (dropout on, so each pass differs) up to `samples`
            exs = data.train_split(cfg, meta["task"], meta["shots"] or 0, meta["seed"])[:fc.samples]
            exs = exs * min(fc.passes, math.ceil(fc.samples / max(len(exs), 1)))
            peft_model.train(fc.passes > 1)
            torch.manual_seed(0)  # the same dropout whichever process computes (and caches) this Fisher
            fisher = fisher_diagonal(peft_model, enc, exs, fc.estimator, fc.batch_size, desc=f"fisher {name}",
                                     autocast=acc.autocast)
            fisher = {k.replace(".default", ""): v.contiguous().cpu() for k, v in fisher.items()}
            if not all(torch.isfinite(v).all() for v in fisher.values()):
                raise UserError(f"{path}: its Fisher is not finite, nothing written; retrain the expert with a "
                                f"lower expert.lr")
            with atomic_file(out) as tmp:
                save_file(fisher, str(tmp), metadata=key)
            computed.append(name)
        fishers.append(normalized(fisher, fc.normalize))
    return fishers, computed


def embed(cfg, names: list[str], target: bool, suffix: str = "") -> str:
    """Embed the experts by fisher.embedding, write the similarity matrix (and the target's top-k) to
    similarity/<target run | pool><suffix>.csv/.json; returns the summary line."""
    fc = cfg.fisher
    t0 = time.time()
    if fc.embedding == "weights":
        embeddings, computed, sim = [weight_embedding(cfg, name) for name in names], [], update_similarity
    else:
        (embeddings, computed), sim = fisher_embeddings(cfg, names), task_similarity
    try:
        matrix = similarity_matrix(embeddings, sim)
    except ValueError as e:
        raise UserError(f"{cfg.path}: {e} (expert.method / backbone must be the same for all of {names})")
    label = (names[0] if target else "pool") + suffix
    how = {"embedding": "weights"} if fc.embedding == "weights" else {
        "embedding": "fisher", "estimator": fc.estimator, "samples": fc.samples, "normalize": fc.normalize,
        "passes": fc.passes}
    result = {"names": names, "matrix": matrix, "fisher": how, "config": cfg.to_dict()}
    if target:
        result["target"] = names[0]
        result["top_k"] = top_k_similar(names, matrix, names[0], cfg.interpolate.top_k)
    sim_dir = cfg.run_dir / "similarity"
    csv = "task," + ",".join(names) + "\n" + "".join(
        f"{n}," + ",".join(f"{v:.4f}" for v in row) + "\n" for n, row in zip(names, matrix))
    write_text(sim_dir / f"{label}.csv", csv)
    write_json(sim_dir / f"{label}.json", result)
    extra = f" | top-{cfg.interpolate.top_k} for {names[0]}: {', '.join(result['top_k'])}" if target else ""
    work = "weight updates" if fc.embedding == "weights" else \
        f"{len(computed)} Fisher computed, {len(names) - len(computed)} cached"
    return f"similarity: {len(names)} experts ({work}){extra} | {time.time() - t0:.0f}s -> {sim_dir / label}.csv"


def main() -> None:
    ap = stage_parser(__doc__.split("\n")[0])
    ap.add_argument("--target", help="target task: its low-shot expert joins the comparison")
    ap.add_argument("--embedding", help=f"{', '.join(EMBEDDINGS)}: this embedding instead of the configured "
                    "one, written to similarity/<name>.<embedding>.json (for comparison; retrieval reads <name>.json); "
                    "several, comma-separated, share one process (fisher,weights)")
    args, cfg = parse_stage(ap)
    embeddings = args.embedding.split(",") if args.embedding else []
    if set(embeddings) - set(EMBEDDINGS):
        raise UserError(f"--embedding '{args.embedding}': use {', '.join(EMBEDDINGS)} (comma-separated for several)")
    names = pool_experts(cfg, args.target)
    configured = cfg.fisher
    for embedding in embeddings:
        cfg.fisher = dataclasses.replace(configured, **EMBEDDINGS[embedding])
        print(embed(cfg, names, bool(args.target), f".{embedding}"), flush=True)
    if not embeddings:
        print(embed(cfg, names, bool(args.target)))


if __name__ == "__main__":
    run_stage(main)
