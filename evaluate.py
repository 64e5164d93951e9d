"""Stage 4: compare π-Tuning with the baselines on the target's test split.

    python evaluate.py --target snli-ve

Methods: the zero-shot backbone, the target-only (low-shot) expert, the uniform merge of the same
experts π-Tuning used, and π-Tuning. Accuracy by candidate scoring (sum of answer-token log-probs,
argmax). Writes runs/<profile>/results/<target>-<shots>shot-s<seed>.json, updates <target>.json and
<target>.md (mean ± std over all seeds evaluated so far) and prints that table.
"""
from __future__ import annotations

import statistics
import time

import torch

from common import data
from common.artifacts import read_json, write_json, write_text
from common.backbone import load_backbone
from common.config import parse_stage, run_stage, stage_parser
from common.experts import MergedExpert, expert_dir, expert_name, load_expert, load_pool, unload_expert
from common.metrics import task_metric

METHODS = ("zero-shot", "target-only", "uniform-merge", "pi-tuning")


def uniform_merge(cfg, base, experts: list[str]):
    """The same experts merged with equal weights and no training (LoRA: the exact merge at rank k*r)."""
    merge = MergedExpert(base, cfg.expert, load_pool(cfg, experts), "global", trainable=False)
    return merge.export(torch.zeros(1, len(experts))).eval()


def table(target: str, metric: str, runs: dict) -> str:
    """Markdown: one row per method, mean ± std over the seeds evaluated, per shots setting."""
    by_shots: dict[int, list[dict]] = {}
    for r in runs.values():
        by_shots.setdefault(r["shots"], []).append(r)
    lines = [f"| {target} (test {metric}) | " + " | ".join(f"{f'{s}-shot' if s else 'full data'} (n={len(rs)} seeds)" for s, rs in
                                                     sorted(by_shots.items())) + " |",
             "|---" * (1 + len(by_shots)) + "|"]
    for m in METHODS:
        cells = []
        for _, rs in sorted(by_shots.items()):
            vals = [r["accuracy"][m] for r in rs if m in r["accuracy"]]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}" if vals else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = stage_parser(__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="target task")
    args, cfg = parse_stage(ap)
    task = data.task(cfg, args.target, where="--target")
    shots = cfg.tasks.target_shots
    run = expert_name(args.target, shots, cfg.seed)
    interp = cfg.run_dir / "interpolated" / run
    meta = read_json(interp / "meta.json", "interpolated expert", f"run `python interpolate.py --target {args.target}`")
    test = data.split(cfg, args.target, "test")
    t0 = time.time()

    base, processor = load_backbone(cfg)  # loaded once; each method's expert goes in and comes out again
    enc = data.Encoder(processor)
    models = {"zero-shot": lambda: base, "target-only": lambda: load_expert(base, expert_dir(cfg, run)),
              "uniform-merge": lambda: uniform_merge(cfg, base, meta["experts"]),
              "pi-tuning": lambda: load_expert(base, interp)}
    acc = {}
    for m in METHODS:
        model = models[m]()
        metric, acc[m] = task_metric(model, enc, task, test, cfg.evaluate.batch_size)
        if model is not base:
            base = unload_expert(model)

    result = {"target": args.target, "run": run, "shots": shots, "seed": cfg.seed, "metric": metric,
              "test_size": len(test), "experts": meta["experts"], "accuracy": acc,
              "seconds": round(time.time() - t0, 1)}
    res_dir = cfg.run_dir / "results"
    summary_path = res_dir / f"{args.target}.json"
    summary = read_json(summary_path, "results", "delete it") if summary_path.exists() else {"runs": {}}
    summary["runs"][run] = result
    md = table(args.target, metric, summary["runs"])
    write_json(res_dir / f"{run}.json", result)
    write_json(summary_path, summary)
    write_text(res_dir / f"{args.target}.md", md)
    print(md, end="")
    print(f"({metric} on {len(test)} test examples; this run: {run}, experts {', '.join(meta['experts'])}; "
          f"{time.time() - t0:.0f}s -> {res_dir / args.target}.md)")


if __name__ == "__main__":
    run_stage(main)
