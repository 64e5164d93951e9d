"""common.merge: the fused expert interpolation against a plain per-tensor loop."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from common.merge import ExpertStack, weighted_merge

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# a mix of odd sizes: 1-element, vectors, matrices; more than one Triton block in total
SHAPES = {
    "enc.0.q.weight": (16, 24),
    "enc.0.q.bias": (16,),
    "enc.0.k.weight": (7, 5),
    "enc.1.q.weight": (33, 40),
    "enc.1.scale": (1,),
    "dec.0.v.weight": (24, 3),
    "dec.0.v.bias": (24,),
    "dec.1.o.weight": (9, 11, 2),
}
GROUPINGS = {
    "global": lambda n: "all",
    "per_tensor": lambda n: n,
    "mixed": lambda n: n.split(".")[0] if n.startswith("enc") else n,  # per stack / per tensor
    "interleaved": lambda n: n.rsplit(".", 1)[1],  # weight / bias / scale: members not adjacent
}


def make_experts(shapes, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()} for _ in range(K)]


def naive_merge(experts, probs_of):
    """Reference: per tensor, sum_k p_k * expert_k (probs_of(name) -> [K] probabilities)."""
    return {n: sum(probs_of(n)[k] * e[n] for k, e in enumerate(experts)) for n in experts[0]}


def naive_lora_merge(experts, probs_of):
    """Reference rank-K*r LoRA: A_cat = [A_1; ...; A_K], B_cat = [p_1 B_1, ..., p_K B_K]."""
    out = {}
    for n in experts[0]:
        p = probs_of(n)
        if "lora_A" in n:
            out[n] = torch.cat([e[n] for e in experts], dim=0)
        else:
            out[n] = torch.cat([p[k] * e[n] for k, e in enumerate(experts)], dim=1)
    return out


def rel(a, b):
    """Norm-wise relative error of a against reference b (0 when both are zero)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def term_sizes(merge, experts, probs, row_of, grads):
    """The naive merge redone on |experts|, |p| and |grads|: the size of the terms that the real sums
    add. Errors are measured against these because an fp32 sum whose terms cancel has a large plain
    relative error (the naive loop's as much as ours). Returns (output sizes, logit-grad sizes p*|dL/dp|)."""
    p = probs.detach().abs().requires_grad_()
    out = merge([{n: t.detach().abs() for n, t in e.items()} for e in experts], lambda n: p[row_of(n)])
    used = [n for n in out if out[n].requires_grad]  # LoRA A_cat does not depend on p
    torch.autograd.backward([out[n] for n in used], [grads[n].abs() for n in used])
    return flat(out), p.detach() * p.grad


def reference(stack, experts, logits, naive, group_of):
    """The same merge by the naive loop on cloned leaves: (ref experts, ref logits, probs, row_of, merged)."""
    ref_experts = [{n: x.clone().requires_grad_() for n, x in e.items()} for e in experts]
    ref_logits = logits.detach().clone().requires_grad_()
    ref_probs = torch.softmax(ref_logits, -1)
    row = {g: i for i, g in enumerate(stack.group_names)}
    row_of = lambda n: row[group_of(n)]  # noqa: E731
    return ref_experts, ref_logits, ref_probs, row_of, naive(ref_experts, lambda n: ref_probs[row_of(n)])


def err(a, b, scale):
    """||a - b|| / ||scale||."""
    return ((a.double() - b.double()).norm() / scale.double().norm()).item()


def lora_experts(
    K, sites=(("enc.0.q", 12, 20), ("enc.0.v", 12, 20), ("dec.0.q", 9, 30)), r=4, dtype=torch.float32, seed=0
):
    """peft-style LoRA state dicts: `<site>.lora_A.weight` [r, d_in], `<site>.lora_B.weight` [d_out, r]."""
    shapes = {}
    for site, d_in, d_out in sites:
        shapes[f"{site}.lora_A.weight"] = (r, d_in)
        shapes[f"{site}.lora_B.weight"] = (d_out, r)
    return make_experts(shapes, K, dtype, seed)


def site_of(n):
    return n.rsplit(".lora_", 1)[0]


