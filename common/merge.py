"""Fused softmax-weighted interpolation of K parameter-efficient experts (π-Tuning).

Every training step computes, for each group g of tensors with its own logit row w_g,
    merged = sum_i softmax(w_g)_i * expert_i
forward and backward. A per-tensor Python loop costs K x P tiny kernels per step; here all
experts live in one packed [K, N] stack (each group one contiguous element range) and the merge
is one custom autograd op: one pass over memory forward, one backward, gradients to the logits
(through the softmax) and to the stack. CUDA tensors use Triton kernels; elsewhere a few batched
torch ops per run of equal-length groups (see _torch_fwd / _torch_bwd).

The exact LoRA merge (ExpertStack merge="lowrank") has no K-way sum: per site, A_cat = [A_1; ...; A_K]
and B_cat = [p_1 B_1 ... p_K B_K]. There the experts are still packed once, each of A and B in one
contiguous buffer, but site-major rather than expert-major ([site][K][block] instead of [K][N]):
a site's K blocks A_i then already are its A_cat, so A needs no op at all (each site's A_cat is a
leaf parameter viewing the buffer, and F.linear's gradient becomes its .grad without a copy), and
a site's K blocks B_i^T scaled by p_i are B_cat^T, whose gradient F.linear hands over in exactly
that layout. Only the B scaling is a fused op (_ScaleBlocks).

Public API: `weighted_merge` (flat op) and `ExpertStack` (packs state dicts, returns views).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

BLOCK = 1024  # elements per Triton program


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64 (gradcheck), everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Triton kernels (CUDA; also runnable on CPU tensors with TRITON_INTERPRET=1 set before import)
# --------------------------------------------------------------------------------------------
try:  # guarded: CPU-only installs without triton still get the torch path
    import triton
    import triton.language as tl
except Exception:
    triton = None


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and triton is not None


if triton is not None:

    @triton.jit
    def _group_of(offs, seg_ptr, G, LOG_G: tl.constexpr):
        # Binary search: the g with seg[g] <= n < seg[g+1] (empty groups are skipped naturally).
        lo = tl.zeros_like(offs)
        hi = lo + G
        for _ in tl.static_range(LOG_G):
            mid = (lo + hi) // 2
            go_right = tl.load(seg_ptr + mid) <= offs
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        return lo

    @triton.jit
    def _mix_fwd_kernel(
        stack_ptr, w_ptr, seg_ptr, out_ptr, N, G, K: tl.constexpr, LOG_G: tl.constexpr, BLOCK: tl.constexpr
    ):
        acc_t = w_ptr.dtype.element_ty
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = _group_of(offs, seg_ptr, G, LOG_G)
        x_ptr = stack_ptr + offs  # advanced by N per expert (64-bit pointer, no int32 overflow)
        total = tl.zeros([BLOCK], dtype=acc_t)
        for k in tl.static_range(K):
            w = tl.load(w_ptr + g * K + k, mask=mask, other=0.0)  # [G, K] is tiny: cache hits
            total += w * tl.load(x_ptr, mask=mask, other=0.0).to(acc_t)
            x_ptr += N
        tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mix_bwd_kernel(
        stack_ptr,
        w_ptr,
        seg_ptr,
        gout_ptr,
        gstack_ptr,
        gw_ptr,
        N,
        G,
        K: tl.constexpr,
        LOG_G: tl.constexpr,
        BLOCK: tl.constexpr,
        NEED_STACK: tl.constexpr,
        NEED_W: tl.constexpr,
    ):
        acc_t = w_ptr.dtype.element_ty
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = _group_of(offs, seg_ptr, G, LOG_G)
        gout = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(acc_t)
        # groups touched by this block: usually one, several only at group boundaries
        g_lo = tl.min(tl.where(mask, g, G), axis=0)
        g_hi = tl.max(tl.where(mask, g, -1), axis=0)
        x_ptr = stack_ptr + offs
        gx_ptr = gstack_ptr + offs
        for k in tl.static_range(K):
            if NEED_STACK:  # d out[n] / d stack[k, n] = w[g(n), k]
                w = tl.load(w_ptr + g * K + k, mask=mask, other=0.0)
                tl.store(gx_ptr, (w * gout).to(gstack_ptr.dtype.element_ty), mask=mask)
                gx_ptr += N
            if NEED_W:  # d loss / d w[g, k] = sum over the group's n of stack[k, n] * gout[n]
                prod = tl.load(x_ptr, mask=mask, other=0.0).to(acc_t) * gout
                for gg in range(g_lo, g_hi + 1):
                    tl.atomic_add(gw_ptr + gg * K + k, tl.sum(tl.where(mask & (g == gg), prod, 0.0), axis=0))
                x_ptr += N


def _triton_fwd(stack, weights, segments):
    K, N = stack.shape
    G = weights.shape[0]
    out = torch.empty(N, dtype=stack.dtype, device=stack.device)
    if N:
        _mix_fwd_kernel[(triton.cdiv(N, BLOCK),)](
            stack, weights, segments, out, N, G, K=K, LOG_G=(G - 1).bit_length(), BLOCK=BLOCK
        )
    return out


def _triton_bwd(stack, weights, segments, gout, need_stack, need_w):
    K, N = stack.shape
    G = weights.shape[0]
    gstack = torch.empty_like(stack) if need_stack else None
    gw = torch.zeros_like(weights) if need_w else None
    if N:
        _mix_bwd_kernel[(triton.cdiv(N, BLOCK),)](
            stack,
            weights,
            segments,
            gout,
            stack if gstack is None else gstack,
            weights if gw is None else gw,
            N,
            G,
            K=K,
            LOG_G=(G - 1).bit_length(),
            BLOCK=BLOCK,
            NEED_STACK=need_stack,
            NEED_W=need_w,
        )
    return gstack, gw


# --------------------------------------------------------------------------------------------
# CPU / generic torch path. Consecutive groups of equal length (e.g. all LoRA sites of one model)
# form a run handled by one batched op, not one op per group: besides Python overhead, every op
# that enters a parallel region can stall for a scheduler slice when other processes hold the cores.
# --------------------------------------------------------------------------------------------
def _runs(segments: Tensor, G: int, N: int) -> list[tuple[int, int, int, int]]:
    """(first group, end group, first element, group length) for each run of equal-length groups."""
    b = segments.tolist()
    if len(b) != G + 1 or b[0] != 0 or b[-1] != N or any(x > y for x, y in zip(b, b[1:])):
        raise ValueError(f"segments must ascend from 0 to N={N} with G+1={G + 1} entries")
    runs = []
    for g in range(G):
        length = b[g + 1] - b[g]
        if runs and runs[-1][3] == length:
            runs[-1][1] = g + 1
        else:
            runs.append([g, g + 1, b[g], length])
    return [tuple(r) for r in runs if r[3] > 0]


MV_MIN = 2048  # group length from which the CPU logit gradient takes one mv per group instead of one bmm


def _torch_fwd(stack, weights, segments):
    K, N = stack.shape
    sum_dtype = weights.dtype
    out = torch.empty(N, dtype=stack.dtype, device=stack.device)
    for g0, g1, s, L in _runs(segments, weights.shape[0], N):
        n = g1 - g0
        x = stack[:, s : s + n * L].view(K, n, L).transpose(0, 1).to(sum_dtype)  # [n, K, L], no copy for fp32
        w = weights[g0:g1].unsqueeze(1)  # [n, 1, K]
        if out.dtype == sum_dtype:
            torch.bmm(w, x, out=out[s : s + n * L].view(n, 1, L))
        else:
            out[s : s + n * L] = torch.bmm(w, x).view(-1)  # fp32 sum, rounded once to the stack dtype
    return out


def _torch_bwd(stack, weights, segments, gout, need_stack, need_w):
    K, N = stack.shape
    sum_dtype = weights.dtype
    gstack = torch.empty_like(stack) if need_stack else None
    gw = torch.zeros_like(weights) if need_w else None
    for g0, g1, s, L in _runs(segments, weights.shape[0], N):
        n, e = g1 - g0, s + (g1 - g0) * L
        go = gout[s:e].view(n, L).to(sum_dtype)
        if need_w:  # gw[g, k] = <stack[k, group g], gout[group g]>
            x = stack[:, s:e].view(K, n, L).transpose(0, 1).to(sum_dtype)  # [n, K, L]
            if K == 1:  # row dots (bmm is slow for 1x1 outputs), a few rows at a time so that
                rows = max(1, 2**18 // L)  # the product stays in cache instead of a DRAM temporary
                for i in range(0, n, rows):
                    j = min(i + rows, n)
                    torch.sum(x[i:j, 0] * go[i:j], dim=-1, out=gw[g0 + i : g0 + j, 0])
            elif L >= MV_MIN:  # one mv per group: MKL's bmm runs [K, L] x [L, 1] at half the bandwidth
                for x_g, go_g, gw_g in zip(x.unbind(0), go.unbind(0), gw[g0:g1].unbind(0)):
                    torch.mv(x_g, go_g, out=gw_g)
            else:  # many small groups: one bmm, not a Python loop
                torch.bmm(x, go.unsqueeze(-1), out=gw[g0:g1].unsqueeze(-1))
        if need_stack:
            torch.mul(weights[g0:g1].t().unsqueeze(-1), go, out=gstack[:, s:e].view(K, n, L))
    return gstack, gw


class _SegmentMix(torch.autograd.Function):
    """out[n] = sum_k weights[g(n), k] * stack[k, n]; weights already normalised (fp32 / fp64)."""

    @staticmethod
    def forward(ctx, stack, weights, segments):
        ctx.save_for_backward(stack, weights, segments)
        fwd = _triton_fwd if _use_triton(stack) else _torch_fwd
        return fwd(stack, weights, segments)

    @staticmethod
    def backward(ctx, gout):
        stack, weights, segments = ctx.saved_tensors
        need_stack, need_w = ctx.needs_input_grad[:2]
        bwd = _triton_bwd if _use_triton(stack) else _torch_bwd
        gstack, gw = bwd(stack, weights, segments, gout.contiguous(), need_stack, need_w)
        return gstack, gw, None


def _segment_mix(stack: Tensor, weights: Tensor, segments: Tensor) -> Tensor:
    if stack.dim() != 2 or weights.dim() != 2 or weights.shape[1] != stack.shape[0]:
        raise ValueError(
            f"stack [K, N] and weights [G, K] expected, got {tuple(stack.shape)}, {tuple(weights.shape)}"
        )
    if segments.numel() != weights.shape[0] + 1:
        raise ValueError(f"segments needs G+1={weights.shape[0] + 1} entries, got {segments.numel()}")
    segments = segments.to(device=stack.device, dtype=torch.int64).contiguous()
    return _SegmentMix.apply(stack.contiguous(), weights.contiguous(), segments)


def weighted_merge(stack: Tensor, logits: Tensor, segments: Tensor) -> Tensor:
    """stack [K, N]; logits [G, K]; segments int64 [G+1], ascending element offsets
    (segments[0]=0, segments[-1]=N; group g owns elements [segments[g], segments[g+1])).
    Returns flat [N]: out[n] = sum_k softmax(logits[g(n)])[k] * stack[k, n].

    Differentiable w.r.t. logits and stack; fp16/bf16 stacks accumulate in fp32 and return the
    stack dtype. On CUDA the logit gradient is summed with fp32 atomics (not bitwise deterministic)
    and segments are not validated (that would need a host sync).
    """
    probs = torch.softmax(logits.to(_acc_dtype(stack.dtype)), dim=-1)  # [G, K]: autograd handles it
    return _segment_mix(stack, probs, segments)


# --------------------------------------------------------------------------------------------
# Views of one flat buffer, with a backward that writes all their grads in one foreach copy
# --------------------------------------------------------------------------------------------
def _view_runs(specs) -> tuple:
    """specs: (offset, shape, transposed) per view, in output order. Consecutive views of one shape
    lying back to back in the buffer merge into a run (offset, count, shape, transposed), so that
    _views makes a run's views with one unbind instead of three Python-level ops per view."""
    runs = []
    for offset, shape, transposed in specs:
        last = runs[-1] if runs else None
        if last and last[2:] == [shape, transposed] and last[0] + last[1] * math.prod(shape) == offset:
            last[1] += 1
        else:
            runs.append([offset, 1, shape, transposed])
    return tuple(tuple(r) for r in runs)


