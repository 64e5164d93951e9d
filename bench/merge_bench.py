"""Forward+backward time of one π-Tuning merge step: naive per-tensor loop vs torch._foreach vs the
fused op (common.merge.ExpertStack), with achieved GB/s next to a plain copy of the same bytes.

    .venv/bin/python bench/merge_bench.py [--device cpu|cuda] [--reps 10] [--profiles ...] [--threads N]
        [--blocked]

Every step merges K experts with per-group softmax weights and backpropagates a fixed random
gradient on every merged tensor into the logits and the (trainable) experts. The gradients reach
autograd as a model's backward hands them over: in each merged tensor's own layout, as tensors
autograd owns (see Feed, own_layout); the values are the same for every method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.merge import ExpertStack  # noqa: E402


# ---------------------------------------------------------------------------- shapes
def bart_lora(d: int, enc: int, dec: int, r: int) -> dict[str, tuple]:
    """peft LoRA tensors on q,k,v,out_proj of every attention (decoder: self + cross)."""
    shapes = {}
    attns = [f"model.encoder.layers.{i}.self_attn" for i in range(enc)]
    attns += [f"model.decoder.layers.{i}.{a}" for i in range(dec) for a in ("self_attn", "encoder_attn")]
    for attn in attns:
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{attn}.{m}.lora_A.weight"] = (r, d)
            shapes[f"{attn}.{m}.lora_B.weight"] = (d, r)
    return shapes


def bart_adapters(d: int, enc: int, dec: int, dim: int) -> dict[str, tuple]:
    """Houlsby bottleneck adapters, two per layer (after attention, after the FFN)."""
    shapes = {}
    layers = [f"model.encoder.layers.{i}" for i in range(enc)] + [
        f"model.decoder.layers.{i}" for i in range(dec)
    ]
    for layer in layers:
        for j in (0, 1):
            a = f"{layer}.adapter{j}"
            shapes |= {
                f"{a}.down.weight": (dim, d),
                f"{a}.down.bias": (dim,),
                f"{a}.up.weight": (d, dim),
                f"{a}.up.bias": (d,),
            }
    return shapes


PROFILES = {  # name: (shapes, merges to run)
    "mini-lora": (bart_lora(128, 2, 2, 8), ("sum", "lowrank")),
    "florence-lora": (bart_lora(768, 6, 6, 16), ("sum", "lowrank")),
    "florence-adapter": (bart_adapters(768, 6, 6, 128), ("sum",)),
}
GROUPS = {
    "site": lambda n: n.rsplit(".lora_", 1)[0] if ".lora_" in n else n.rsplit(".", 2)[0],
    "tensor": lambda n: n,
    "global": lambda n: "all",
}


# ---------------------------------------------------------------------------- the three methods
def naive_step(experts, logits, row_of, merge):
    p = torch.softmax(logits, -1)
    if merge == "sum":
        return {n: sum(p[row_of[n]][k] * e[n] for k, e in enumerate(experts)) for n in experts[0]}
    out = {}
    for n in experts[0]:
        if "lora_A" in n:
            out[n] = torch.cat([e[n] for e in experts], dim=0)
        else:
            out[n] = torch.cat([p[row_of[n]][k] * e[n] for k, e in enumerate(experts)], dim=1)
    return out


def foreach_step(experts, logits, rows, merge):
    """rows: LongTensor [P] giving each tensor's logits row. One foreach kernel per expert."""
    names = list(experts[0])
    w = torch.softmax(logits, -1)[rows]  # [P, K]
    if merge == "sum":
        total = torch._foreach_mul([experts[0][n] for n in names], list(w[:, 0].unbind()))
        for k in range(1, len(experts)):
            total = torch._foreach_add(
                total, torch._foreach_mul([experts[k][n] for n in names], list(w[:, k].unbind()))
            )
        return dict(zip(names, total))
    b_names = [n for n in names if "lora_B" in n]
    b_idx = [names.index(n) for n in b_names]
    scaled = [
        torch._foreach_mul([e[n] for n in b_names], list(w[b_idx, k].unbind())) for k, e in enumerate(experts)
    ]
    out = {n: torch.cat([e[n] for e in experts], dim=0) for n in names if "lora_A" in n}
    out |= {n: torch.cat([s[i] for s in scaled], dim=1) for i, n in enumerate(b_names)}
    return {n: out[n] for n in names}


# ---------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fns: dict, reps, device, blocked=False, warmup=2):
    """Median wall time of each fn. By default the fns take turns every rep, so that load from other
    processes hits all alike and each finds caches and allocator as the others left them (as in
    training, where the model runs between merges); blocked=True runs each fn's reps back to back."""
    order = [[name] * reps for name in fns] if blocked else [list(fns)] * reps
    times = {name: [] for name in fns}
    for names in order:
        for name in names:
            if len(times[name]) == 0:
                for _ in range(warmup):
                    fns[name]()
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def ideal_bytes(shapes, K, merge, elem):
    """Minimal traffic of the fused step. sum: fwd reads K*N, writes N; bwd reads N grads and K*N
    stack, writes K*N grads. lowrank: B as sum with one row per block (5 passes over K*N_B); A moves
    nothing (A_cat is stored as is, and its gradient becomes the parameter's .grad)."""
    if merge == "sum":
        n = sum(torch.Size(s).numel() for s in shapes.values())
        return (3 * K + 2) * n * elem
    return 5 * K * sum(torch.Size(s).numel() for n, s in shapes.items() if "lora_B" in n) * elem