# ------------------------------------------------------------------------------ merge="sum"
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("K", [1, 3])
def test_sum_matches_naive_forward_and_grads(grouping, K):
    torch.manual_seed(K)
    group_of = GROUPINGS[grouping]
    experts = make_experts(SHAPES, K)
    stack = ExpertStack(experts, group_of, merge="sum")
    logits = torch.randn(len(stack.group_names), K, requires_grad=True)
    out = stack(logits)

    ref_experts, ref_logits, ref_probs, row_of, ref = reference(stack, experts, logits, naive_merge, group_of)
    grads = {n: torch.randn(s) for n, s in SHAPES.items()}
    out_size, logit_size = term_sizes(naive_merge, experts, ref_probs, row_of, grads)

    assert list(out) == list(SHAPES)
    assert all(out[n].shape == SHAPES[n] for n in SHAPES)
    assert err(flat(out), flat(ref), out_size) <= 1e-6

    torch.autograd.backward([out[n] for n in SHAPES], [grads[n] for n in SHAPES])
    torch.autograd.backward([ref[n] for n in SHAPES], [grads[n] for n in SHAPES])
    assert err(logits.grad, ref_logits.grad, logit_size) <= 1e-6
    # pack the reference expert grads with the same layout to compare with the stack's grad
    ref_stack_grad = ExpertStack(
        [{n: t.grad for n, t in e.items()} for e in ref_experts], group_of, trainable=False
    ).stack
    assert rel(stack.stack.grad, ref_stack_grad) <= 1e-6


def test_sum_outputs_are_views_of_one_buffer():
    torch.manual_seed(0)
    stack = ExpertStack(make_experts(SHAPES, 3), GROUPINGS["mixed"])
    out = stack(torch.randn(len(stack.group_names), 3))
    bases = {t._base.data_ptr() for t in out.values()}
    assert len(bases) == 1 and all(t._is_view() for t in out.values())
    assert len({t.untyped_storage().data_ptr() for t in out.values()}) == 1
    total = sum(t.numel() for t in out.values())
    assert next(iter(out.values()))._base.numel() == total  # the buffer holds exactly the outputs


def test_groups_are_packed_contiguously_in_first_appearance_order():
    group_of = GROUPINGS["interleaved"]
    experts = make_experts(SHAPES, 2)
    stack = ExpertStack(experts, group_of)
    assert stack.group_names == ["weight", "bias", "scale"]
    for g, name in enumerate(stack.group_names):
        s, e = stack.segments[g].item(), stack.segments[g + 1].item()
        for k, expert in enumerate(experts):
            members = torch.cat([t.reshape(-1) for n, t in expert.items() if group_of(n) == name])
            assert torch.equal(stack.stack[k, s:e], members)


def test_frozen_experts_are_buffers_and_logits_still_learn():
    torch.manual_seed(0)
    stack = ExpertStack(make_experts(SHAPES, 2), GROUPINGS["per_tensor"], trainable=False)
    assert list(stack.parameters()) == [] and "stack" in dict(stack.named_buffers())
    logits = torch.zeros(len(stack.group_names), 2, requires_grad=True)
    sum(t.square().sum() for t in stack(logits).values()).backward()
    assert logits.grad.abs().sum() > 0
    assert ExpertStack(make_experts(SHAPES, 2), GROUPINGS["global"]).stack.requires_grad


def test_unused_outputs_get_zero_grad():
    torch.manual_seed(0)
    experts = make_experts(SHAPES, 2)
    stack = ExpertStack(experts, GROUPINGS["per_tensor"])
    logits = torch.randn(len(stack.group_names), 2, requires_grad=True)
    stack(logits)["enc.1.q.weight"].sum().backward()
    assert logits.grad[stack.group_names.index("enc.1.q.weight")].abs().sum() > 0
    others = [i for i, g in enumerate(stack.group_names) if g != "enc.1.q.weight"]
    assert logits.grad[others].abs().sum() == 0