def _views(flat: Tensor, runs) -> list[Tensor]:
    """The views described by _view_runs (transposed: the .t() of a contiguous [shape[0], shape[1]])."""
    out = []
    for offset, count, shape, transposed in runs:
        v = flat[offset : offset + count * math.prod(shape)].view(count, *shape)
        out += (v.transpose(1, 2) if transposed else v).unbind(0)
    return out


class _Unflatten(torch.autograd.Function):
    """flat -> tuple of views (the runs tile flat exactly). Plain slicing would make autograd
    zero-fill a full-size gradient per view; this backward assembles one flat gradient instead."""

    @staticmethod
    def forward(ctx, flat, runs):
        ctx.runs, ctx.numel = runs, flat.numel()
        return tuple(_views(flat, runs))

    @staticmethod
    def backward(ctx, *grads):
        flat = grads[0].new_empty(ctx.numel)
        torch._foreach_copy_(_views(flat, ctx.runs), list(grads))
        return flat, None


class _ScaleBlocks(torch.autograd.Function):
    """LoRA B_cat: flat[chunk c] = w[c] * stack[chunk c] (w [C, 1]: one weight per expert block B_i^T,
    K blocks per site), returned as the views `runs` of flat (like _Unflatten, so that backward gets
    the per-site grads rather than a flat gradient assembled for it).

    CPU, per site (Python loop; a site's K blocks are 36864 floats at Florence-2-base shapes, so its
    gradient stays in cache between the two ops): dL/dstack = w * grad written straight into the flat
    stack gradient, and dL/dw[c] = <stack[chunk c], grad[chunk c]>. The incoming grad is read in its
    own layout: F.linear returns B_cat's gradient in B_cat's layout, whose .t() is exactly the site's
    K packed blocks, so no transposition or copy happens (another layout costs one reshape copy)."""

    @staticmethod
    def forward(ctx, stack, w, segments, runs, chunk_runs, K):
        ctx.save_for_backward(stack, w, segments)
        ctx.runs, ctx.K = runs, K
        if _use_triton(stack):
            flat = _triton_fwd(stack.unsqueeze(0), w, segments)
        else:  # one broadcast multiply per run of equal-length chunks (bmm is slower for [C, 1] x [1, L])
            flat = torch.empty_like(stack)
            for c0, c1, s, L in chunk_runs:
                e = s + (c1 - c0) * L
                torch.mul(stack[s:e].view(c1 - c0, L), w[c0:c1], out=flat[s:e].view(c1 - c0, L))
        return tuple(_views(flat, runs))

    @staticmethod
    def backward(ctx, *grads):
        stack, w, segments = ctx.saved_tensors
        need_stack, need_w = ctx.needs_input_grad[:2]
        K, triton_path = ctx.K, _use_triton(stack)
        gflat = stack.new_empty(stack.numel()) if need_stack or triton_path else None
        if triton_path:  # the kernel reads a flat gradient: assemble it, then one kernel
            torch._foreach_copy_(_views(gflat, ctx.runs), list(grads))
            gstack, gw = _triton_bwd(stack.unsqueeze(0), w, segments, gflat, need_stack, need_w)
            return None if gstack is None else gstack.view(-1), gw, None, None, None, None
        sum_dtype = w.dtype
        gw = torch.empty_like(w) if need_w else None  # every chunk belongs to one site: all written
        site = 0  # first site (view) of the run; its chunks are rows site*K.. of w
        for offset, count, shape, transposed in ctx.runs:
            L = math.prod(shape) // K  # one expert block B_i^T
            e, c0, c1 = offset + count * K * L, site * K, (site + count) * K
            xs = stack[offset:e].view(count, K, L).unbind(0)
            ds = gflat[offset:e].view(count, K, L).unbind(0) if need_stack else [None] * count
            ws = w[c0:c1].view(count, K, 1).unbind(0)
            gws = gw[c0:c1].view(count, K).unbind(0) if need_w else [None] * count
            for g, x, d, w_s, gw_s in zip(grads[site : site + count], xs, ds, ws, gws):
                g = (g.t() if transposed else g).reshape(K, L)  # a view in the output's own layout
                if need_w:  # dL/dw[c] = <stack[chunk c], grad[chunk c]>, accumulated in fp32 / fp64
                    if x.dtype == sum_dtype:
                        torch.linalg.vecdot(x, g, out=gw_s)
                    else:
                        torch.sum(x.to(sum_dtype) * g.to(sum_dtype), dim=-1, out=gw_s)
                if need_stack:  # dL/dstack[chunk c] = w[c] * grad[chunk c]
                    torch.mul(g, w_s, out=d)
            site += count
        return gflat, gw, None, None, None, None


