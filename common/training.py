"""The training loop every stage shares: AdamW, warm-up + cosine decay, grad clipping, accumulation, autocast,
a tqdm bar or progress lines, checkpoints to resume from."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import dist
from common.artifacts import atomic_file
from common.device import fresh
from common.errors import UserError


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _tensors(obj, fn):
    """obj with fn applied to every tensor in it (a dict, list or tuple of them, nested);
    anything else as is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v, fn) for v in obj)
    return obj


@dataclass
class Batch:
    """One batch of a training loop as this rank trains on it: the inputs loss_fn takes for this rank's share
    of the examples, how many examples the whole batch holds (every rank's share), and how many terms the loss
    of this share averages over (answer tokens: data.Encoder.targets), by which the ranks' losses are
    weighted. data.Loader makes them in DataLoader workers; a plain batch (a list every rank holds alike)
    becomes one in train_steps (`share`)."""

    inputs: object
    size: int
    targets: int = 1

    @classmethod
    def share(cls, batch, count) -> Batch:
        """This rank's share of a batch every rank drew alike (all of it, alone). A batch smaller than the
        number of processes (an epoch's last, ragged one) leaves some ranks none: each of those takes the
        batch's first example as a masked row (its loss weighted 0, so it adds no gradient), and the step is
        the one a single process takes on the whole batch."""
        mine = dist.shard(batch)
        size = len(batch) if isinstance(batch, list) else 0
        if not len(mine):
            return cls(batch[:1], size, 0)
        return cls(mine, size, count(mine) if dist.active() else 1)

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this, in its pinning thread
        return Batch(_tensors(self.inputs, torch.Tensor.pin_memory), self.size, self.targets)

    def to(self, device) -> Batch:
        return Batch(
            _tensors(self.inputs, lambda t: t.to(device, non_blocking=True)), self.size, self.targets
        )


@dataclass
class Checkpoint:
    """Where a training loop keeps its state every `every` steps (0: never), beside the artifact it makes:
    trainable weights, optimizer, schedule, RNG states, the data position and the recent losses. The
    artifact's path carries the digest of what it is made from (common.provenance), and so does its
    checkpoint's: a rerun resumes from the one of its own config. `done()` removes it once the artifact has
    landed. kill_at (debug.kill_at_step) ends the process with SIGKILL after that step; fail_rank
    (debug.fail_rank) makes that rank raise after the last step, for the tests of a failing rank."""

    path: Path
    every: int
    cfg: object
    kill_at: int = 0
    fail_rank: int = -1

    @classmethod
    def beside(cls, artifact: Path, every: int, cfg) -> Checkpoint:
        artifact = Path(artifact)
        return cls(
            artifact.parent / f".{artifact.name}.ckpt",
            every,
            cfg,
            cfg.debug.kill_at_step,
            cfg.debug.fail_rank,
        )

    def save(self, step: int, params, opt, sched, tail: list[float]) -> None:
        # every rank's own RNG states (each draws its own dropout on its own share), saved by rank 0
        rng = dist.every_rank(
            {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
        )
        state = {
            "step": step,
            "tail": tail,
            "config": self.cfg.to_dict(),
            "params": [p.detach().cpu() for p in params],
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng,
        }
        with atomic_file(self.path) as tmp:
            torch.save(state, tmp)

    def resume(self, params, opt, sched, desc: str) -> tuple[int, list[float]]:
        """(step to start from, recent losses); (0, []) when there is nothing current to resume."""
        if not self.path.is_file():
            return 0, []
        try:  # tensors and plain values only: a checkpoint planted in a shared runs folder runs no code
            state = torch.load(self.path, weights_only=True)
        except Exception as e:  # a checkpoint cut short by the crash it was for, or one holding objects
            return self._fresh(desc, f"unreadable ({' '.join(str(e).split())[:60]})")
        if len(state["params"]) != len(params) or any(
            saved.shape != p.shape for saved, p in zip(state["params"], params)
        ):
            return self._fresh(desc, "of other tensors")
        if len(state.get("rng", [])) != dist.world():
            return self._fresh(desc, f"made by {len(state.get('rng', []))} processes, not {dist.world()}")
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        mine = state["rng"][dist.rank()]
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])
        if dist.is_main():
            print(f"{desc}: resumed from step {state['step']} ({self.path})", file=sys.stderr, flush=True)
        return state["step"], state["tail"]

    def _fresh(self, desc: str, why: str) -> tuple[int, list[float]]:
        if dist.is_main():
            print(
                f"{desc}: checkpoint {self.path} {why}: not resumed, starting at step 0",
                file=sys.stderr,
                flush=True,
            )
        return 0, []

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


