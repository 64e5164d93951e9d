"""Retrieval in a library of imported experts: N peft LoRA folders at Florence-2-base shapes, of mixed
recipes, the target's top-k by the `weights` embedding and by `prototypes`, streamed from disk as
embed_tasks.py does.

    python bench/retrieval_bench.py                       # N = 10, 100, 1000 (about 5 GB of adapter folders)
    python bench/retrieval_bench.py --sizes 10 100 --dir /tmp/library

Experts: peft adapter folders (adapter_config.json + adapter_model.safetensors, fp32) on q, k, v, out of every
attention of Florence-2-base's language model (6 encoder layers with self-attention, 6 decoder layers with
self- and cross-attention: 72 sites, d 768), of mixed recipes as an imported library has them: r 16 or 8,
lora_alpha 32, 16 or 8, rsLoRA on every third, every fourth on q and v only (36 sites); drawn in 20 families
that share a direction, so the top-k has something to find (printed: the share of the top-k in the target's
family). Each N runs in its own process, so its peak resident memory is its own. Per N: retrieval by
`weights` (each expert read from disk when its turn comes, its factors compared with the target's and
dropped: common.similarity.similarity_row over a generator), the prototypes computed once into their cache
(keyed by the hash of each file, the hash remembered by the file's size and time), retrieval by `prototypes`
from that cache; the fastest of 3 runs each, and the peak RSS. Then the peak at N = 1000 over N = 100.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

D, R, LAYERS, FAMILIES, K, REPEATS = 768, 16, 6, 20, 5, 3
SITES = [
    f"model.language_model.{part}.layers.{i}.{attn}.{proj}"
    for part, attns in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn")))
    for i in range(LAYERS)
    for attn in attns
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
]


def recipe(i: int) -> dict:
    """Expert i's peft LoRA config: the library's mix of ranks, alphas, rsLoRA and target modules."""
    r = (16, 8)[i % 2]
    targets = ["q_proj", "v_proj"] if i % 4 == 3 else ["q_proj", "k_proj", "v_proj", "out_proj"]
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": "florence-community/Florence-2-base",
        "r": r,
        "lora_alpha": (32, 16, 8)[i % 3],
        "use_rslora": i % 3 == 2,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": None,
    }


def write_experts(folder: Path, n: int) -> float:
    """n adapter folders (expert 0 the target) under folder, those missing written; the seconds it took."""
    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    for i in range(n):
        out = folder / f"e{i:04d}"
        if (out / "adapter_model.safetensors").is_file():
            continue
        config = recipe(i)
        fam = torch.Generator().manual_seed(10_000 + i % FAMILIES)  # the family's shared direction
        own = torch.Generator().manual_seed(i)
        tensors = {}
        for site in SITES:
            a = torch.randn(R, D, generator=fam) / D**0.5
            b = torch.randn(D, R, generator=fam) * 0.01
            if site.rsplit(".", 1)[1] not in config["target_modules"]:  # drawn all the same: the family's
                continue
            r = config["r"]
            key = f"base_model.model.{site}"
            tensors[f"{key}.lora_A.weight"] = (a + 0.7 * torch.randn(R, D, generator=own) / D**0.5)[
                :r
            ].contiguous()
            tensors[f"{key}.lora_B.weight"] = (b + 0.007 * torch.randn(D, R, generator=own))[
                :, :r
            ].contiguous()
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return time.time() - t0


def child(folder: Path, n: int) -> dict:
    import torch

    from common.methods import top_k_similar
    from common.similarity import (
        prototype_similarity,
        prototypes_of,
        similarity_row,
        update_similarity,
        weights_of,
    )

    torch.set_num_threads(1)
    names = [f"e{i:04d}" for i in range(n)]
    cache = folder / "embeddings"  # where embed_tasks.py caches prototypes (runs/<profile>/embeddings/)
    cache.mkdir(exist_ok=True)
    out = {"n": n}
    t0 = time.time()
    for m in names:  # computed once per file: later runs read the cache (as every target after the first)
        prototypes_of(folder / m, "lora", cache)
    out["prototypes_first_s"] = time.time() - t0
    for label, embed, sim in (
        ("weights", lambda m: weights_of(folder / m, "lora"), update_similarity),
        ("prototypes", lambda m: prototypes_of(folder / m, "lora", cache), prototype_similarity),
    ):
        times = []
        for _ in range(REPEATS):  # the fastest of a few: the machine's noise only ever adds
            t0 = time.time()
            row = similarity_row((embed(m) for m in names), sim)  # streamed: two experts held at a time
            top = top_k_similar(names, row, K)
            times.append(time.time() - t0)
        out[f"{label}_retrieval_s"] = min(times)
        out[f"{label}_family_hits"] = sum(int(m[1:]) % FAMILIES == 0 for m in top) / K
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/retrieval_library"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return print(json.dumps(child(args.dir, args.child)))
    wrote = write_experts(args.dir, max(args.sizes))
    print(
        f"{max(args.sizes)} peft LoRA folders (r 16 / 8, rsLoRA on every third, 72 or 36 sites, d {D}, fp32) "
        f"under {args.dir}: written in {wrote:.0f}s"
    )
    rows = {}
    for n in args.sizes:
        p = subprocess.run(
            [sys.executable, __file__, "--dir", str(args.dir), "--child", str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows[n] = r = json.loads(p.stdout.strip().splitlines()[-1])
        print(
            f"N={n:5d}: retrieval weights {r['weights_retrieval_s']:6.2f}s (top-{K} in family "
            f"{r['weights_family_hits']:.1f}), prototypes {r['prototypes_retrieval_s']:6.2f}s "
            f"({r['prototypes_family_hits']:.1f}; computed once {r['prototypes_first_s']:6.1f}s) | peak RSS "
            f"{r['peak_rss_mb']:.0f} MB"
        )
    if 100 in rows and 1000 in rows:
        for label in ("weights", "prototypes"):
            s = rows[1000][f"{label}_retrieval_s"]
            print(f"{label}: top-{K} among 1000 in {s:.2f}s (target < 10 s)")
        ratio = rows[1000]["peak_rss_mb"] / rows[100]["peak_rss_mb"]
        print(f"peak RSS N=1000 / N=100 = {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
