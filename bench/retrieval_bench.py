"""Retrieval at library scale: N synthetic LoRA experts at Florence-2-base shapes, the target's top-k by the
`weights` embedding (update cosine from the factors) and by `prototypes`, loading and retrieval timed apart.

    python bench/retrieval_bench.py                       # N = 10, 100, 1000 (about 7 GB of expert files)
    python bench/retrieval_bench.py --sizes 10 100 --dir /tmp/experts

Experts: r 16 on q, k, v, out of every attention of Florence-2-base's language model (6 encoder layers with
self-attention, 6 decoder layers with self- and cross-attention: 72 sites, d 768), fp32 peft files
(adapter_model.safetensors, 7 MB each), drawn in 20 families (a family's experts share a direction, so the
top-k has something to find; printed: the share of the top-k in the target's family). Each N runs in its own
process, so its peak resident memory is its own. Printed per N: writing the files (once, kept under --dir),
loading them into embeddings (read + LowRank factors + norms, or + each site's prototype, and the prototypes
read back from their per-expert cache files, as embed_tasks.py does after the first time), retrieval (the
target's row and top-k; no N x N matrix, no d x d product; the fastest of 3) and the peak RSS; then the
retrieval time ratios from N = 100 to N = 1000.
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
    f"base_model.model.model.language_model.{part}.layers.{i}.{attn}.{proj}"
    for part, attns in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn")))
    for i in range(LAYERS)
    for attn in attns
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
]


def write_experts(folder: Path, n: int) -> float:
    """n experts (expert 0 the target) under folder, those missing written; returns the seconds it took."""
    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"e{i:04d}.safetensors"
        if path.is_file():
            continue
        fam = torch.Generator().manual_seed(10_000 + i % FAMILIES)  # the family's shared direction
        own = torch.Generator().manual_seed(i)
        tensors = {}
        for site in SITES:
            a = torch.randn(R, D, generator=fam) / D**0.5
            b = torch.randn(D, R, generator=fam) * 0.01
            tensors[f"{site}.lora_A.weight"] = (
                a + 0.7 * torch.randn(R, D, generator=own) / D**0.5
            ).contiguous()
            tensors[f"{site}.lora_B.weight"] = (b + 0.007 * torch.randn(D, R, generator=own)).contiguous()
        save_file(tensors, str(path))
    return time.time() - t0


def child(folder: Path, n: int) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from common.methods import top_k_similar
    from common.similarity import (
        prototype_similarity,
        prototypes,
        similarity_row,
        update_embedding,
        update_similarity,
    )

    torch.set_num_threads(1)
    names = [f"e{i:04d}" for i in range(n)]
    t0 = time.time()
    updates = [update_embedding(load_file(str(folder / f"{m}.safetensors")), "lora") for m in names]
    t_load = time.time() - t0
    t0 = time.time()
    protos = [prototypes(u) for u in updates]
    t_proto = time.time() - t0
    cache = folder / "prototypes"  # what embed_tasks.py caches per expert (similarity.prototype_embedding)
    cache.mkdir(exist_ok=True)
    for m, p in zip(names, protos):
        if not (cache / f"{m}.safetensors").is_file():
            save_file(p, str(cache / f"{m}.safetensors"))
    t0 = time.time()
    cached = [load_file(str(cache / f"{m}.safetensors")) for m in names]
    t_cached = time.time() - t0
    assert all(torch.equal(c[k], p[k]) for c, p in zip(cached, protos) for k in p)
    out = {"n": n, "load_s": t_load, "prototypes_s": t_proto, "cached_prototypes_s": t_cached}
    for label, embs, sim in (
        ("weights", updates, update_similarity),
        ("prototypes", protos, prototype_similarity),
    ):
        times = []
        for _ in range(REPEATS):  # the fastest of a few: the machine's noise only ever adds
            t0 = time.time()
            top = top_k_similar(names, similarity_row(embs, sim), K)  # as embed_tasks.py computes it
            times.append(time.time() - t0)
        out[f"{label}_retrieval_s"] = min(times)
        out[f"{label}_family_hits"] = sum(int(m[1:]) % FAMILIES == 0 for m in top) / K
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/retrieval_bench"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return print(json.dumps(child(args.dir, args.child)))
    wrote = write_experts(args.dir, max(args.sizes))
    print(
        f"{max(args.sizes)} experts x {len(SITES)} sites (r {R}, d {D}, fp32) under {args.dir}: "
        f"written in {wrote:.0f}s"
    )
    rows = {}
    for n in args.sizes:
        p = subprocess.run(
            [sys.executable, __file__, "--dir", str(args.dir), "--child", str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows[n] = json.loads(p.stdout.strip().splitlines()[-1])
        r = rows[n]
        print(
            f"N={n:5d}: load {r['load_s']:7.2f}s, prototypes {r['prototypes_s']:6.2f}s (from the cache "
            f"{r['cached_prototypes_s']:5.2f}s) | retrieval weights {r['weights_retrieval_s']:6.3f}s "
            f"(top-{K} in family {r['weights_family_hits']:.1f}), prototypes "
            f"{r['prototypes_retrieval_s']:6.3f}s ({r['prototypes_family_hits']:.1f}) | peak RSS "
            f"{r['peak_rss_mb']:.0f} MB"
        )
    if 100 in rows and 1000 in rows:
        for label in ("weights", "prototypes"):
            ratio = rows[1000][f"{label}_retrieval_s"] / rows[100][f"{label}_retrieval_s"]
            print(
                f"{label}: retrieval N=1000 / N=100 = {ratio:.1f}x (target <= 11x); "
                f"N=1000 in {rows[1000][f'{label}_retrieval_s']:.2f}s (target < 10 s)"
            )


if __name__ == "__main__":
    main()
