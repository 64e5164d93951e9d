"""One interpolation training step (K experts merged by the fused op, experts + weights trained)
versus one single-expert training step, on the mini profile's backbone shapes.

    python bench/step_bench.py [--config configs/mini.yaml] [--k 3] [--repeats 30] [--threads N]
        [--device cuda]

Both steps are forward + backward + AdamW step on the same batch of the target task; the backbone is
freshly initialised (timing does not need a pre-trained one). Prints medians and their ratio,
measured in one run; and the single-expert step again with the vision tower's features cached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.func import functional_call  # noqa: E402

from common import data  # noqa: E402
from common.backbone import ImageFeatureCache, build_model, build_processor, build_vocab  # noqa: E402
from common.config import load_config  # noqa: E402
from common.expert_types import EXPERT_TYPES  # noqa: E402
from common.experts import attach, group_of  # noqa: E402
from common.merge import ExpertStack  # noqa: E402


def timed(step, repeats: int, warmup: int = 5) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/mini.yaml")
    ap.add_argument("--k", type=int, default=3, help="experts merged (target + top-k)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--task", default="snli-ve")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    texts = [
        t
        for name in data.TASKS
        for e in data.examples(name, "train", cfg.world, 50)
        for t in (e.prompt, e.answer)
    ]
    vocab = build_vocab(texts)
    model, n_img = build_model(cfg.backbone, len(vocab), cfg.world.image_size)
    model.to(args.device)
    enc = data.Encoder(build_processor(vocab, cfg.world.image_size, n_img), args.device)
    batch = enc.batch(data.examples(args.task, "train", cfg.world, cfg.interpolate.batch_size))
    model.requires_grad_(False)

    single = attach(model, cfg.expert)
    single.train()
    params = [p for p in single.parameters() if p.requires_grad]
    experts = [{k: torch.randn_like(v) * 0.02 for k, v in _saved(single).items()} for _ in range(args.k)]
    cached = args.device == "cpu"  # the feature cache steps aside on a GPU
    opt1 = torch.optim.AdamW(params, lr=1e-3)

    def single_step():
        loss = single(**batch).loss
        opt1.zero_grad(set_to_none=True)
        loss.backward()
        opt1.step()

    t_single = timed(single_step, args.repeats)
    if cached:
        ImageFeatureCache(model, 1024)  # feature_cache_mb: the same step, each image's features computed once
        t_cached = timed(single_step, args.repeats)
        del model.model.get_image_features  # the uncached method again, for the interpolation step
    single.unload()  # give the backbone back without LoRA layers

    stack = ExpertStack(
        experts, group_of(cfg.interpolate.groups, EXPERT_TYPES["lora"]), merge="lowrank", trainable=True
    ).to(args.device)
    logits = torch.zeros(len(stack.group_names), args.k, device=args.device, requires_grad=True)
    merged_model = attach(model, cfg.expert, rank_multiplier=args.k)
    merged_model.train()
    opt2 = torch.optim.AdamW(
        [{"params": [logits], "lr": 5e-2}, {"params": list(stack.parameters()), "lr": 1e-3}]
    )

    def interp_step():
        merged = {EXPERT_TYPES["lora"].live(k, "default"): v for k, v in stack(logits).items()}
        loss = functional_call(merged_model, merged, args=(), kwargs=batch).loss
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()

    t_interp = timed(interp_step, args.repeats)
    where = (
        torch.cuda.get_device_name() if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"device {where}, profile {cfg.profile}, task {args.task}, batch {len(batch['labels'])}, K={args.k}, "
        f"groups={cfg.interpolate.groups} ({len(stack.group_names)})"
    )
    print(f"single-expert step       {t_single * 1e3:8.2f} ms (median of {args.repeats})")
    if cached:
        print(
            f"single-expert step, image features cached {t_cached * 1e3:8.2f} ms "
            f"({t_single / t_cached:.2f}x faster)"
        )
    print(f"interpolation step (K={args.k}) {t_interp * 1e3:8.2f} ms")
    print(f"ratio interpolation / single: {t_interp / t_single:.2f}x (target <= 1.3x)")


def _saved(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA tensors under the names peft saves them with."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


if __name__ == "__main__":
    main()
