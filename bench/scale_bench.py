"""One expert training step at real size: this harness's loop against a plain HF Trainer + peft, same model,
batch and precision, as a ratio measured in one run.

    python bench/scale_bench.py                           # CPU: 1 thread, batch 1, fp32, adapter and lora
    python bench/scale_bench.py --device cuda --batch 32  # CUDA: bf16 by default
    python bench/scale_bench.py --methods lora --steps 4 --rounds 5

The model has the architecture and dimensions of florence-community/Florence-2-base (DaViT [128, 256, 512,
1024] x [1, 1, 9, 1], BART 768 wide, 6 + 6 layers, vocab 51289), built from its config with random weights:
nothing is downloaded. Images are 768x768 and fresh every step (random pixels), and the vision-feature cache
is off: every step encodes its images. Experts: adapters (dim 128, two per layer) and LoRA (r 16 on q, k, v,
out of every language-model attention), the florence2-base profile's settings.

Both arms train the same model in one process, in turns: --rounds blocks each, the order alternating, so that
the machine's drift falls on both alike. Each block times its steps after --warmup, from one step's start to
the next (CUDA synchronised); peak memory per block is CUDA's max_memory_allocated, or on the CPU the peak
resident set above the block's start. Both arms turn the same examples into batches through the same
processor, every step.
harness: common.training.train_steps through common.device (accelerate), as train_expert.py runs it.
trainer: transformers.Trainer (AdamW, cosine schedule, grad clipping 1.0, the processor as collator).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE = 768
VISION = dict(
    depths=[1, 1, 9, 1],
    patch_size=[7, 3, 3, 3],
    patch_stride=[4, 2, 2, 2],
    patch_padding=[3, 1, 1, 1],
    patch_prenorm=[False, True, True, True],
    embed_dim=[128, 256, 512, 1024],
    num_heads=[4, 8, 16, 32],
    num_groups=[4, 8, 16, 32],
    window_size=12,
    projection_dim=768,
    drop_path_rate=0.1,
)
TEXT = dict(
    vocab_size=51289,
    d_model=768,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=12,
    decoder_attention_heads=12,
    encoder_ffn_dim=3072,
    decoder_ffn_dim=3072,
    max_position_embeddings=1024,
    dropout=0.1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
EXPERTS = {
    "adapter": ["expert.method=adapter", "expert.adapter_dim=128"],
    "lora": ["expert.method=lora", "expert.r=16", "expert.alpha=32"],
}


def florence2_base():
    """Florence-2-base's architecture with random weights, and a processor for 768x768 images (577 tokens)."""
    import torch
    from transformers import (
        BartConfig,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2VisionConfig,
    )

    from common import data
    from common.backbone import build_processor, build_vocab

    torch.manual_seed(0)
    vocab = build_vocab(
        [t for n in data.TASKS for e in data.examples(n, "train", _world(), 30) for t in (e.prompt, e.answer)]
    )
    config = Florence2Config(
        vision_config=Florence2VisionConfig(**VISION),
        text_config=BartConfig(**TEXT),
        image_token_id=vocab.index("<image>"),
    )
    model = Florence2ForConditionalGeneration(config).requires_grad_(False)
    return model, build_processor(vocab, IMAGE, (IMAGE // 32) ** 2 + 1)


def _world():
    from common.config import WorldConfig

    return WorldConfig(image_size=64)


def examples(n: int):
    """n SNLI-VE-style examples, each with its own random 768x768 image."""
    import dataclasses

    import numpy as np

    from common import data

    rng = np.random.default_rng(0)
    text = data.examples("snli-ve", "train", _world(), n)
    return [
        dataclasses.replace(e, image=rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)) for e in text
    ]


class Peak:
    """Peak memory of a block of steps: CUDA's max_memory_allocated, or on the CPU the peak resident set above
    the block's start, sampled every 5 ms (the activations,
    gradients and optimizer state the arm adds to the model)."""

    def __init__(self, cuda: bool):
        self.cuda, self.mb = cuda, 0.0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import threading

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base, self.top, self.done = self.rss(), 0, threading.Event()

        def sample():
            while not self.done.wait(0.005):
                self.top = max(self.top, self.rss())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.done.set()
            self.thread.join()
            self.mb = max(self.top, self.rss()) / 2**20 - self.base / 2**20


def child(method: str, args) -> dict:
    """Both arms on one model in one process, in turns (--rounds blocks each, the order alternating), so that
    the machine's drift falls on both alike; per block: warm-up steps, then timed steps."""
    import torch

    from common import data
    from common.config import load_config
    from common.device import accelerator
    from common.experts import attach
    from common.training import train_steps

    cfg = load_config(
        str(REPO / "configs/micro.yaml"),
        [
            f"device={args.device}",
            f"precision={args.precision}",
            "feature_cache_mb=0",
            "expert.dropout=0.1",
            *EXPERTS[method],
        ],
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    accel = accelerator(cfg)
    cuda = accel.device.type == "cuda"
    model, processor = florence2_base()
    model.to(accel.device)
    expert = attach(model, cfg.expert)
    total = args.warmup + args.steps + 1  # the last step only ends the one before it
    exs = examples(total * args.batch)
    times = {"harness": [], "trainer": []}
    peaks = {"harness": [], "trainer": []}

    def run(arm: str) -> None:
        starts = []

        def mark():
            if cuda:
                torch.cuda.synchronize()
            starts.append(time.perf_counter())

        expert.train()
        with Peak(cuda) as peak:
            if arm == "harness":
                enc = data.Encoder(processor, accel.device)

                def batches():
                    for i in range(total):
                        mark()
                        yield exs[i * args.batch : (i + 1) * args.batch]

                train_steps(
                    lambda b: expert(**enc.batch(b)).loss,
                    [{"params": [p for p in expert.parameters() if p.requires_grad], "lr": 1e-3}],
                    batches(),
                    total,
                    1.0,
                    warmup=min(30, total // 10),
                    desc=f"harness {method}",
                    accel=accel,
                )
            else:
                # it moves batches itself
                trainer(expert, exs, data.Encoder(processor), total, mark, cuda, args)
        times[arm] += [b - a for a, b in zip(starts, starts[1:])][args.warmup :]
        peaks[arm].append(peak.mb)

    for r in range(args.rounds):
        for arm in ("harness", "trainer") if r % 2 == 0 else ("trainer", "harness"):  # no arm always first
            run(arm)
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    return {"method": method, "device": name, "times": times, "peaks": peaks}


def trainer(model, exs, enc, total: int, mark, cuda: bool, args) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Mark(TrainerCallback):
        def on_step_begin(self, *_, **__):
            mark()

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            max_steps=total,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=min(30, total // 10),
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=args.precision == "bf16",
            fp16=args.precision == "fp16",
            use_cpu=not cuda,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=0,
        )
        Trainer(
            model=model, args=targs, train_dataset=exs, data_collator=enc.batch, callbacks=[Mark()]
        ).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--device", default="cuda" if _cuda() else "cpu", help="cpu | cuda | cuda:N (default: cuda if any)"
    )
    ap.add_argument(
        "--precision", default=None, help="fp32 | bf16 | fp16 (default: bf16 on CUDA, fp32 on the CPU)"
    )
    ap.add_argument(
        "--batch", type=int, default=None, help="examples per step (default: 32 on CUDA, 1 on the CPU)"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per block (default: 10 on CUDA, 3 on the CPU)"
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each block")
    ap.add_argument("--methods", nargs="+", default=list(EXPERTS), choices=list(EXPERTS))
    ap.add_argument("--rounds", type=int, default=4, help="blocks per arm, in turns")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on the CPU, where a "
        "second thread waits on a shared core; torch's choice with CUDA)",
    )
    ap.add_argument(
        "--estimate",
        default="configs/florence2-base.yaml",
        help="profile whose training time to estimate from the measured step ('' = none)",
    )
    ap.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.batch = args.batch or (32 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 3)
    args.threads = (0 if gpu else 1) if args.threads is None else args.threads
    if args.child:
        return print("RESULT " + json.dumps(child(args.child, args)), flush=True)

    flags = [
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--rounds",
        str(args.rounds),
    ]
    runs = {}
    for method in args.methods:  # one process per expert type: each its own memory
        p = subprocess.run(
            [sys.executable, __file__, "--child", method, *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=dict(os.environ, TQDM_DISABLE="1"),
        )
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"{method} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        runs[method] = json.loads(line[0][7:])
    device = next(iter(runs.values()))["device"]
    memory = "CUDA max allocated" if gpu else "peak RSS above the block's start"
    print(
        f"Florence-2-base shape, random weights, {IMAGE}x{IMAGE} fresh images, feature cache off | {device} "
        f"| {args.precision} | batch {args.batch} | {args.rounds} blocks per arm in turns, each "
        f"{args.warmup} warm-up + {args.steps} timed steps | memory: {memory}"
    )
    print(
        f"{'expert':8} {'arm':8} {'step s':>8} {'ex/s':>8} {'peak MB':>9}   each "
        "block: median step s; peak MB"
    )

    # CPU: the first block of an arm also pays the allocator's first touch; steady state after it
    def peak(r, arm):
        blocks = r["peaks"][arm] if gpu or args.rounds == 1 else r["peaks"][arm][1:]
        return max(blocks)

    for method, r in runs.items():
        for arm in ("harness", "trainer"):
            t = r["times"][arm]
            blocks = [statistics.median(t[i : i + args.steps]) for i in range(0, len(t), args.steps)]
            print(
                f"{method:8} {arm:8} {statistics.median(t):8.3f} {args.batch / statistics.median(t):8.2f} "
                f"{peak(r, arm):9.0f}   {', '.join(f'{b:.3f}' for b in blocks)}; MB "
                f"{', '.join(f'{m:.0f}' for m in r['peaks'][arm])}"
            )
        h, t = (statistics.median(r["times"][a]) for a in ("harness", "trainer"))
        mh, mt = (peak(r, a) for a in ("harness", "trainer"))
        print(
            f"{method}: harness / Trainer examples/s = {t / h:.3f} (target >= 0.95), "
            f"peak memory {mh / mt:.3f}x"
        )
    if args.estimate:
        estimate(args, runs)


def estimate(args, runs) -> None:
    """The profile's expert and interpolation training time on this device, from the measured harness step."""
    from common.config import load_config

    cfg = load_config(str(REPO / args.estimate))
    method = cfg.expert.method if cfg.expert.method in runs else args.methods[0]
    step = statistics.median(runs[method]["times"]["harness"]) * cfg.expert.batch_size / args.batch
    pool = len(cfg.tasks.pool)
    experts = pool * cfg.expert.steps * step
    interp = cfg.interpolate.steps * step * cfg.interpolate.batch_size / cfg.expert.batch_size
    print(
        f"estimate for {args.estimate} ({method}, batch {cfg.expert.batch_size}, from the measured step "
        f"scaled linearly in batch): {pool} experts x {cfg.expert.steps} steps = {experts / 3600:.1f} h, "
        f"interpolation {cfg.interpolate.steps} steps = {interp / 3600:.2f} h (as single-expert steps); the "
        "Fisher, evaluation and data loading from disk not included"
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