class Feed(torch.autograd.Function):
    """Stands in for the model's backward: hands autograd the fixed gradients of the merged tensors
    as tensors it owns (aliases, no copy), as F.linear does with its fresh weight gradients, so that
    AccumulateGrad may keep one as a leaf's .grad without copying it. (torch.autograd.backward(outs,
    grads) makes AccumulateGrad copy a gradient that lands on a leaf, since the caller holds it.)"""

    @staticmethod
    def forward(ctx, grads, *outs):
        ctx.grads = grads
        return outs[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return (None, *(g.detach() for g in ctx.grads))


def own_layout(out: dict, values: dict) -> list:
    """values[n] laid out like out[n] (its strides): the layout in which F.linear / peft LoRA return a
    weight's gradient (checked with a peft forward/backward through functional_call)."""
    return [
        torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(values[n])
        for n, t in out.items()
    ]


def bench_case(shapes, K, merge, groups, device, dtype, reps, blocked=False):
    gen = torch.Generator().manual_seed(0)
    experts = [
        {n: torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for n, s in shapes.items()}
        for _ in range(K)
    ]
    group_of = GROUPS[groups]
    stack = ExpertStack([{n: t.detach() for n, t in e.items()} for e in experts], group_of, merge=merge).to(
        device
    )
    row_of = {n: stack.group_names.index(group_of(n)) for n in shapes}
    rows = torch.tensor([row_of[n] for n in shapes], device=device)
    logits = torch.zeros(len(stack.group_names), K, device=device, requires_grad=True)
    out_shapes = {n: t.shape for n, t in naive_step(experts, logits, row_of, merge).items()}
    values = {n: torch.randn(s, generator=gen).to(device, dtype) for n, s in out_shapes.items()}
    leaves = [logits, *stack.parameters()] + [t for e in experts for t in e.values()]

    def step(merge):
        grads = own_layout(merge(), values)  # same values for every method, each in its outputs' layout

        def run():
            for t in leaves:
                t.grad = None
            out = merge()
            Feed.apply(grads, *out.values()).backward()

        return run

    nbytes = ideal_bytes(shapes, K, merge, torch.empty(0, dtype=dtype).element_size())
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)  # copy reads + writes = nbytes
    dst = torch.empty_like(src)
    t = median_ms(
        {
            "naive": step(lambda: naive_step(experts, logits, row_of, merge)),
            "foreach": step(lambda: foreach_step(experts, logits, rows, merge)),
            "fused": step(lambda: stack(logits)),
            "copy": lambda: dst.copy_(src),
        },
        reps,
        device,
        blocked,
    )
    t["bytes"] = nbytes
    t["groups"] = len(stack.group_names)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=10, help="timed runs per case (median; at least 5)")
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--experts", nargs="+", type=int, default=[2, 3, 5])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--blocked", action="store_true", help="time each method's reps back to back (warm caches)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = max(args.reps, 5)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    cases = [(p, merge, K, "site") for p in args.profiles for merge in PROFILES[p][1] for K in args.experts]
    if "florence-lora" in args.profiles:  # the CPU path loops over groups: show it at many / one group
        cases += [("florence-lora", "sum", 3, "tensor"), ("florence-lora", "sum", 3, "global")]

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (
            f"cpu ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), "
            f"{torch.get_num_threads()} threads"
        )
    )
    print(
        f"device {where}, {args.dtype}, torch {torch.__version__}; median of {reps} fwd+bwd steps "
        f"({'each method back to back' if args.blocked else 'methods taking turns'}); "
        "x = speed-up over naive; GB/s = minimal bytes of the fused step / time"
    )
    head = (
        f"{'profile':<17} {'merge':<7} {'K':>1} {'groups':>10} {'MB':>5} {'naive ms':>8} {'foreach ms':>14} "
        f"{'fused ms':>13} {'fused GB/s':>10} {'copy GB/s':>9}"
    )
    print(head)
    print("-" * len(head))
    for prof, merge, K, groups in cases:
        t = bench_case(PROFILES[prof][0], K, merge, groups, device, dtype, reps, args.blocked)
        # B023: both are called in this iteration only, with its t
        gbs = lambda ms: t["bytes"] / ms / 1e6  # noqa: E731, B023
        ratio = lambda m: f"{t[m]:.2f} ({t['naive'] / t[m]:.1f}x)"  # noqa: E731, B023
        print(
            f"{prof:<17} {merge:<7} {K:>1} {groups + ':' + str(t['groups']):>10} {t['bytes'] / 1e6:>5.0f} "
            f"{t['naive']:>8.2f} {ratio('foreach'):>14} {ratio('fused'):>13} {gbs(t['fused']):>10.1f} "
            f"{gbs(t['copy']):>9.1f}"
        )


if __name__ == "__main__":
    main()
