"""Stage 2: embed every task by its expert (embed.embedding: common/embeddings.py), and compare the tasks.

    python embed_tasks.py --target snli-ve     # the pool's experts + the target's low-shot expert
    python embed_tasks.py                      # the pool's full-data experts only

Writes runs/<profile>/fisher/<expert>.safetensors (cached: recomputed only when the expert or the
Fisher settings change) and runs/<profile>/similarity/<name>.csv + .json with the matrix and top-k.
With embed.embedding=weights no Fisher is computed: the experts' saved updates are compared directly.
--embedding fisher,weights,fisher-batch,fisher-raw,fisher-passes (embeddings.variants()) computes those into
similarity/<name>.<embedding>.json, beside the one retrieval uses
(make report compares them all against the measured transfer).
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a stage's own process: no garbage collections while the imports load (run_stage)
    gc.disable()

import dataclasses
import time

from common import data
from common.artifacts import write_json, write_text
from common.embeddings import recorded, variants
from common.errors import UserError
from common.experts import current_expert, expert_name
from common.methods import top_k_similar
from common.provenance import artifact, link, made_from
from common.similarity import COMPUTE, compared, ranked_by
from common.stage import parse_stage, run_stage, stage_parser


def pool_experts(cfg, target: str | None) -> list[str]:
    """Expert names to compare: the pool's full-data experts, and the target's low-shot one in place of its
    own; each checked to be made on this backbone under this config."""
    for t in cfg.tasks.pool:
        if data.has_data(cfg, t):
            data.task(cfg, t)
    names = list(cfg.tasks.pool)
    if target is not None:
        data.task(cfg, target, where="--target")
        names = [expert_name(target, cfg.tasks.target_shots, cfg.seed)] + [t for t in names if t != target]
    for name in names:
        current_expert(cfg, name)
    return names


def embed(cfg, names: list[str], target: bool, suffix: str = "") -> str:
    """Embed the experts by embed.embedding and write to similarity/<target run | pool><suffix>.csv/.json the
    target's similarity row and top-k (retrieval compares the target alone with each expert; the report draws
    the whole matrix from the cached embeddings), or without a target the pool's matrix;
    returns the summary line."""
    how = COMPUTE[cfg.embed.embedding]
    t0 = time.time()
    by = ranked_by(cfg, names)
    rows, work = compared(cfg, names, target)
    path = artifact(cfg, "similarity", names[0] if target else "pool", suffix[1:])
    result = {
        "names": names,
        "embed": recorded(cfg.embed),
        "config": cfg.to_dict(),
        "made_from": made_from(cfg, "similarity", names[0] if target else "pool", suffix[1:]),
    }
    if how.examples:  # which of each expert's examples it was embedded by (data.subset)
        result["examples"] = how.examples(cfg, [n for n in names if by[n] == cfg.embed.embedding])
    if set(by.values()) != {cfg.embed.embedding}:  # experts the configured embedding cannot take
        result["ranked_by"] = by
    if target:
        result |= {
            "target": names[0],
            "row": rows[0],
            "top_k": top_k_similar(names, rows[0], cfg.interpolate.top_k),
        }
    else:
        result["matrix"] = rows
    csv = (
        "task,"
        + ",".join(names)
        + "\n"
        + "".join(f"{n}," + ",".join(f"{v:.4f}" for v in row) + "\n" for n, row in zip(names, rows))
    )
    write_text(path.with_suffix(".csv"), csv)
    write_json(path, result)
    link(path), link(path.with_suffix(".csv"))
    extra = f" | top-{cfg.interpolate.top_k} for {names[0]}: {', '.join(result['top_k'])}" if target else ""
    return (
        f"similarity: {len(names)} experts ({work}){extra} | {time.time() - t0:.0f}s -> "
        f"{path.with_suffix('.csv')}"
    )


def main() -> None:
    ap = stage_parser(__doc__.split("\n")[0])
    ap.add_argument("--target", help="target task: its low-shot expert joins the comparison")
    ap.add_argument(
        "--embedding",
        help=f"{', '.join(variants())}: this embedding instead of the configured "
        "one, written to similarity/<name>.<embedding>.json (for comparison; retrieval reads <name>.json); "
        "several, comma-separated, share one process (fisher,weights)",
    )
    args, cfg = parse_stage(ap)
    embeddings, known = args.embedding.split(",") if args.embedding else [], variants()
    if set(embeddings) - set(known):
        raise UserError(
            f"--embedding '{args.embedding}': use {', '.join(known)} (comma-separated for several)"
        )
    names = pool_experts(cfg, args.target)
    configured = cfg.embed
    for embedding in embeddings:
        cfg.embed = dataclasses.replace(configured, **known[embedding])
        print(embed(cfg, names, bool(args.target), f".{embedding}"), flush=True)
    if not embeddings:
        print(embed(cfg, names, bool(args.target)))


if __name__ == "__main__":
    run_stage(main)
