"""Where a stage runs and in what precision: one `accelerate.Accelerator` per stage, made from the config's
`device` (auto | cpu | cuda | cuda:N) and `precision` (fp32 | bf16 | fp16). It places the model and the
batches, runs forwards under autocast (weights stay fp32), scales fp16 losses, accumulates gradients.
Refused here, in one line: a CUDA device that is not there, fp16 on the CPU (no loss-scaled fp16 autocast)."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState

from common.errors import UserError

MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # config precision -> accelerate's mixed_precision


def resolve(cfg) -> str:
    """The device the config asks for, checked against this machine: 'cpu', 'cuda' or 'cuda:N'."""
    want, cuda = cfg.device, torch.cuda.is_available()
    if want.startswith("cuda") and not cuda:
        raise UserError(
            f"{cfg.path}: field 'device' is {want!r}, but torch {torch.__version__} sees no CUDA device "
            f"here; use device=auto (CUDA when there is one) or device=cpu"
        )
    if want.startswith("cuda:") and int(want[5:]) >= torch.cuda.device_count():
        raise UserError(
            f"{cfg.path}: field 'device' is {want!r}, but this machine has {torch.cuda.device_count()} "
            f"CUDA device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    if want.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(
            f"{cfg.path}: field 'device' is {want!r}, which would put every process of this torchrun "
            f"on one GPU; use device=auto or cuda (each rank takes the GPU of its LOCAL_RANK)"
        )
    device = ("cuda" if cuda else "cpu") if want == "auto" else want
    if cfg.precision == "fp16" and device == "cpu":
        raise UserError(
            f"{cfg.path}: field 'precision' is 'fp16', which needs a CUDA device (fp16 autocast with loss "
            f"scaling); on the CPU use precision=bf16 or fp32"
        )
    return device


# log_with -> the package its tracker needs
# (accelerate itself skips a tracker whose package is missing, silently)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def accelerator(cfg):
    """The stage's Accelerator (accel): .device, .autocast(), .backward(); train_steps prepares the rest
    and logs to the tracker of `log_with` (tensorboard: event files under runs/<profile>/logs/)."""
    device = resolve(cfg)
    if cfg.log_with != "none" and importlib.util.find_spec(TRACKERS[cfg.log_with]) is None:
        raise UserError(
            f"{cfg.path}: field 'log_with' is {cfg.log_with!r}, but its package is not installed; "
            f"`{sys.executable} -m pip install {TRACKERS[cfg.log_with]}`, or log_with=none"
        )
    try:
        return fresh(
            device, cfg.precision, None if cfg.log_with == "none" else cfg.log_with, cfg.run_dir / "logs"
        )
    except ValueError as e:  # e.g. bf16 on a GPU without it
        raise UserError(
            f"{cfg.path}: field 'precision' is {cfg.precision!r}: {str(e).splitlines()[0][:160]}; "
            f"use precision=fp32"
        ) from None


def fresh(device: str = "cpu", precision: str = "fp32", log_with: str | None = None, logging_dir=None):
    """An Accelerator on `device` in `precision`, whatever one made before in this process said. accelerate
    keeps one shared state per process and refuses a second precision; a stage run in a test, a notebook or
    after another stage starts from a clean one, as in its own process (outside torchrun's process group)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not distributed)
    if device.startswith("cuda:"):  # accelerate places a single process on this device
        os.environ["ACCELERATE_TORCH_DEVICE"] = device
    else:
        os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
    # split_batches: under torchrun every rank takes its share of one global batch (common.dist), so the
    # schedule steps once per optimizer step, not once per process
    return Accelerator(
        cpu=device == "cpu",
        mixed_precision=MIXED[precision],
        log_with=log_with,
        project_dir=logging_dir,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
