"""The training loop every stage shares: AdamW, warm-up + cosine decay, grad clipping, accumulation, autocast,
a tqdm bar."""
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
                warmup: int = 0, desc: str = "train", lr_field: str = "expert.lr", acc=None,
                grad_accum: int = 1) -> float:
    """Run `steps` optimizer steps of loss_fn(batch), each over grad_accum batches; returns the mean loss of the
    last 10% of steps. Through accelerate (`acc`, from common.device.accelerator; None: the CPU in fp32): the
    forward under autocast, fp16 loss scaling, accumulation. A NaN or inf loss or weight stops the stage (a
    UserError naming the field to fix) before anything is written."""
    from common.device import fresh

    acc = acc or fresh("cpu", "fp32")
    acc.gradient_accumulation_steps = grad_accum
    params = [p for g in param_groups for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    opt, sched = acc.prepare(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup)))
    tail, bar = [], tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for step in bar:
        total = 0.0
        for _ in range(grad_accum):
            with acc.accumulate():
                with acc.autocast():
                    loss = loss_fn(next(batches))
                if not torch.isfinite(loss):
                    _diverged(desc, f"loss {loss.item()} at step {step + 1} of {steps}", lr_field)
                acc.backward(loss)  # divided by grad_accum; fp16: scaled
                if grad_clip and acc.sync_gradients:
                    acc.clip_grad_norm_(params, grad_clip)
                opt.step()  # prepared: steps (and the schedule) once the last batch of the step is in
                sched.step()
                opt.zero_grad(set_to_none=True)
            total += loss.detach()
        if step >= steps - max(1, steps // 10):
            tail.append(total.item() / grad_accum)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{total.item() / grad_accum:.3f}")
    acc.free_memory(opt, sched)  # the accelerator forgets them: one accelerator serves the stage's next loop
    if not all(torch.isfinite(p).all() for p in params):
        _diverged(desc, f"weights not finite after step {steps}", lr_field)
    return sum(tail) / len(tail) if tail else math.nan


def _diverged(desc: str, what: str, lr_field: str):
    section = lr_field.split(".")[0]
    raise UserError(f"{desc}: {what}, nothing written; lower {lr_field} or set {section}.grad_clip (e.g. 1.0)")


def checkpointing(model, on: bool) -> None:
    """Activation checkpointing in the backbone's layers (transformers' own; non-reentrant, so a frozen
    backbone's inputs need no gradient): backward recomputes each layer's activations instead of keeping them."""
    new = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.2x; before: gradient_checkpointing_*
    if on and new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False):
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