class Progress:
    """Without a terminal (a file, a pipe, a cluster job), one line per `every` seconds on stderr: step, loss,
    lr, examples/s, time left; with one, tqdm's bar."""

    def __init__(self, desc: str, start: int, steps: int, every: float, quiet: bool = False):
        self.desc, self.steps, self.every, self.quiet = desc, steps, every, quiet
        self.bar = tqdm(
            range(start, steps),
            desc=desc,
            leave=False,
            dynamic_ncols=True,
            initial=start,
            total=steps,
            disable=True if quiet else None,
        )  # None: off without a terminal
        self.piped = self.bar.disable and not quiet
        self.t0 = self.last = time.time()
        self.first, self.examples = start, 0

    def __iter__(self):
        return iter(self.bar)

    def update(self, step: int, loss: float, lr: float, examples: int) -> None:
        self.examples += examples
        if self.quiet:
            return
        if not self.piped:
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}")
            return
        now = time.time()
        if now - self.last < self.every and step + 1 < self.steps:
            return
        self.last, spent, done = now, now - self.t0, step + 1 - self.first
        left = spent / done * (self.steps - step - 1)
        print(
            f"{self.desc}: step {step + 1}/{self.steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{self.examples / max(spent, 1e-9):.1f} examples/s | {spent:.0f}s, ~{left:.0f}s left",
            file=sys.stderr,
            flush=True,
        )