# --------------------------------------------------------------------------------------------
# ExpertStack
# --------------------------------------------------------------------------------------------
class ExpertStack(torch.nn.Module):
    """K experts with identical tensor names/shapes, packed once for interpolation.

    merge="sum":  forward(logits) -> {name: sum_i p_i expert_i[name]} (original shapes), all views
                 of one flat output buffer. Packed stack: parameter/buffer `stack` [K, N].
    merge="lowrank": experts are peft LoRA state dicts (`...lora_A.weight` [r, d_in], `...lora_B.weight`
                 [d_out, r]). The exact merge sum_i p_i B_i A_i is one LoRA of rank K*r:
                 A_cat = [A_1; ...; A_K] and B_cat = [p_1 B_1, ..., p_K B_K]; forward returns
                 {same names: A_cat / B_cat}. Use it in a peft LoRA with r = K*r and
                 lora_alpha = K*alpha so that the scaling alpha/r is unchanged.
                 Packed, site-major: `lora_A_stack` (flat: per site its K blocks A_i [r, d_in]
                 back to back, i.e. that site's A_cat) and `lora_B_stack` (flat: per site its K
                 blocks B_i^T [r, d_out], so scaling block i by p_i gives B_cat^T contiguous;
                 B_cat is its .t()). With trainable=True each site's A_cat is its own leaf
                 parameter `lora_A[s]`, a view of `lora_A_stack` (which is then a plain tensor,
                 not a parameter), and forward returns that leaf itself: A_cat does not depend
                 on the weights, and F.linear's gradient for it lands in `lora_A[s].grad` as is,
                 with no copy into a flat gradient. B stays one parameter (the fused scale op).
                 LoRA biases (`...lora_B.bias`, peft's lora_bias) merge as sum_i p_i b_i, a "sum" stack
                 `bias_stack` on their sites' groups.
    group_of maps a tensor name to its group (for LoRA, A and B of one site must share a group).
    trainable=True registers the packed stacks as nn.Parameters (merge="lowrank": `lora_B_stack` and the
    per-site A leaves `lora_A`), else as buffers. frozen (merge="sum"): experts whose rows of `stack`
    stay as given while the others train (their gradient is zeroed). keep (merge="lowrank"): per expert, a
    mask of ones and zeros for each LoRA bias; the zeros' entries get no gradient (biases padded in).
    """

    def __init__(
        self,
        experts: list[dict[str, Tensor]],
        group_of: Callable[[str], str],
        merge: str = "sum",
        trainable: bool = True,
        frozen: tuple[int, ...] = (),
        keep: list[dict[str, Tensor]] | None = None,
    ):
        super().__init__()
        if not experts:
            raise ValueError("need at least one expert")
        names = list(experts[0])
        for i, e in enumerate(experts):
            if set(e) != set(names):
                raise ValueError(f"expert {i} has different tensor names")
            for n in names:
                if e[n].shape != experts[0][n].shape or e[n].dtype != experts[0][n].dtype:
                    raise ValueError(
                        f"expert {i}: {n} is {e[n].dtype}{tuple(e[n].shape)}, expected "
                        f"{experts[0][n].dtype}{tuple(experts[0][n].shape)}"
                    )
        if len({experts[0][n].dtype for n in names}) > 1:
            raise ValueError("all tensors must share one dtype")
        self.num_experts = len(experts)
        self.merge = merge
        self.trainable = trainable
        self._names = names  # output order = the experts' key order
        by_group: dict[str, list[str]] = {}
        for n in names:
            by_group.setdefault(group_of(n), []).append(n)
        self.group_names = list(by_group)
        if frozen and merge != "sum":  # a LoRA block of zeros gets no gradient anyway; others are not needed
            raise ValueError("frozen experts are for merge='sum'")
        if merge == "sum":
            self._build_sum(experts, by_group)
            if trainable and frozen:  # their rows get no gradient, so AdamW leaves them bit for bit
                keep = torch.ones(len(experts), 1, dtype=self.stack.dtype)
                keep[list(frozen)] = 0
                self.register_buffer("_keep", keep, persistent=False)  # moves with the stack (.to(device))
                self.stack.register_hook(lambda g: g * self._keep)
        elif merge == "lowrank":
            # LoRA biases (peft's lora_bias) add sum_i p_i b_i: a summed stack beside, on their sites' groups
            biases = [n for n in names if n.endswith(".lora_B.bias")]
            self.bias_stack = (
                ExpertStack([{n: e[n] for n in biases} for e in experts], group_of, "sum", trainable)
                if biases
                else None
            )
            if keep and len(keep) != len(experts):
                raise ValueError(f"keep has {len(keep)} masks for {len(experts)} experts")
            if biases and trainable and keep:  # a padded bias (zeros where an expert has none) stays zero
                mask = ExpertStack([{n: k[n] for n in biases} for k in keep], group_of, "sum", False).stack
                self.register_buffer("_bias_keep", mask.to(self.bias_stack.stack.dtype), persistent=False)
                self.bias_stack.stack.register_hook(lambda g: g * self._bias_keep)
            if biases:
                rows = [self.group_names.index(g) for g in self.bias_stack.group_names]
                self.register_buffer("_bias_rows", torch.tensor(rows, dtype=torch.int64), persistent=False)
                by_group = {g: [n for n in ns if n not in biases] for g, ns in by_group.items()}
            self._build_lora(experts, by_group, group_of)
        else:
            raise ValueError(f"merge must be 'sum' or 'lowrank', got {merge!r}")

    def _register(self, name: str, t: Tensor):
        if self.trainable:
            self.register_parameter(name, torch.nn.Parameter(t))
        else:
            self.register_buffer(name, t)

    def _build_sum(self, experts, by_group):
        order = [n for names in by_group.values() for n in names]  # group-contiguous packing
        offset, offsets, bounds = 0, {}, [0]
        for names in by_group.values():
            for n in names:
                offsets[n] = offset
                offset += experts[0][n].numel()
            bounds.append(offset)
        self._views = _view_runs([(offsets[n], tuple(experts[0][n].shape), False) for n in self._names])
        self._register(
            "stack", torch.stack([torch.cat([e[n].detach().reshape(-1) for n in order]) for e in experts])
        )
        self.register_buffer("segments", torch.tensor(bounds, dtype=torch.int64), persistent=False)

    def _build_lora(self, experts, by_group, group_of):
        K, e0 = self.num_experts, experts[0]
        sites = []  # (A name, B name, group index), group-contiguous
        for gi, names in enumerate(by_group.values()):
            for n in names:
                if "lora_A" in n:
                    b = n.replace("lora_A", "lora_B")
                    if b not in e0:
                        raise ValueError(f"{n} has no matching {b}")
                    if group_of(b) != group_of(n):
                        raise ValueError(f"{n} and {b} must be in the same group")
                    if e0[n].dim() != 2 or e0[b].dim() != 2 or e0[n].shape[0] != e0[b].shape[1]:
                        raise ValueError(
                            f"{n} {tuple(e0[n].shape)} / {b} {tuple(e0[b].shape)} "
                            "are not a linear LoRA pair [r, d_in] / [d_out, r]"
                        )
                    sites.append((n, b, gi))
                elif "lora_B" in n:
                    if n.replace("lora_B", "lora_A") not in e0:
                        raise ValueError(f"{n} has no matching lora_A")
                else:
                    raise ValueError(f"merge='lowrank' expects only lora_A/lora_B tensors, got {n}")
        specs, a_parts, b_parts, chunk_bounds = {}, [], [], [0]
        a_off = b_off = 0
        for a, b, _ in sites:
            (r, d_in), d_out = e0[a].shape, e0[b].shape[0]
            specs[a] = (a_off, (K * r, d_in), False)
            specs[b] = (b_off, (K * r, d_out), True)  # B_cat = (B_cat^T view).t()
            a_parts += [e[a].detach().reshape(-1) for e in experts]
            b_parts += [e[b].detach().t().reshape(-1) for e in experts]
            a_off += K * r * d_in
            b_off += K * r * d_out
            for _ in range(K):  # one chunk per expert block B_i^T
                chunk_bounds.append(chunk_bounds[-1] + r * d_out)
        self._views_A = _view_runs([specs[a] for a, _, _ in sites])
        self._views_B = _view_runs([specs[b] for _, b, _ in sites])
        self._chunk_runs = tuple(_runs(torch.tensor(chunk_bounds), len(chunk_bounds) - 1, b_off))
        self._site_names = [(a, b) for a, b, _ in sites]
        if not sites:
            raise ValueError("merge='lowrank' found no lora_A/lora_B pairs")
        a_flat = torch.cat(a_parts)
        if self.trainable:  # one leaf per site, all views of one flat buffer (see _link_lora_A)
            self.lora_A = torch.nn.ParameterList(
                [torch.nn.Parameter(v) for v in _views(a_flat, self._views_A)]
            )
            self.lora_A_stack = a_flat
        else:
            self.register_buffer("lora_A_stack", a_flat)
        self._register("lora_B_stack", torch.cat(b_parts))
        self.register_buffer(
            "site_group", torch.tensor([g for _, _, g in sites], dtype=torch.int64), persistent=False
        )
        self.register_buffer(
            "chunk_segments", torch.tensor(chunk_bounds, dtype=torch.int64), persistent=False
        )

    def _link_lora_A(self):
        """Module._apply (.to(), .cuda(), .double(), ...) converts each per-site A parameter on its
        own; put them back into one flat buffer (in place on the Parameter objects, via .data)."""
        params, base, offset, linked = list(self.lora_A), self.lora_A_stack, 0, True
        for p in params:
            linked &= (
                p.device == base.device
                and p.dtype == base.dtype
                and p.data_ptr() == base.data_ptr() + offset * p.element_size()
            )
            offset += p.numel()
        if linked and offset == base.numel():
            return
        offset = 0
        flat = torch.cat([p.data.reshape(-1) for p in params])
        for p in params:
            p.data = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        self.lora_A_stack = flat

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.merge == "lowrank" and self.trainable:
            self._link_lora_A()
        return self

    def forward(self, logits: Tensor) -> dict[str, Tensor]:
        """logits [G, K] (rows in `group_names` order) -> {name: merged tensor}."""
        if tuple(logits.shape) != (len(self.group_names), self.num_experts):
            raise ValueError(
                f"logits must be [G={len(self.group_names)}, K={self.num_experts}], got {tuple(logits.shape)}"
            )
        if self.merge == "sum":
            flat = weighted_merge(self.stack, logits, self.segments)
            return dict(zip(self._names, _Unflatten.apply(flat, self._views)))
        # LoRA: A_cat is each site's leaf (or a view of the frozen buffer), no op at all.
        # B's chunk (site s, expert i) is scaled by p[group(s), i]: a segment mix with one "expert"
        # row and S*K segments, whose backward takes the per-view grads (see _ScaleBlocks).
        probs = torch.softmax(logits.to(_acc_dtype(self.lora_B_stack.dtype)), dim=-1)
        chunk_w = probs[self.site_group].reshape(-1, 1)  # [S*K, 1], site-major like the layout
        b_cat = _ScaleBlocks.apply(
            self.lora_B_stack, chunk_w, self.chunk_segments, self._views_B, self._chunk_runs, self.num_experts
        )
        # (_parameters directly: iterating a ParameterList costs ~1 us per item; functional_call
        # substitutes tensors there too)
        a_cat = (
            self.lora_A._parameters.values() if self.trainable else _views(self.lora_A_stack, self._views_A)
        )
        merged = dict(zip((a for a, _ in self._site_names), a_cat))
        merged.update(zip((b for _, b in self._site_names), b_cat))
        if self.bias_stack is not None:
            merged.update(self.bias_stack(logits[self._bias_rows]))
        return {n: merged[n] for n in self._names}

    def extra_repr(self) -> str:
        return f"merge={self.merge!r}, experts={self.num_experts}, groups={len(self.group_names)}"
