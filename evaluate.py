"""Stage 4: compare π-Tuning with the baselines on the target's test split (and its validation split, to choose on).

    python evaluate.py --target snli-ve

Methods: the zero-shot backbone, the target-only expert, the uniform merge of the experts π-Tuning
used, peft's linear and TIES merges of them (LoRA), and π-Tuning; plus every baseline run that exists
for this target/shots/seed (train_expert.py --variant 2x | full-ft, interpolate.py --variant random |
oracle | frozen | pair-<expert>) and was made under this config (one made under another is left out, named).
Methods are scored on test (`scores`, what the report reports) and those choices are made among (π-Tuning's
runs, target-only, the pair runs: report.METHODS on_val) on validation too (`val_scores`), with each
example's score where the metric is their mean (`per_example`, for the report's paired bootstrap).
Writes runs/<profile>/results/<target>-<shots>shot-s<seed>.json (with the transfer of each pair-<expert>
run over target-only, on each split), rebuilds <target>.json and <target>.md (mean ± std over every result on disk made
under this config; `make all` prints it) and prints one line.
"""
from __future__ import annotations

import gc

if __name__ == "__main__":  # a stage's own process: no garbage collections while the imports load (run_stage)
    gc.disable()

import fcntl
import time

import torch

from common import data, dist
from common.artifacts import read_json, write_json, write_text
from common.backbone import load_backbone
from common.config import (NULL, UserError, changed_fields, interpolated_kind, parse_stage, require_current, run_stage,
                           stage_parser)
from common.device import accelerator
from common.expert_types import EXPERT_TYPES
from common.experts import (MergedExpert, current_expert, expert_dir, expert_name, folded, load_expert, load_pool,
                            unload_expert)
from common.metrics import task_scores
from common.report import load_results, mean_sd, on_val, ordered, pack, scores_of, seeds, shots_label, unpack



def uniform_merge(cfg, base, experts: list[str]):
    """The same experts merged with equal weights and no training (LoRA: the exact merge at rank k*r)."""
    merge = MergedExpert(base, cfg.expert, load_pool(cfg, experts), "global", trainable=False)
    return merge.export(torch.zeros(1, len(experts))).eval()