def train_steps(
    loss_fn,
    param_groups: list[dict],
    batches,
    steps: int,
    grad_clip: float = 1.0,
    warmup: int = 0,
    desc: str = "train",
    lr_field: str = "expert.lr",
    accel=None,
    grad_accum: int = 1,
    checkpoint: Checkpoint | None = None,
    log_every: float = 30.0,
    count=len,
) -> float:
    """Run `steps` optimizer steps of loss_fn(inputs), each over grad_accum batches; returns the mean loss of
    the last 10% of steps. Through accelerate (`accel`, common.device.accelerator's; None: the CPU in fp32):
    the forward under autocast, fp16 loss scaling, accumulation. batches: an iterator of Batch (data.Loader:
    each rank's share, read and encoded in DataLoader workers; moved to the device here), or of plain batches
    that every rank draws alike, of which each rank takes its share (common.dist; count(share): the terms
    loss_fn averages over). Under torchrun each rank's loss is weighted by its share of the batch's terms and
    the gradients are summed over ranks. With a checkpoint: resumed from it when current, saved every
    checkpoint.every steps (a batch source with skip(n), as data.Loader, passes the batches of the steps
    before without reading them). A NaN or inf loss (on any rank) or weight stops the stage (a UserError
    naming the field to fix) before anything is written."""
    accel = accel or fresh("cpu", "fp32")
    accel.gradient_accumulation_steps = grad_accum
    params = [p for g in param_groups for p in g["params"]]
    # fused: one kernel over every tensor instead of a loop of small ones (CPU and CUDA; a mini caption step
    # took 98 ms against 107 on the 2-core CPU); on another device (MPS, XLA) torch picks its own
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0, fused=fused)
    opt, sched = accel.prepare(
        opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    )
    start, tail = checkpoint.resume(params, opt, sched, desc) if checkpoint else (0, [])
    if hasattr(batches, "skip"):  # the data position: the batches the steps before `start` took
        batches.skip(start * grad_accum)
    else:
        for _ in range(start * grad_accum):
            next(batches)
    progress = Progress(desc, start, steps, log_every, quiet=not dist.is_main())
    tracking = bool(accel.log_with)  # log_with: one tracker run per loop, named after it ("expert-nli")
    if tracking:
        accel.init_trackers(desc.replace(" ", "-"))
    t0 = time.time()
    for step in progress:
        total, examples = 0.0, 0
        for _ in range(grad_accum):
            with accel.accumulate():
                batch = next(batches)
                if not isinstance(batch, Batch):
                    batch = Batch.share(batch, count)
                examples += batch.size
                share = 1.0
                if dist.active():  # this rank's terms over the whole batch's
                    share = batch.targets / dist.all_sum([torch.tensor([float(batch.targets)])])[0].item()
                with accel.autocast():
                    loss = loss_fn(batch.to(accel.device).inputs) * share
                total += loss.detach()
                accel.backward(loss)  # divided by grad_accum; fp16: scaled
                if accel.sync_gradients:  # the step's last batch: gradients (and the loss) summed over ranks
                    total = dist.sync(params, total)
                    if not torch.isfinite(total):
                        _diverged(desc, f"loss {total.item()} at step {step + 1} of {steps}", lr_field)
                    if grad_clip:
                        accel.clip_grad_norm_(params, grad_clip)
                opt.step()  # prepared: steps (and the schedule) once the last batch of the step is in
                sched.step()
                opt.zero_grad(set_to_none=True)
        mean = total.item() / grad_accum
        if step >= steps - max(1, steps // 10):
            tail.append(mean)
        progress.update(step, mean, sched.get_last_lr()[0], examples)
        if tracking:  # accelerate logs on the main process only
            accel.log(
                {
                    "loss": mean,
                    "lr": sched.get_last_lr()[0],
                    "examples_per_s": progress.examples / max(time.time() - t0, 1e-9),
                },
                step=step + 1,
            )
        if checkpoint and checkpoint.every and (step + 1) % checkpoint.every == 0 and step + 1 < steps:
            checkpoint.save(step + 1, params, opt, sched, tail)
        if checkpoint and checkpoint.kill_at == step + 1:  # debug.kill_at_step: a crash, for the tests
            os.kill(os.getpid(), signal.SIGKILL)
    accel.free_memory(
        opt, sched
    )  # the accelerator forgets them: one accelerator serves the stage's next loop
    if tracking:
        accel.end_training()  # flushes and closes the tracker run
        accel.trackers.clear()
    if not all(torch.isfinite(p).all() for p in params):
        _diverged(desc, f"weights not finite after step {steps}", lr_field)
    if checkpoint and checkpoint.fail_rank == dist.rank():
        raise RuntimeError(
            f"{desc}: debug.fail_rank={checkpoint.fail_rank}: this rank fails after its last step"
        )
    dist.barrier()  # every rank trained to the end before any goes on to write
    return sum(tail) / len(tail) if tail else math.nan


def _diverged(desc: str, what: str, lr_field: str):
    section = lr_field.split(".")[0]
    raise UserError(
        f"{desc}: {what}, nothing written; lower {lr_field} or set {section}.grad_clip (e.g. 1.0)"
    )


def checkpointing(model, on: bool) -> None:
    """Activation checkpointing in the backbone's layers (transformers' own; non-reentrant, so a frozen
    backbone's inputs need no gradient):
    backward recomputes each layer's activations instead of keeping them."""
    # transformers >= 5.2x; before: gradient_checkpointing_*
    new = hasattr(model, "activation_checkpointing_enable")
    if on and new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False):
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
