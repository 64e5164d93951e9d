"""The plain training loop every stage shares: AdamW, warm-up + cosine decay, grad clipping, a tqdm bar."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from common.config import UserError


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_steps(loss_fn, param_groups: list[dict], batches, steps: int, grad_clip: float = 1.0,
                warmup: int = 0, desc: str = "train", lr_field: str = "expert.lr") -> float:
    """Run `steps` optimizer steps of loss_fn(batch); returns the mean loss of the last 10% of steps.
    A NaN or inf loss or weight stops the stage (a UserError naming the field to fix) before anything is written."""
    params = [p for g in param_groups for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    tail, bar = [], tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for step in bar:
        loss = loss_fn(next(batches))
        if not torch.isfinite(loss):
            _diverged(desc, f"loss {loss.item()} at step {step + 1} of {steps}", lr_field)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if not all(torch.isfinite(p).all() for p in params):
        _diverged(desc, f"weights not finite after step {steps}", lr_field)
    return sum(tail) / len(tail) if tail else math.nan


def _diverged(desc: str, what: str, lr_field: str):
    section = lr_field.split(".")[0]
    raise UserError(f"{desc}: {what}, nothing written; lower {lr_field} or set {section}.grad_clip (e.g. 1.0)")