def peft_merge(cfg, base, experts: list[str], how: str):
    """peft's own add_weighted_adapter over the same experts, equal weights (linear: A and B averaged apart)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(expert_dir(cfg, experts[0])), adapter_name="e0")
    for i, name in enumerate(experts[1:], 1):
        model.load_adapter(str(expert_dir(cfg, name)), adapter_name=f"e{i}")
    names = [f"e{i}" for i in range(len(experts))]
    extra = {"density": 0.5} if how == "ties" else {}
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged", combination_type=how, **extra)
    model.set_adapter("merged")
    return model.eval()


def methods(cfg, run: str, meta: dict) -> tuple[dict, list[str]]:
    """name -> what to load, for every method whose artifacts exist for this run and were made under this
    config; and the baseline runs left out as made under another one."""
    exp, interp = cfg.run_dir / "experts", cfg.run_dir / "interpolated"
    out = {"zero-shot": ("base", None), "target-only": ("expert", expert_dir(cfg, run))}
    found = [(name, "target", exp / f"{run}.{v}") for v, name in (("2x", "target-only-2x"), ("full-ft", "full-ft"))]
    out["uniform-merge"] = ("uniform", meta["experts"])
    if EXPERT_TYPES[cfg.expert.method].peft_merges:
        out["linear-merge"], out["ties-merge"] = ("linear", meta["experts"]), ("ties", meta["experts"])
    out["pi-tuning"] = ("expert", interp / run)
    for d in sorted(interp.glob(f"{run}.*")):
        v = d.name[len(run) + 1:]
        found.append((v if v.startswith("pair-") else f"pi-{v}", interpolated_kind(v), d))
    stale = []
    for name, kind, d in found:
        if not (d / "meta.json").is_file():
            continue
        changed = changed_fields(read_json(d / "meta.json", "baseline run", f"delete {d}").get("config"), cfg, kind)
        if changed:
            stale.append(f"{name} ({changed[0]})")
        else:
            out[name] = ("full" if name == "full-ft" else "expert", d)
    return out, stale


def table(target: str, metric: str, runs: list[dict], left_out: list[str]) -> str:
    """Markdown: one row per method, mean ± std over the seeds evaluated (one seed: its value), per shots
    setting; a last line for the results left out as made under another config."""
    by_shots: dict[int, list[dict]] = {}
    for r in runs:
        by_shots.setdefault(r["shots"], []).append(r)
    lines = [f"| {target} (test {metric}) | " + " | ".join(f"{shots_label(s)} ({seeds(len(rs))})" for s, rs in
                                                     sorted(by_shots.items())) + " |",
             "|---" * (1 + len(by_shots)) + "|"]
    for m in ordered(runs):
        cells = [mean_sd([r["scores"][m] for r in rs if m in r["scores"]]) for _, rs in sorted(by_shots.items())]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if left_out:
        lines += ["", f"Left out, made under another config: {'; '.join(left_out)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = stage_parser(__doc__.split("\n")[0])
    ap.add_argument("--target", help="target task")
    ap.add_argument("--transfer", action="store_true", help="only target-only and the pair-<expert> runs: write "
                    "results/<run>.transfer.json (the transfer matrix row the oracle baseline ranks by)")
    ap.add_argument("--report", action="store_true", help="no evaluation: write runs/<profile>/report.md + PNG "
                    "plots from every result of this target made under this config (make report)")
    ap.add_argument("--study", nargs="+", metavar="TARGET", help="no evaluation: write runs/<profile>/study.md over "
                    "these targets (make study TARGETS=...)")
    args, cfg = parse_stage(ap)
    if args.study:
        from common.report import write_study

        for t in args.study:
            data.task(cfg, t, where="--study")
        return print(f"study: {write_study(cfg, args.study)}")
    if not args.target:
        raise UserError("evaluate.py: --target is required (or --study TARGET ...)")
    task = data.task(cfg, args.target, where="--target")
    if args.report:
        from common.report import write_report

        return print(f"report: {write_report(cfg, args.target)}")
    shots = cfg.tasks.target_shots
    run = expert_name(args.target, shots, cfg.seed)
    interp = cfg.run_dir / "interpolated" / run
    interpolate = f"run `python interpolate.py --target {args.target}` (make reruns what is stale)"
    meta = read_json(interp / "meta.json", "interpolated expert", interpolate)
    require_current(meta.get("config"), cfg, "interpolated", interp, interpolate)
    current_expert(cfg, run)
    splits = {"test": data.split(cfg, args.target, "test"), "val": data.split(cfg, args.target, "val")}
    t0 = time.time()
    todo, stale = methods(cfg, run, meta)
    res_dir = cfg.run_dir / "results"
    row_path = res_dir / f"{run}.transfer.json"
    measured = {}  # the pair runs' scores, when evaluate.py --transfer has measured them (not older, same config)
    if args.transfer:
        todo = {m: v for m, v in todo.items() if m == "target-only" or m.startswith("pair-")}
    elif row_path.is_file():
        newest = max((d.stat().st_mtime for m, (_, d) in todo.items() if m.startswith("pair-")), default=0)
        row = read_json(row_path, "transfer matrix row", "run `evaluate.py --transfer`")
        if row_path.stat().st_mtime >= newest and not changed_fields(row.get("config"), cfg, "result") \
                and "val_scores" in row:  # a row from before the validation split was scored is measured again
            measured = {m: {"test": a, "val": row["val_scores"][m],
                            "each": {s: unpack(e[m]) if m in e else None for s, e in row["per_example"].items()}}
                        for m, a in scores_of(row).items() if m.startswith("pair-") and m in todo}
    todo = {m: v for m, v in todo.items() if m not in measured}

    accel = accelerator(cfg)
    base, processor = load_backbone(cfg, accel.device)  # loaded once; each method's expert goes in and comes out
    enc = data.Encoder(processor, accel.device, keep_mb=cfg.feature_cache_mb)  # every method scores the same batches
    data.check_words(cfg, args.target, enc, *splits.values())
    scores, each, used = {s: {} for s in splits}, {s: {} for s in splits}, {}
    for m, (kind, what) in todo.items():
        if kind == "full":  # a fully fine-tuned copy of the backbone
            model = type(base).from_pretrained(str(what)).eval().to(accel.device)
        elif kind == "expert":
            model = load_expert(base, what)
            used[m] = read_json(what / "meta.json", "expert", "retrain it").get("experts")
        elif kind == "uniform":
            model = uniform_merge(cfg, base, what)
        elif kind in ("linear", "ties"):
            model = peft_merge(cfg, base, what, kind)
        else:
            model = base
        with folded(model):  # LoRA, DoRA, IA3: scored with the update in the weights (the same function, faster)
            for s, exs in splits.items():
                if s == "val" and not on_val(m):
                    continue
                with accel.autocast():
                    metric, scores[s][m], each[s][m] = task_scores(model, enc, task, exs, cfg.evaluate.batch_size)
        if model is not base and kind != "full":
            base = unload_expert(model)
    for m, got in measured.items():
        for s in splits:
            scores[s][m], each[s][m] = got[s], got["each"][s]
    acc = scores["test"]
    if not dist.is_main():  # every rank holds the whole accuracies; rank 0 writes them and rebuilds the table
        return

    transfer = {s: {m[5:]: round(a - sc["target-only"], 4) for m, a in sc.items() if m.startswith("pair-")}
                for s, sc in scores.items()}
    control = {s: row.pop(NULL, None) for s, row in transfer.items()}  # pair-null: the row's control, not a pool expert
    result = {"target": args.target, "run": run, "shots": shots, "seed": cfg.seed, "metric": metric,
              "test_size": len(splits["test"]), "val_size": len(splits["val"]), "experts": meta["experts"],
              "scores": acc, "val_scores": scores["val"], "transfer": transfer["test"], "val_transfer": transfer["val"],
              **({"control": control["test"], "val_control": control["val"]} if control["test"] is not None else {}),
              "per_example": {s: {m: pack(e) for m, e in got.items() if e is not None} for s, got in each.items()},
              "experts_by_method": {m: e for m, e in used.items() if e}, "left_out": stale,
              "seconds": round(time.time() - t0, 1), "config": cfg.to_dict()}
    if args.transfer:
        write_json(row_path, result)
        return print(f"transfer over target-only ({acc['target-only']:.3f}): "
                     + ", ".join(f"{s} {v:+.3f}" for s, v in sorted(transfer["test"].items(), key=lambda x: -x[1]))
                     + (f" | control (pair-{NULL}) {control['test']:+.3f}" if control["test"] is not None else ""))
    write_json(res_dir / f"{run}.json", result)
    with open(res_dir / f".{args.target}.lock", "w") as lock:  # make report evaluates two runs at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs, left_out = load_results(cfg, args.target)  # rebuilt from the results on disk: no stale row
        write_json(res_dir / f"{args.target}.json", {"runs": {r["run"]: r for r in runs}, "left_out": left_out})
        write_text(res_dir / f"{args.target}.md", table(args.target, metric, runs, left_out))
    line = ", ".join(f"{m} {acc[m]:.3f}" for m in ordered([result]))
    note = f"; left out as stale: {', '.join(stale)}" if stale else ""
    print(f"evaluated {run} ({metric}, {len(splits['test'])} test examples): {line}{note}; {time.time() - t0:.0f}s -> "
          f"{res_dir / args.target}.md ({len(runs)} runs)")


if __name__ == "__main__":
    run_stage(main)
