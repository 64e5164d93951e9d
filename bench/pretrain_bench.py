"""The embedded backbone's pre-training: today's recipe against the one before it, built one after the other
in one run on this machine, with what each backbone sees.

    python bench/pretrain_bench.py [--config configs/mini.yaml] [--threads 2] [--probe 1000] [--keep DIR]

Each recipe is `train_expert.py --pretrain` as make runs it, into its own temp runs_dir: the profile's own
(`--after`, overrides on top of the config) and the recipe of 118e166 (`--before`: 3,000 steps at lr 3e-4, and
AdamW's per-tensor loop as torch picks it on the CPU, not the fused kernel). Prints per recipe the stage's
wall time, the training loop's seconds (the backbone's meta.json) and the steps per second; the ratios
before / after; and, per backbone, caption-token accuracy and the caption-word accuracy of each attribute on
the 200 validation captions meta.json records and on `--probe` of them (the first 200 are the same; at 200 one
caption word is 0.3-0.5 points of an attribute).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "pretrain.steps=3000 pretrain.lr=3e-4"
# the stage as `python train_expert.py --pretrain ...` runs it; FOREACH=1: AdamW as torch picks it (fused off)
RUNNER = """
import os, runpy, sys
import torch
if os.environ.get("FOREACH") == "1":
    adamw = torch.optim.AdamW
    torch.optim.AdamW = lambda *a, fused=None, **k: adamw(*a, **k)
sys.argv = ["train_expert.py", *sys.argv[1:]]
runpy.run_path("train_expert.py", run_name="__main__")
"""


def build(config: str, overrides: list[str], runs: Path, threads: int, foreach: bool) -> dict:
    cmd = [
        sys.executable,
        "-c",
        RUNNER,
        "--pretrain",
        "--config",
        config,
        f"runs_dir={runs}",
        f"threads={threads}",
        *overrides,
    ]
    t0 = time.time()
    p = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "FOREACH": str(int(foreach))}
    )
    wall = time.time() - t0
    if p.returncode:
        sys.exit(f"pretrain_bench: {shlex.join(cmd[3:])} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    backbone = next(runs.glob("*/backbone"))
    return {
        "wall": wall,
        "dir": backbone,
        "overrides": overrides,
        "meta": json.loads((backbone / "meta.json").read_text()),
    }


def probe(
    config: str, backbone: Path, overrides: list[str], n: int, threads: int
) -> tuple[int, float, dict[str, float]]:
    import torch

    sys.path.insert(0, str(REPO))
    from common import data
    from common.backbone import load_backbone
    from common.config import load_config
    from common.metrics import token_accuracy
    from train_expert import attribute_probe

    torch.set_num_threads(threads)
    cfg = load_config(config, [*overrides, f"runs_dir={backbone.parents[1]}"])
    model, processor = load_backbone(cfg)
    enc = data.Encoder(processor, "cpu")
    exs = data.examples("pt-caption", "val", cfg.world, n)
    with torch.no_grad():
        return len(exs), token_accuracy(model, enc, exs), attribute_probe(model, enc, exs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mini.yaml")
    ap.add_argument("--after", default="", help="overrides on the config for today's recipe (default: none)")
    ap.add_argument("--before", default=BEFORE, help=f"overrides for the recipe before (default: {BEFORE!r})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", type=int, default=1000, help="validation captions to probe each backbone on")
    ap.add_argument("--keep", default="", help="build the backbones here (kept) instead of a temp folder")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="pretrain_bench-"))
    runs = {}
    for name, overrides, foreach in (("before", args.before, True), ("after", args.after, False)):
        runs[name] = build(args.config, shlex.split(overrides), root / name, args.threads, foreach)
        m = runs[name]["meta"]
        print(
            f"{name:>6}: {overrides or '(the profile as it is)'}{' + per-tensor AdamW' if foreach else ''} "
            f"| stage {runs[name]['wall']:.0f} s, training {m['seconds']:.0f} s, "
            f"{m['steps'] / m['seconds']:.2f} steps/s",
            flush=True,
        )
    b, a = runs["before"], runs["after"]
    print(
        f"before / after: stage {b['wall'] / a['wall']:.2f}x, training "
        f"{b['meta']['seconds'] / a['meta']['seconds']:.2f}x ({args.threads} threads, {root})"
    )
    print(
        "\n| backbone | validation captions | caption tokens | "
        + " | ".join(b["meta"]["val_caption_word_accuracy"])
        + " |"
    )
    print("|---|---|---|" + "---|" * len(b["meta"]["val_caption_word_accuracy"]))
    for name, r in runs.items():
        m = r["meta"]
        rows = [("meta.json", m["val_token_accuracy"]["pt-caption"], m["val_caption_word_accuracy"])]
        rows.append(probe(args.config, r["dir"], r["overrides"], args.probe, args.threads))
        for n, tok, attrs in rows:
            print(f"| {name} | {n} | {tok:.3f} | " + " | ".join(f"{v:.2f}" for v in attrs.values()) + " |")


if __name__ == "__main__":
    main()
