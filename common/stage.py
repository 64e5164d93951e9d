"""What every stage script shares: its command line (--config, key=value overrides), the checks before it
reads anything (common.checks), and the way it ends: a UserError as one line and exit code 2, no traceback;
under torchrun only rank 0 prints."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys

import accelerate  # noqa: F401  (the libraries every stage loads: imported here, frozen out of the collector)
import peft  # noqa: F401
import torch
import transformers.modeling_utils  # noqa: F401

from common import dist
from common.checks import preflight
from common.config import load_config
from common.errors import UserError


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The command line every stage shares: --config, key=value overrides."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default="configs/mini.yaml", help="profile YAML (default: configs/mini.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. expert.steps=100")
    return ap


def parse_stage(ap: argparse.ArgumentParser, reads_test: bool = False):
    """Parse a stage's command line (overrides may sit anywhere), load its config and check it (common.checks)
    for the targets it names (--target, --study), before anything is read or trained; the files of test splits
    only for the stage that scores them (reads_test: evaluate.py)."""
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not gc.isenabled():
        # the stage's own process (run_stage): the libraries it loaded above are frozen out of the collector,
        # which then runs on everything made after them
        gc.freeze()
        gc.enable()
    targets = [t for t in [getattr(args, "target", None), *(getattr(args, "study", None) or [])] if t]
    preflight(
        cfg,
        targets,
        read=[t for t in [getattr(args, "task", None), *targets] if t],  # what this stage reads
        splits=("train", "val", "test") if reads_test else ("train", "val"),
    )
    return args, cfg


def run_stage(main) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit code 2. Under torchrun only rank
    0 prints (every rank runs the same code on the same inputs, so a UserError is everyone's);
    each exits alike."""
    # A stage script run as a process turns the cyclic garbage collector off before its imports (torch,
    # transformers, peft, accelerate: about a million objects that live as long as the process); collections
    # that scan them cost seconds of each stage's start and of its exit (bench/startup_bench.py). parse_stage
    # freezes those objects out of the collector and turns it on for everything made after; at exit everything
    # is frozen again, so the exit collects nothing.
    own_process = not gc.isenabled()
    main_rank = dist.is_main()  # before the process group: the launcher's RANK
    try:
        with contextlib.nullcontext() if main_rank else contextlib.redirect_stdout(open(os.devnull, "w")):
            main()
    except UserError as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if own_process:
            gc.freeze()