def test_weighted_merge_flat_with_empty_and_tiny_groups():
    torch.manual_seed(0)
    sizes = [1, 0, 5, 3000, 2, 0, 700]
    K, N = 4, sum(sizes)
    seg = torch.tensor([0] + sizes).cumsum(0)
    stack, logits = torch.randn(K, N), torch.randn(len(sizes), K)
    out = weighted_merge(stack, logits, seg)
    p = torch.softmax(logits, -1).repeat_interleave(torch.tensor(sizes), dim=0)  # [N, K]
    assert rel(out, (p.t() * stack).sum(0)) <= 1e-6
    with pytest.raises(ValueError):
        weighted_merge(stack, logits, seg.flip(0))
    with pytest.raises(ValueError):
        weighted_merge(stack, logits[:-1], seg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_grad_mv_and_bmm_paths_agree(monkeypatch, dtype):
    """The CPU logit gradient takes one mv per group for long groups and one bmm for runs of short ones."""
    from common import merge

    torch.manual_seed(0)
    sizes = [5000, 5000, 3, 3, 3, 2500, 1]
    seg = torch.tensor([0] + sizes).cumsum(0)
    stack, go = torch.randn(3, sum(sizes), dtype=dtype), torch.randn(sum(sizes), dtype=dtype)
    logits = torch.randn(len(sizes), 3)
    grads = []
    for mv_min in (1, 2048, 10**9):  # all mv / mixed / all bmm
        monkeypatch.setattr(merge, "MV_MIN", mv_min)
        s, lg = stack.clone().requires_grad_(), logits.clone().requires_grad_()
        weighted_merge(s, lg, seg).backward(go)
        grads.append((lg.grad, s.grad))
    s64, l64 = stack.double().requires_grad_(), logits.double().requires_grad_()
    p = torch.softmax(l64, -1).repeat_interleave(torch.tensor(sizes), dim=0)  # [N, K]
    ((p.t() * s64).sum(0) * go.double()).sum().backward()
    gp_abs = torch.stack(
        [s64.detach()[:, a:b].abs() @ go.double()[a:b].abs() for a, b in zip(seg[:-1], seg[1:])]
    )
    for lg_grad, s_grad in grads:
        assert err(lg_grad, l64.grad, torch.softmax(l64.detach(), -1) * gp_abs) <= 1e-6
        assert rel(s_grad, s64.grad) <= 1e-6


def test_gradcheck_float64():
    torch.manual_seed(0)
    sizes = [3, 0, 1, 7, 4]
    seg = torch.tensor([0] + sizes).cumsum(0)
    stack = torch.randn(3, sum(sizes), dtype=torch.float64, requires_grad=True)
    logits = torch.randn(len(sizes), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, w: weighted_merge(s, w, seg), (stack, logits))

    # the whole module (packing, softmax, views) for both kinds
    small = {"a.w": (2, 3), "a.b": (2,), "b.w": (3, 1)}
    for es in (
        ExpertStack(make_experts(small, 3, torch.float64), GROUPINGS["mixed"]),
        ExpertStack(
            lora_experts(3, sites=(("x", 3, 2), ("y", 2, 3)), r=2, dtype=torch.float64),
            site_of,
            merge="lowrank",
        ),
    ):
        names = [n for n, _ in es.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_() for _, p in es.named_parameters())
        lg = torch.randn(len(es.group_names), 3, dtype=torch.float64, requires_grad=True)

        def f(lg, *ps):  # B023: called in this iteration only, with its es and names
            return tuple(functional_call(es, dict(zip(names, ps)), (lg,)).values())  # noqa: B023

        assert torch.autograd.gradcheck(f, (lg, *params))


def test_bf16_accumulates_in_fp32():
    torch.manual_seed(0)
    K, sizes = 5, torch.tensor([4096, 1000, 3])
    seg = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    stack = (torch.randn(K, int(seg[-1])) * 3).bfloat16().requires_grad_()
    logits = torch.randn(len(sizes), K, requires_grad=True)
    out = weighted_merge(stack, logits, seg)
    assert out.dtype == torch.bfloat16

    # float64 reference on the same bf16 values
    def merge64(stack, probs):  # float64 reference on the same bf16 values
        return (probs.repeat_interleave(sizes, dim=0).t() * stack).sum(0)

    s64, l64 = stack.detach().double().requires_grad_(), logits.detach().double().requires_grad_()
    ref = merge64(s64, torch.softmax(l64, -1))
    # one rounding of an fp32 sum gives the correctly rounded value but for rare near-ties;
    # bf16 partial sums would miss it in a large fraction of the elements
    mismatch = (out != ref.to(torch.bfloat16)).float().mean().item()
    assert mismatch < 1e-2, mismatch

    go = torch.randn(len(out)).bfloat16()
    out.backward(go)
    ref.backward(go.double())
    assert stack.grad.dtype == torch.bfloat16 and logits.grad.dtype == torch.float32
    torch.testing.assert_close(stack.grad.double(), s64.grad, rtol=2**-8, atol=0)  # within 1 bf16 ulp
    p_abs = torch.softmax(l64, -1).detach().requires_grad_()
    merge64(s64.detach().abs(), p_abs).backward(go.double().abs())
    logit_size = p_abs.detach() * p_abs.grad  # the size of the summed terms (see term_sizes)
    assert err(logits.grad, l64.grad, logit_size) <= 1e-6  # bf16 sums of 4096 terms would be ~1e-3 off


# ------------------------------------------------------------------------------ merge="lowrank"
@pytest.mark.parametrize("grouping", ["global", "per_site"])
def test_lora_update_equals_sum_of_expert_updates(grouping):
    torch.manual_seed(0)
    K, r = 3, 4
    experts = lora_experts(K, r=r)
    group_of = site_of if grouping == "per_site" else (lambda n: "all")
    stack = ExpertStack(experts, group_of, merge="lowrank")
    logits = torch.randn(len(stack.group_names), K, requires_grad=True)
    out = stack(logits)
    assert list(out) == list(experts[0])
    row = {g: i for i, g in enumerate(stack.group_names)}
    for n in out:
        if "lora_A" not in n:
            continue
        b = n.replace("lora_A", "lora_B")
        A_cat, B_cat = out[n], out[b]
        assert A_cat.shape == (K * r, experts[0][n].shape[1]) and B_cat.shape == (
            experts[0][b].shape[0],
            K * r,
        )
        p = torch.softmax(logits[row[group_of(n)]], -1)
        update = sum(p[k] * e[b] @ e[n] for k, e in enumerate(experts))
        assert rel(B_cat @ A_cat, update) <= 1e-6

    # views: A_cat are views of the packed A stack (no copy), all B_cat of one merged buffer
    a_ptr = stack.lora_A_stack.untyped_storage().data_ptr()
    assert all(
        out[n].untyped_storage().data_ptr() == a_ptr and out[n].is_contiguous() for n in out if "lora_A" in n
    )
    b_bufs = {out[n].untyped_storage().data_ptr() for n in out if "lora_B" in n}
    assert len(b_bufs) == 1 and b_bufs != {a_ptr}
    assert all(out[n].t().is_contiguous() for n in out if "lora_B" in n)


def a_grad(stack):
    """The A gradient of a trainable LoRA stack, flat in the packed order (one leaf per site)."""
    return torch.cat([p.grad.reshape(-1) for p in stack.lora_A])


@pytest.mark.parametrize("layout", ["own", "contiguous"])
def test_lora_grads_match_naive(layout):
    """Gradients as F.linear hands them over (each merged tensor's own layout; B_cat's is transposed)
    and, slower but equal, contiguous ones."""
    torch.manual_seed(0)
    K = 3
    experts = lora_experts(K)
    stack = ExpertStack(experts, site_of, merge="lowrank")
    logits = torch.randn(len(stack.group_names), K, requires_grad=True)
    out = stack(logits)
    ref_experts, ref_logits, ref_probs, row_of, ref = reference(
        stack, experts, logits, naive_lora_merge, site_of
    )
    grads = {n: torch.randn(t.shape) for n, t in ref.items()}
    if layout == "own":
        grads = {n: torch.empty_strided(t.shape, t.stride()).copy_(grads[n]) for n, t in out.items()}
        assert not grads[next(n for n in out if "lora_B" in n)].is_contiguous()
    _, logit_size = term_sizes(naive_lora_merge, experts, ref_probs, row_of, grads)
    torch.autograd.backward(list(out.values()), [grads[n] for n in out])
    torch.autograd.backward(list(ref.values()), [grads[n] for n in out])
    assert rel(flat(out), flat(ref)) <= 1e-6  # no sums here: concatenation and scaling
    assert err(logits.grad, ref_logits.grad, logit_size) <= 1e-6
    ref_pack = ExpertStack(
        [{n: t.grad for n, t in e.items()} for e in ref_experts], site_of, merge="lowrank", trainable=False
    )
    assert rel(a_grad(stack), ref_pack.lora_A_stack) <= 1e-6
    assert rel(stack.lora_B_stack.grad, ref_pack.lora_B_stack) <= 1e-6


def test_lora_A_leaves_share_one_buffer():
    """Trainable: each site's A_cat is its own leaf parameter, a view of the packed A buffer, returned as
    is; parameters() holds them and the B stack; conversions keep them in one buffer."""
    experts = lora_experts(3)
    stack = ExpertStack(experts, site_of, merge="lowrank")
    out = stack(torch.zeros(len(stack.group_names), 3))
    a_names = [n for n in out if "lora_A" in n]
    assert [out[n] for n in a_names] == list(stack.lora_A) and all(p.is_leaf for p in stack.lora_A)
    params = list(stack.parameters())
    assert len(params) == len(a_names) + 1 and any(p is stack.lora_B_stack for p in params)
    assert "lora_A_stack" not in dict(stack.named_parameters()) | dict(stack.named_buffers())
    # functional_call reaches every leaf
    zeros = {n: torch.zeros_like(p) for n, p in stack.named_parameters()}
    assert all(
        not t.any() for t in functional_call(stack, zeros, (torch.zeros(len(stack.group_names), 3),)).values()
    )

    def linked(es):
        base, offset = es.lora_A_stack, 0
        for p in es.lora_A:
            assert p.dtype == base.dtype and p.data_ptr() == base.data_ptr() + offset * p.element_size()
            offset += p.numel()
        assert offset == base.numel()

    linked(stack)
    ids = [id(p) for p in stack.lora_A]
    stack.double()
    linked(stack)
    assert [id(p) for p in stack.lora_A] == ids  # same Parameter objects (optimizers keep them)
    assert torch.equal(
        stack.lora_A_stack, torch.cat([e[n].double().reshape(-1) for n in a_names for e in experts])
    )

    frozen = ExpertStack(experts, site_of, merge="lowrank", trainable=False)
    assert list(frozen.parameters()) == [] and "lora_A_stack" in dict(frozen.named_buffers())
    grads = []  # frozen experts: the logits get the same gradient
    for es in (frozen, ExpertStack(experts, site_of, merge="lowrank")):
        lg = torch.randn(
            len(es.group_names), 3, generator=torch.Generator().manual_seed(0), requires_grad=True
        )
        sum((t * t.detach().flip(0)).sum() for t in es(lg).values() if t.requires_grad).backward()
        grads.append(lg.grad)
    assert torch.equal(*grads)


def test_lora_A_grad_is_kept_without_copy():
    """Through a real peft LoRA (as interpolate.py runs it), F.linear's gradient for A_cat becomes the
    A leaf's .grad as is, and B_cat's arrives in B_cat's own (transposed) layout."""
    peft = pytest.importorskip("peft")
    K, r = 3, 4
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6))
    model = peft.get_peft_model(base, peft.LoraConfig(r=K * r, lora_alpha=K * 8, target_modules=["0", "2"]))
    sites = [("base_model.model.0", 12, 10), ("base_model.model.2", 10, 6)]
    experts = [
        {
            k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default."): v
            for k, v in e.items()
        }
        for e in lora_experts(K, sites=sites, r=r)
    ]
    stack = ExpertStack(experts, lambda n: n.split(".lora_")[0], merge="lowrank")
    logits = torch.randn(len(stack.group_names), K, requires_grad=True)
    out = stack(logits)
    seen = {}
    for n, t in out.items():
        t.register_hook(lambda g, n=n: seen.__setitem__(n, (g.data_ptr(), g.stride())))
    functional_call(model, out, (torch.randn(2, 5, 12),), strict=False).square().sum().backward()
    for n, t in out.items():
        assert seen[n][1] == t.stride()
        if "lora_A" in n:
            assert t.grad.data_ptr() == seen[n][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_mixed_shapes_match_float64(dtype):
    """Sites of different shapes (separate runs) and bf16 stacks: the CPU backward against float64."""
    sites = (("a", 12, 20), ("b", 12, 20), ("c", 9, 30), ("d", 5, 7), ("e", 5, 7))
    experts = lora_experts(3, sites=sites, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(sites), 3, generator=gen)
    values = None
    results = []
    for dt in (dtype, torch.float64):
        es = ExpertStack([{n: t.to(dt) for n, t in e.items()} for e in experts], site_of, merge="lowrank")
        lg = logits.clone().requires_grad_()
        out = es(lg)
        if values is None:
            values = {n: torch.randn(t.shape, generator=gen).to(dtype) for n, t in out.items()}
        torch.autograd.backward(
            list(out.values()),
            [values[n].to(dt).t().contiguous().t() if "lora_B" in n else values[n].to(dt) for n in out],
        )
        results.append((flat(out), lg.grad, a_grad(es), es.lora_B_stack.grad))
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-6  # bf16: one rounding of an fp32 product
    (o, lg, ga, gb), (o64, lg64, ga64, gb64) = results
    assert o.dtype == gb.dtype == dtype and lg.dtype == torch.float32
    assert rel(o, o64) <= tol and rel(ga, ga64) == 0 and rel(gb, gb64) <= tol
    assert rel(lg, lg64) <= 1e-6  # dots accumulated in fp32 from the same bf16 values


def test_lora_plugs_into_peft_rank_k_r():
    peft = pytest.importorskip("peft")
    K, r, alpha = 3, 4, 8
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6))
    cfg = peft.LoraConfig(r=K * r, lora_alpha=K * alpha, target_modules=["0", "2"], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    sites = [("base_model.model.0", 12, 10), ("base_model.model.2", 10, 6)]
    experts = [
        {
            k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default."): v
            for k, v in e.items()
        }
        for e in lora_experts(K, sites=sites, r=r)
    ]
    stack = ExpertStack(experts, lambda n: n.split(".lora_")[0], merge="lowrank")
    logits = torch.randn(len(stack.group_names), K)
    x = torch.randn(5, 12)
    y = functional_call(model, stack(logits), (x,), strict=False)

    def delta(i, site):  # sum_k p_k * (alpha / r) * B_k A_k
        p = torch.softmax(logits[i], -1)
        return sum(
            p[k] * alpha / r * e[f"{site}.lora_B.default.weight"] @ e[f"{site}.lora_A.default.weight"]
            for k, e in enumerate(experts)
        )

    lin0, lin2 = base[0].base_layer, base[2].base_layer
    h = torch.relu(x @ (lin0.weight + delta(0, sites[0][0])).t() + lin0.bias)
    ref = h @ (lin2.weight + delta(1, sites[1][0])).t() + lin2.bias
    assert rel(y, ref) <= 1e-5


def test_lora_rejects_bad_input():
    experts = lora_experts(2)
    with pytest.raises(ValueError, match="same group"):
        ExpertStack(experts, lambda n: n, merge="lowrank")
    with pytest.raises(ValueError, match="lora_A/lora_B"):
        ExpertStack(make_experts(SHAPES, 2), lambda n: n, merge="lowrank")
    with pytest.raises(ValueError, match="logits"):
        ExpertStack(experts, site_of, merge="lowrank")(torch.zeros(2, 2))


# ------------------------------------------------------------------------------ Triton
TRITON_CHECK = textwrap.dedent("""
    import torch
    from common import merge
    from common.merge import ExpertStack, weighted_merge
    torch.manual_seed(0)

    def run(fn):
        merge._use_triton = lambda t: False
        a = fn()
        merge._use_triton = lambda t: True
        b = fn()
        for x, y in zip(a, b):
            assert x.dtype == y.dtype, (x.dtype, y.dtype)
            err = ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()
            assert err <= (1e-2 if x.dtype == torch.bfloat16 else 1e-6), err

    sizes = [1, 0, 5, 3000, 2, 0, 700, 1, 1, 1, 2048]  # block-straddling, empty, multi-block groups
    seg = torch.tensor([0] + sizes).cumsum(0)
    for K, dtype, stack_grad in [(3, torch.float32, True), (1, torch.float32, True),
                                 (5, torch.float32, False), (2, torch.bfloat16, True),
                                 (3, torch.float64, True)]:
        stack = torch.randn(K, sum(sizes), dtype=dtype)
        logits = torch.randn(len(sizes), K)
        go = torch.randn(sum(sizes), dtype=dtype)
        def fn():
            s, l = stack.clone().requires_grad_(stack_grad), logits.clone().requires_grad_()
            out = weighted_merge(s, l, seg)
            out.backward(go)
            return [out, l.grad] + ([s.grad] if stack_grad else [])
        run(fn)

    experts = [{"s%d.lora_A.weight" % i: torch.randn(4, 30 + i) for i in range(3)} |
               {"s%d.lora_B.weight" % i: torch.randn(40 - i, 4) for i in range(3)} for _ in range(3)]
    def fn():
        es = ExpertStack(experts, lambda n: n.split(".")[0], merge="lowrank")
        logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = es(logits)
        sum((t * t).sum() for t in out.values()).backward()
        return list(out.values()) + [logits.grad, torch.cat([p.grad.reshape(-1) for p in es.lora_A]),
                                     es.lora_B_stack.grad]
    run(fn)
    print("TRITON_OK")
""")


def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    res = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if res.returncode != 0 and "interpret" in res.stderr.lower() and "not supported" in res.stderr.lower():
        pytest.skip(f"Triton interpreter unavailable: {res.stderr[-300:]}")
    assert res.returncode == 0 and "TRITON_OK" in res.stdout, res.stderr[-3000:]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_float64(dtype):
    torch.manual_seed(0)
    sizes = torch.tensor([1, 0, 5, 300000, 2, 700, 1, 65536])  # tiny, empty and many-block groups
    seg = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    K, N = 3, int(seg[-1])
    stack, logits, go = torch.randn(K, N).to(dtype), torch.randn(len(sizes), K), torch.randn(N).to(dtype)
    s, lg = stack.cuda().requires_grad_(), logits.cuda().requires_grad_()
    out = weighted_merge(s, lg, seg.cuda())
    out.backward(go.cuda())
    assert out.dtype == s.grad.dtype == dtype and lg.grad.dtype == torch.float32

    # float64 reference on the same values (CPU path, checked against the naive loop above)
    s64, l64 = stack.double().requires_grad_(), logits.double().requires_grad_()
    ref = weighted_merge(s64, l64, seg)
    ref.backward(go.double())
    out_size = weighted_merge(s64.detach().abs(), l64.detach(), seg)  # see term_sizes
    gp_abs = torch.stack(
        [s64.detach()[:, a:b].abs() @ go.double()[a:b].abs() for a, b in zip(seg[:-1], seg[1:])]
    )
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-6  # bf16: one final rounding
    assert err(out.cpu(), ref, out_size) <= tol
    assert err(s.grad.cpu(), s64.grad, s64.grad) <= tol
    assert err(lg.grad.cpu(), l64.grad, torch.softmax(l64.detach(), -1) * gp_abs) <= 1e-6


@cuda
def test_cuda_expert_stack_lora():
    torch.manual_seed(0)
    experts = lora_experts(3)
    cpu = ExpertStack(experts, site_of, merge="lowrank")
    gpu = ExpertStack(experts, site_of, merge="lowrank").cuda()
    logits = torch.randn(len(cpu.group_names), 3)
    out_c, out_g = cpu(logits), gpu(logits.cuda())
    for n in out_c:
        assert rel(out_g[n].cpu(), out_c[n]) <= 1e-6
    sum(t.sum() for t in out_g.values()).backward()
    sum(t.sum() for t in out_c.values()).backward()
    assert rel(gpu.lora_B_stack.grad.cpu(), cpu.lora_B_stack.grad) <= 1e-6
    assert rel(a_grad(gpu).cpu(), a_grad(cpu)) <= 1e-6 and gpu.lora_A_stack.is_cuda
