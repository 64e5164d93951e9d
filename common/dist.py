"""Data parallel inside a stage: the same script under `torchrun --nproc_per_node N` or `accelerate launch`
(one process per GPU, or per CPU core with gloo), multi-node through torchrun's own rendezvous. accelerate
sets up the process group (common.device.accelerator); this module is what the stages do with it.

Every rank builds the same global batch (same seed, same data position) and takes its own share of it
(`shard`); gradients are summed over ranks after each optimizer step's backward (`sync`), with each rank's
loss weighted by its share of the batch's loss terms, so the step is the single-process step up to the
order of float sums. The Fisher sums its samples per rank, then over ranks; evaluation shards the examples
and gathers the per-example results in their original order. Alone (no process group) every function here
is the identity. Only rank 0 lands an artifact (common.artifacts) and prints to stdout
(common.config.run_stage). torch is not imported here: a process that has not imported it (the Makefile's
config reads) has no group, and `python -m common.provenance` (0.15 s) would take 1 s more."""

from __future__ import annotations

import os
import sys


def _group():
    """torch.distributed when a process group of more than one rank is up, else None."""
    td = sys.modules.get("torch.distributed")
    up = td is not None and td.is_available() and td.is_initialized() and td.get_world_size() > 1
    return td if up else None


def active() -> bool:
    return _group() is not None


def launched() -> bool:
    """Started by a launcher as one of several processes (torchrun's WORLD_SIZE), the group up or not yet."""
    return active() or int(os.environ.get("WORLD_SIZE", 1)) > 1


def world() -> int:
    return _group().get_world_size() if active() else 1


def rank() -> int:
    """This process's rank: from the process group, or before it exists from the launcher's RANK."""
    return _group().get_rank() if active() else int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This rank's share of a list every rank holds alike: items rank, rank + world, ..."""
    return items[rank() :: world()] if active() else items


def gather(mine: list, n: int) -> list:
    """The inverse of shard: every rank's share, back in the original order of the n items."""
    if not active():
        return mine
    parts = [None] * world()
    _group().all_gather_object(parts, mine)
    return [parts[i % len(parts)][i // len(parts)] for i in range(n)]


def every_rank(obj) -> list:
    """Each rank's `obj`, in rank order, on every rank (alone: [obj])."""
    if not active():
        return [obj]
    parts = [None] * world()
    _group().all_gather_object(parts, obj)
    return parts


def all_sum(tensors: list) -> list:
    """The elementwise sum over ranks of each tensor (one flat all-reduce); alone, the tensors themselves."""
    if not active() or not tensors:
        return tensors
    import torch

    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    _group().all_reduce(flat)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t).to(t.dtype))
        i += t.numel()
    return out


def sync(params: list, loss):
    """After backward: each parameter's gradient summed over ranks (what DDP does, in one bucket), and the
    rank-weighted loss summed into the global batch's loss, which every rank then checks alike (a NaN on one
    rank stops them all). Alone: the loss as it is."""
    if not active():
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    *summed, total = all_sum(grads + [loss.detach().reshape(1)])
    for g, s in zip(grads, summed):
        g.copy_(s)
    return total.reshape(())


def barrier() -> None:
    """Every rank got here: a rank that raised or died before never arrives,
    and the launcher ends the rest."""
    if active():
        _group().barrier()
