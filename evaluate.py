"""Stage 4: compare π-Tuning with the baselines on the target's test split
(and its validation split, to choose on).

    .venv/bin/python evaluate.py --target snli-ve

Methods: the zero-shot backbone, the target-only expert, the uniform merge of the experts π-Tuning
used, peft's linear and TIES merges of them (LoRA), and π-Tuning; plus every baseline run of this config that
exists for this target/shots/seed (train_expert.py --variant 2x | full-ft, interpolate.py --variant random |
oracle | frozen | pair-<expert>). Methods are scored on test (`scores`, what the report reports) and those
choices are made among (π-Tuning's runs, target-only, the pair runs: methods.METHODS on_val) on validation too
(`val_scores`), with each example's score, whose mean is the metric (`per_example`, for the report's
paired bootstrap). Writes runs/<profile>/results/<target>-<shots>shot-s<seed>@<digest>.json (with the transfer
of each pair-<expert> run over target-only, on each split), rebuilds <target>.json (this config's results) and
<target>.md (a table per config with results on disk, this config's first; `make all` prints it) and prints
one line. --compare "key=value ..." puts this config's results and another's side by side.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a stage's own process: no garbage collections while the imports load (run_stage)
    gc.disable()

import glob
import shlex
import time

import torch
from peft import PeftModel

from common import data, dist
from common.artifacts import read_json, write_json, write_text
from common.backbone import load_backbone
from common.config import load_config, split_overrides
from common.device import accelerator
from common.errors import UserError
from common.expert_types import EXPERT_TYPES
from common.experts import (
    MergedExpert,
    current_expert,
    expert_dir,
    expert_name,
    folded,
    load_expert,
    load_pool,
    one_shape,
    unload_expert,
)
from common.methods import (
    METHODS,
    NULL,
    PAIR_PREFIX,
    PI,
    TARGET_ONLY,
    interpolations,
    on_val,
    ordered,
    ranked_otherwise,
    row_name,
)
from common.metrics import task_scores
from common.provenance import artifact, config_id, link, made_from, readable
from common.report import (
    INTERVAL,
    config_label,
    load_results,
    mean_sd,
    pack,
    paired_ci,
    scores_of,
    seeds,
    shots_label,
    unpack,
    verdict,
    write_loto,
    write_report,
    write_study,
    write_tables,
)
from common.stage import parse_stage, run_stage, stage_parser


def uniform_merge(cfg, base, experts: list[str]):
    """The same experts merged with equal weights and no training (LoRA: the exact merge at rank k*r)."""
    merge = MergedExpert(base, cfg.expert, load_pool(cfg, experts), "global", trainable=False)
    return merge.export(torch.zeros(1, len(experts))).eval()


def peft_merge(cfg, base, experts: list[str], how: str):
    """peft's own add_weighted_adapter over the same experts, equal weights (linear:
    A and B averaged apart)."""
    model = PeftModel.from_pretrained(base, str(expert_dir(cfg, experts[0])), adapter_name="e0")
    for i, name in enumerate(experts[1:], 1):
        model.load_adapter(str(expert_dir(cfg, name)), adapter_name=f"e{i}")
    names = [f"e{i}" for i in range(len(experts))]
    extra = {"density": 0.5} if how == "ties" else {}
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged", combination_type=how, **extra)
    model.set_adapter("merged")
    return model.eval()


def methods(cfg, run: str, experts: list[str] | None) -> dict:
    """name -> what to load, for every method whose artifacts exist for this run under this config (their
    paths carry its digests; another config's are other paths). experts: π-Tuning's, for the merges of the
    same ones (None: π-Tuning is not needed, as in the transfer row)."""
    out = {}
    for m in METHODS.values():
        if m.loads == "base":
            out[m.name] = ("base", None)
        elif m.trained is not None:  # the target's expert, or a baseline train_expert.py --variant made
            d = expert_dir(cfg, f"{run}.{m.trained}" if m.trained else run)
            if not m.trained or (d / "meta.json").is_file():
                out[m.name] = (m.loads, d)
        # the merges of π-Tuning's experts (π-Tuning chosen on validation may keep the target's alone)
        elif m.variant is None and experts is not None and cfg.evaluate.merges and len(experts) > 1:
            # peft's linear and TIES merges need experts of one rank: a pool of mixed recipes has none
            peft_can = EXPERT_TYPES[cfg.expert.method].peft_merges and one_shape(cfg, experts)
            if not m.loads.startswith("peft-") or peft_can:
                out[m.name] = (m.loads, experts)
    if experts is not None:
        out[PI.name] = ("expert", artifact(cfg, "interpolated", run))
    for d in sorted((cfg.run_dir / "interpolated").glob(f"{glob.escape(run)}.*@*")):
        v = readable(d).name[len(run) + 1 :]
        if v not in interpolations() and not v.startswith(PAIR_PREFIX):
            continue  # a variant this code does not make
        if not d.is_symlink() and d == artifact(cfg, "interpolated", run, v) and (d / "meta.json").is_file():
            out[row_name(v)] = ("expert", d)
    return out


def compare(cfg, target: str, against: list[str]) -> str:
    """This config's results for the target against another's (its overrides on top of this one's), shots by
    shots on the seeds both ran: each method's paired gain (the other minus this) with the hierarchical
    interval (report.paired_ci: both scored the same test examples). Writes
    runs/<profile>/compare-<target>.md."""
    other = load_config(cfg.path, [*cfg.overrides, *split_overrides(against)])
    labels = {"A": config_label(cfg.path, cfg.to_dict()), "B": config_label(cfg.path, other.to_dict())}
    found = {"A": load_results(cfg, target), "B": load_results(other, target)}
    for side, runs in found.items():
        if not runs:
            raise UserError(
                f"no results for {target} under {labels[side]}; make them first (`make report "
                f'TARGET={target} OVERRIDES="{" ".join((cfg if side == "A" else other).overrides)}"`)'
            )
    md = [
        f"# {target}: B against A (test {found['A'][0]['metric']})",
        "",
        f"- A: {labels['A']}",
        f"- B: {labels['B']}",
        "",
        "Gain: B minus A on the same seed, mean ± std over the seeds both ran. " + INTERVAL,
        "",
        "| shots | method | A | B | wins | B − A | 95% interval | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shots in sorted({r["shots"] for r in found["A"]} & {r["shots"] for r in found["B"]}):
        by_seed = {side: {r["seed"]: r for r in runs if r["shots"] == shots} for side, runs in found.items()}
        both = sorted(set(by_seed["A"]) & set(by_seed["B"]))
        pairs = [(by_seed["A"][s], by_seed["B"][s]) for s in both]
        for m in ordered([a for a, _ in pairs]):
            have = [(a, b) for a, b in pairs if m in a["scores"] and m in b["scores"]]
            if not have:
                continue
            gains = [b["scores"][m] - a["scores"][m] for a, b in have]
            each = [(a["per_example"]["test"], b["per_example"]["test"]) for a, b in have]
            ci = (
                paired_ci([{"per_example": {"test": {"A": ea[m], "B": eb[m]}}} for ea, eb in each], "B", "A")
                if all(m in ea and m in eb for ea, eb in each)
                else None
            )
            md.append(
                f"| {shots_label(shots)} | {m} | {mean_sd([a['scores'][m] for a, _ in have])} | "
                f"{mean_sd([b['scores'][m] for _, b in have])} | {sum(g > 0 for g in gains)}/{len(gains)} | "
                f"{mean_sd(gains, signed=True)} | {f'[{ci[0]:+.3f}, {ci[1]:+.3f}]' if ci else '-'} | "
                f"{verdict(ci)} |"
            )
    text = "\n".join(md) + "\n"
    write_text(cfg.run_dir / f"compare-{target}.md", text)
    return text


def main() -> None:
    ap = stage_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--target", help="target task")
    ap.add_argument(
        "--transfer",
        action="store_true",
        help="only target-only and the pair-<expert> runs: write "
        "results/<run>.transfer.json (the transfer matrix row the oracle baseline ranks by)",
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="no evaluation: write runs/<profile>/report.md + PNG "
        "plots from every result of this target made under this config (make report)",
    )
    ap.add_argument(
        "--study",
        nargs="+",
        metavar="TARGET",
        help="no evaluation: write runs/<profile>/study.md over these targets (make study TARGETS=...)",
    )
    ap.add_argument(
        "--loto",
        nargs="+",
        metavar="TARGET",
        help="no evaluation: write runs/<profile>/loto.md over "
        "these targets, each with the rest of the pool (make loto)",
    )
    ap.add_argument(
        "--compare",
        metavar="OVERRIDES",
        help="no evaluation: this config's results for --target "
        "against those of this config with these overrides too ('interpolate.top_k=1 ...'), seed by seed "
        "(make compare AGAINST=...); writes runs/<profile>/compare-<target>.md",
    )
    args, cfg = parse_stage(ap, reads_test=True)
    if args.study:
        for t in args.study:
            data.task(cfg, t, where="--study")
        return print(f"study: {write_study(cfg, args.study)}")
    if args.loto:
        return print(f"every target: {write_loto(cfg, args.loto)}")
    if not args.target:
        raise UserError("evaluate.py: --target is required (or --study TARGET ...)")
    task = data.task(cfg, args.target, where="--target")
    if args.report:
        return print(f"report: {write_report(cfg, args.target)}")
    if args.compare is not None:
        return print(compare(cfg, args.target, shlex.split(args.compare)), end="")
    shots = cfg.tasks.target_shots
    run = expert_name(args.target, shots, cfg.seed)
    experts, ranked_by = None, {}
    if not args.transfer:  # the transfer row needs the target's expert and the pair runs, not π-Tuning's
        interp = artifact(cfg, "interpolated", run)
        fix = f"run `{cfg.command('interpolate.py', '--target', args.target)}` (make does)"
        experts = read_json(interp / "meta.json", "interpolated expert", fix)["experts"]
        sim = artifact(cfg, "similarity", run)  # which embedding ranked an imported expert, where not the own
        if sim.is_file():
            ranked_by = ranked_otherwise(read_json(sim, "similarity", fix), experts, cfg.embed.embedding)
    current_expert(cfg, run)
    splits = {"test": data.split(cfg, args.target, "test"), "val": data.split(cfg, args.target, "val")}
    t0 = time.time()
    todo = methods(cfg, run, experts)
    row_path = artifact(cfg, "transfer", run)
    measured = {}  # the pair runs' scores, when evaluate.py --transfer has measured them (not older)
    if args.transfer:
        todo = {m: v for m, v in todo.items() if m == TARGET_ONLY.name or m.startswith(PAIR_PREFIX)}
    elif row_path.is_file():
        newest = max(
            (d.stat().st_mtime for m, (_, d) in todo.items() if m.startswith(PAIR_PREFIX)), default=0
        )
        row = read_json(row_path, "transfer matrix row", "delete it (make measures it again)")
        if row_path.stat().st_mtime >= newest:
            measured = {
                m: {
                    "test": a,
                    "val": row["val_scores"][m],
                    "each": {s: unpack(e[m]) if m in e else None for s, e in row["per_example"].items()},
                }
                for m, a in scores_of(row).items()
                if m.startswith(PAIR_PREFIX) and m in todo
            }
    todo = {m: v for m, v in todo.items() if m not in measured}

    accel = accelerator(cfg)
    # loaded once; each method's expert goes in and comes out
    base, processor = load_backbone(cfg, accel.device)
    # every method scores the same batches; answers as the checkpoint emits them (its generation config)
    enc = data.Encoder(
        processor, accel.device, keep_mb=cfg.feature_cache_mb, generation=base.generation_config
    )
    data.check_words(cfg, args.target, enc.tok.get_vocab(), *splits.values())
    scores, each, used = {s: {} for s in splits}, {s: {} for s in splits}, {}
    for m, (loads, what) in todo.items():
        if loads == "full":  # a fully fine-tuned copy of the backbone
            model = type(base).from_pretrained(str(what)).eval().to(accel.device)
        elif loads == "expert":
            model = load_expert(base, what)
            used[m] = read_json(what / "meta.json", "expert", "retrain it").get("experts")
        elif loads == "uniform":
            model = uniform_merge(cfg, base, what)
        elif loads.startswith("peft-"):  # peft's add_weighted_adapter: peft-linear, peft-ties
            model = peft_merge(cfg, base, what, loads[len("peft-") :])
        else:
            model = base
        # LoRA, DoRA, IA3: scored with the update in the weights (the same function, faster)
        with folded(model):
            for s, exs in splits.items():
                if s == "val" and not (on_val(m) and cfg.evaluate.validation):
                    continue
                with accel.autocast():
                    metric, scores[s][m], each[s][m] = task_scores(
                        model, enc, task, exs, cfg.evaluate.batch_size
                    )
        if model is not base and loads != "full":
            base = unload_expert(model)
    for m, got in measured.items():
        for s in splits:
            scores[s][m], each[s][m] = got[s], got["each"][s]
    test_scores = scores["test"]
    if not dist.is_main():  # every rank holds the whole accuracies; rank 0 writes them and rebuilds the table
        return

    transfer = {
        s: {
            m[len(PAIR_PREFIX) :]: round(a - sc[TARGET_ONLY.name], 4)
            for m, a in sc.items()
            if m.startswith(PAIR_PREFIX)
        }
        for s, sc in scores.items()
    }
    # pair-null: the row's control, not a pool expert
    control = {s: row.pop(NULL, None) for s, row in transfer.items()}
    result = {
        "target": args.target,
        "run": run,
        "shots": shots,
        "seed": cfg.seed,
        "metric": metric,
        "test_size": len(splits["test"]),
        "val_size": len(splits["val"]),
        "experts": experts,
        **({"ranked_by": ranked_by} if ranked_by else {}),
        "scores": test_scores,
        "val_scores": scores["val"],
        "transfer": transfer["test"],
        "val_transfer": transfer["val"],
        **(
            {"control": control["test"], "val_control": control["val"]} if control["test"] is not None else {}
        ),
        "per_example": {s: {m: pack(e) for m, e in got.items() if e is not None} for s, got in each.items()},
        "experts_by_method": {m: e for m, e in used.items() if e},
        "seconds": round(time.time() - t0, 1),
        "config": cfg.to_dict(),
        "config_id": config_id(cfg),
        "made_from": made_from(cfg, "transfer" if args.transfer else "result", run),
    }
    if args.transfer:
        write_json(row_path, result)
        link(row_path)
        return print(
            f"transfer over target-only ({test_scores[TARGET_ONLY.name]:.3f}): "
            + ", ".join(f"{s} {v:+.3f}" for s, v in sorted(transfer["test"].items(), key=lambda x: -x[1]))
            + (f" | control (pair-{NULL}) {control['test']:+.3f}" if control["test"] is not None else "")
        )
    path = artifact(cfg, "result", run)
    write_json(path, result)
    link(path)
    table = write_tables(cfg, args.target)
    line = ", ".join(f"{m} {test_scores[m]:.3f}" for m in ordered([result]))
    print(
        f"evaluated {run} ({metric}, {len(splits['test'])} test examples): {line}; {time.time() - t0:.0f}s "
        f"-> {table} ({seeds(len(load_results(cfg, args.target)))} under this config)"
    )


if __name__ == "__main__":
    run_stage(main)
