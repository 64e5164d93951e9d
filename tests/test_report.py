"""make report: every baseline, the transfer matrix row, and a report with its plots (micro profile)."""

from __future__ import annotations

import json
import math
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from common.report import pack, paired_ci, unpack
from conftest import cached, inproc, run

# the default leaves out the three that compute the pool's Fishers anew
EVERY_EMBEDDING = (
    "EMBED_AS=fisher weights prototypes fisher-batch fisher-raw fisher-passes fisher-common fisher-model"
)


def test_spearman_matches_hand_computed_ranks():
    from common.report import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: x ranks 0, 1.5, 1.5, 3 against y ranks 0, 1, 2, 3
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_paired_bootstrap_interval_holds_the_gain_and_says_tie_for_noise():
    """Two methods scored on the same examples over seeds: the interval of a clear gain excludes 0, that of
    no real difference holds it, identical predictions give [0, 0]; the same results, the same interval."""
    from common.report import verdict

    rng = random.Random(0)
    base = [[float(rng.random() < 0.6) for _ in range(2000)] for _ in range(5)]

    def run_of(seed, p_gain):  # right where base was, and some more
        better = [1.0 if rng.random() < p_gain else b for b in base[seed]]
        return {"per_example": {"test": {"a": pack(better), "b": pack(base[seed]), "c": pack(base[seed])}}}

    clear = [run_of(s, 0.05) for s in range(5)]  # about +0.02
    lo, hi = paired_ci(clear, "a", "b")
    assert 0 < lo < 0.02 < hi < 0.04 and verdict((lo, hi)) == "win"
    assert paired_ci(clear, "a", "b") == (lo, hi)
    assert paired_ci(clear, "b", "c") == (0.0, 0.0)
    noise = [
        {
            "per_example": {
                "test": {
                    "a": pack([float(rng.random() < 0.6) for _ in range(400)]),
                    "b": pack([float(rng.random() < 0.6) for _ in range(400)]),
                }
            }
        }
        for _ in range(5)
    ]
    lo, hi = paired_ci(noise, "a", "b")
    assert lo < 0 < hi and verdict((lo, hi)) == "tie" and verdict((-0.02, -0.01)) == "loss"
    assert paired_ci(clear + [{"per_example": {}}], "a", "b") is None  # a run without them: no interval
    # one seed: its variance is unknown
    assert paired_ci(clear[:1], "a", "b") is None and verdict(None) == "-"
    assert unpack(pack([1.0, 0.0, 1.0])) == [1.0, 0.0, 1.0] and pack([0.5, 1.0]) == [0.5, 1.0]


def test_the_interval_covers_the_true_gain_95_percent_of_the_time_where_seeds_share_the_test_examples():
    """Simulated studies of this design: every seed scores the same test examples, so an example that favours
    one method does so in every seed (example effects shared across seeds), seeds differ by an effect of their
    own, and each seed and example by their interaction. The hierarchical interval covers the known true gain
    in 92-98% of 300 studies; the interval that resampled each seed's examples on their own (before
    2026-12-05) divided the shared example variance by the number of seeds and covers it far less often."""
    import numpy as np

    from common.report import hierarchical_interval

    def old_interval(d, rng, draws=1000):
        means = np.stack([x[rng.integers(0, len(x), (draws, len(x)))].mean(1) for x in d])  # seeds x draws
        picked = rng.integers(0, len(d), (draws, len(d)))
        return np.quantile(means[picked, np.arange(draws)[:, None]].mean(1), [0.025, 0.975])

    gain, examples, seeds = 0.01, 500, 5
    rng = np.random.default_rng(0)
    new = old = 0
    for study in range(300):
        d = (
            gain
            + rng.normal(0, 0.1, examples)[None]
            + rng.normal(0, 0.003, seeds)[:, None]
            + rng.normal(0, 0.05, (seeds, examples))
        )
        lo, hi = hierarchical_interval(d, seed=study)
        new += lo <= gain <= hi
        lo, hi = old_interval(d, rng)
        old += lo <= gain <= hi
    assert 0.92 <= new / 300 <= 0.98, new / 300
    assert old / 300 < 0.90, old / 300


def test_students_t_quantiles_match_the_tables():
    from common.report import t_quantile

    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (math.inf, 1.960)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-3)


def test_make_report_runs_every_baseline_and_writes_the_report(micro_copy, tmp_path):
    import sys

    runs = micro_copy[0]  # the session's micro run, so only the study's extra runs train here
    p = run(
        "make",
        "report",
        "PROFILE=micro",
        f"PY={sys.executable}",
        "STAMP=",
        "REPORT_SHOTS=8",
        "REPORT_SEEDS=0",
        "TRANSFER_SHOTS=8",
        EVERY_EMBEDDING,
        f"OVERRIDES=runs_dir={runs}",
    )
    result = json.loads((runs / "micro/results/snli-ve-8shot-s0.json").read_text())
    assert {
        "target-only-2x",
        "full-ft",
        "linear-merge",
        "ties-merge",
        "pi-random",
        "pi-frozen",
        "pi-oracle",
        "pair-nli",
        "pair-shape",
    } <= set(result["scores"]), p.stdout[-2000:]
    assert set(result["transfer"]) == {"nli", "shape"}
    best = max(result["transfer"], key=result["transfer"].get)
    assert result["experts_by_method"]["pi-oracle"][1] == best  # the oracle ranks by measured transfer
    report = (runs / "micro/report.md").read_text()
    assert "| pi-tuning |" in report and "Spearman" in report
    # retrieval's own embedding (micro: the Fisher) and both embeddings computed beside it,
    # each against transfer
    assert (runs / "micro/similarity/snli-ve-8shot-s0.weights.json").is_file()
    # and the retrieval study's Fisher variants: the original's batch estimator (its own cache beside the
    # per-sample one), raw values, and subsets of the tensors
    fisher = runs / "micro/fisher"
    for expert, variant in (
        ("snli-ve-8shot-s0", ".batch"),
        ("snli-ve-8shot-s0", ""),
        ("snli-ve-8shot-s0", ".passes4"),
        ("snli-ve-8shot-s0", ".at-pool-mean"),
        ("nli", ".model-answers"),
    ):
        assert cached(fisher, expert, variant).is_file()
    for emb in (
        "retrieval (fisher)",
        "fisher",
        "weights",
        "prototypes",
        "fisher-batch",
        "fisher-raw",
        "fisher-passes",
        "fisher-common",
        "fisher-model",
        "fisher: lora_A only",
        "fisher: decoder only",
    ):
        assert f"| 8 | {emb} | val | 1 |" in report and f"| 8 | {emb} | test | 1 |" in report
    # the methods choices are made among scored on validation too, each example's score kept (their mean is
    # the score), and the paired gains given an interval
    assert set(result["val_scores"]) == {
        "target-only",
        "pi-tuning",
        "pi-random",
        "pi-frozen",
        "pair-nli",
        "pair-shape",
        "pair-null",
    }
    # the row's control (an expert that adds nothing) is measured beside it and shown, not ranked as an expert
    assert result["control"] == pytest.approx(
        result["scores"]["pair-null"] - result["scores"]["target-only"], abs=1e-4
    )
    assert "| control: `pair-null`, nothing added |" in report
    assert set(result["val_transfer"]) == {"nli", "shape"}
    for split, key in (("test", "scores"), ("val", "val_scores")):
        each = result["per_example"][split]
        assert set(each) == set(result[key]) and len(each["pi-tuning"]) == result[f"{split}_size"]
        assert all(sum(unpack(each[m])) / len(each[m]) == pytest.approx(result[key][m]) for m in each)
    assert re.search(r"\| 8 \| target-only \| \d/1 \| [-+.\d]+ \| - \| - \|", report)  # one seed: no interval
    for png in ("accuracy_vs_shots", "similarity", "task_graph", "weights", "transfer_vs_similarity"):
        f = runs / f"micro/report/{png}.png"
        assert f.read_bytes()[:4] == b"\x89PNG" and f"report/{png}.png" in report
    # the pair runs, π-Tuning with random and frozen, 2x with full-ft were made together in one process each;
    # each run equals the same run made alone
    solo = tmp_path / "solo"
    shutil.copytree(runs, solo, symlinks=True)
    args = ("--config", "configs/micro.yaml", "tasks.target_shots=8", "threads=1", f"runs_dir={solo}")  # one
    alone = {
        "interpolated/snli-ve-8shot-s0.pair-shape": (
            "interpolate.py",
            "--target",
            "snli-ve",
            "--variant",
            "pair-shape",
        ),  # thread per stage, as make report
        "interpolated/snli-ve-8shot-s0.frozen": (
            "interpolate.py",
            "--target",
            "snli-ve",
            "--variant",
            "frozen",
        ),
        "experts/snli-ve-8shot-s0.full-ft": (
            "train_expert.py",
            "--task",
            "snli-ve",
            "--shots",
            "8",
            "--variant",
            "full-ft",
        ),
    }
    for d, cmd in alone.items():
        shutil.rmtree((solo / "micro" / d).resolve())  # the artifact its readable name links to
        inproc(*cmd, *args)
        weights = [next((r / "micro" / d).glob("*.safetensors")) for r in (runs, solo)]
        together, made_alone = (load_file(str(f)) for f in weights)
        assert together.keys() == made_alone.keys() and all(
            torch.equal(together[k], made_alone[k]) for k in together
        ), d
    again = run(
        "make",
        "-n",
        "report",
        "PROFILE=micro",
        f"PY={sys.executable}",
        "STAMP=",
        "REPORT_SHOTS=8",
        "REPORT_SEEDS=0",
        "TRANSFER_SHOTS=8",
        EVERY_EMBEDDING,
        f"OVERRIDES=runs_dir={runs}",
    )
    assert "interpolate.py" not in again.stdout and "train_expert.py" not in again.stdout  # nothing to redo

    # the study over two targets, one config: snli-ve's runs are those above (nothing redone), nli's are made
    p = run(
        "make",
        "study",
        "PROFILE=micro",
        f"PY={sys.executable}",
        "STAMP=",
        "TARGETS=snli-ve nli",
        "REPORT_SHOTS=8",
        "REPORT_SEEDS=0",
        "TRANSFER_SHOTS=8",
        f"OVERRIDES=runs_dir={runs}",
    )
    assert "--task snli-ve --shots 8" not in p.stdout and "--target nli" in p.stdout, p.stdout[-3000:]
    nli = json.loads((runs / "micro/results/nli-8shot-s0.json").read_text())
    assert set(nli["transfer"]) == {"snli-ve", "shape"} and "pi-random" in nli["scores"]
    study = (runs / "micro/study.md").read_text()
    for t in ("snli-ve", "nli"):
        assert f"| {t} | 8-shot | target-only | " in study and f"| {t} | 8-shot | pi-random | " in study
        assert f"| {t} | 8-shot | prototypes | " in study and (runs / f"micro/study/{t}.md").is_file()
        assert (
            runs / f"micro/study/{t}/accuracy_vs_shots.png"
        ).is_file() and f"({t}/accuracy_vs_shots.png)" in (runs / f"micro/study/{t}.md").read_text()
    assert re.search(r"\| fisher-common \| 2 \| [-+.\d]+ \| [-+.\d]+ \| [.\d]+ \|", study)
    assert "Best on validation: **" in study
    assert (runs / "micro/study/transfer_matrix.png").read_bytes()[:4] == b"\x89PNG"

    # a target at its ceiling: every transfer the same, no ranking to correlate with: said so, not "+nan"
    from common.config import load_config
    from common.report import write_report, write_study

    path = runs / "micro/results/snli-ve-8shot-s0.json"
    flat = json.loads(path.read_text())
    flat["transfer"] = flat["val_transfer"] = {n: 0.0 for n in flat["transfer"]}
    path.write_text(json.dumps(flat))
    write_report(load_config("configs/micro.yaml", [f"runs_dir={runs}"]), "snli-ve")
    report = (runs / "micro/report.md").read_text()
    assert (
        "| 8 | weights | val | 0 of 1 | - | undefined |" in report and "Undefined: every transfer" in report
    )
    assert "nan" not in report
    # and in the study beside a target with a ranking: that one alone is averaged across targets
    write_study(load_config("configs/micro.yaml", [f"runs_dir={runs}"]), ["snli-ve", "nli"])
    study = (runs / "micro/study.md").read_text()
    assert (
        "| snli-ve | 8-shot | weights | undefined | undefined | - |" in study
        and "to snli-ve was the same" in study
    )
    assert re.search(r"\| weights \| 1 \| [-+.\d]+ \| [-+.\d]+ \| [.\d]+ \|", study) and "nan" not in study

    # the pool grows by a task: its expert, the retrieval and π-Tuning's runs are made again, and of the
    # transfer row only the new pair run; the others, made from the same two experts as before,
    # stay and count in the row
    pair = "micro/interpolated/snli-ve-8shot-s0.pair-{}/meta.json"
    before = {t: (runs / pair.format(t)).stat().st_mtime_ns for t in ("nli", "shape", "null")}
    p = run(
        "make",
        "report",
        "PROFILE=micro",
        f"PY={sys.executable}",
        "STAMP=",
        "REPORT_SHOTS=8",
        "REPORT_SEEDS=0",
        "TRANSFER_SHOTS=8",
        f"OVERRIDES=runs_dir={runs} tasks.pool=[snli-ve,nli,shape,colour]",
    )
    assert "train_expert.py --task colour" in p.stdout and "--variant pairs " in p.stdout, p.stdout[-3000:]
    assert "interpolated snli-ve-8shot-s0.pair-colour@" in p.stdout and "pair-nli@" not in p.stdout
    assert {t: (runs / pair.format(t)).stat().st_mtime_ns for t in before} == before
    grown = json.loads(path.read_text())
    assert set(grown["transfer"]) == {"nli", "shape", "colour"}


def test_the_transfer_row_names_the_experts_that_hurt_and_the_spread_against_target_onlys_noise():
    from common.report import transfer_row

    def run(seed, base, transfer):
        return {
            "shots": 64,
            "seed": seed,
            "scores": {"target-only": base},
            "transfer": transfer,
            "control": 0.001,
        }

    runs = [
        run(0, 0.60, {"helps": 0.020, "hurts": -0.010, "noisy": -0.020, "flat": 0.0}),
        run(1, 0.62, {"helps": 0.030, "hurts": -0.014, "noisy": 0.030, "flat": 0.0}),
        run(2, 0.64, {"helps": 0.025, "hurts": -0.012, "noisy": -0.060, "flat": 0.0}),
    ]
    row = transfer_row(runs)
    # target-only's seed std 0.020; best helps +0.025, worst noisy -0.017 (its std 0.045): spread
    # 0.042 = 2.1x; only 'hurts' is below 0 by more than its std ('noisy' is lower on average,
    # but inside its noise)
    assert row == (
        "| 64-shot | 3 | 0.020 | +0.001 ± 0.000 | helps +0.025 ± 0.005 | noisy -0.017 ± 0.045 | "
        "0.042 (2.1x) | hurts -0.012 ± 0.002 |"
    )
    assert transfer_row(runs[:1]) == "" and transfer_row([{**r, "transfer": {}} for r in runs]) == ""
    nothing = [{**r, "transfer": {"flat": 0.0}} for r in runs]
    assert transfer_row(nothing).endswith("| 0.000 (0.0x) | none |")


def test_a_gain_is_printed_with_its_sign_either_way():
    from common.report import _against

    def run(pi, base):
        return {"scores": {"pi-tuning": pi, "target-only": base}}

    assert _against([run(0.62, 0.61), run(0.63, 0.62)], "target-only") == "2/2 | +0.010 ± 0.000 | - | -"
    assert _against([run(0.60, 0.61), run(0.61, 0.62)], "target-only") == "0/2 | -0.010 ± 0.000 | - | -"


def test_a_scored_method_the_list_lacks_is_shown_after_the_listed_ones_not_hidden():
    from common.methods import _METHODS, METHODS, ordered
    from common.report import table

    runs = [{"shots": 8, "scores": {"pi-tuning": 0.6, "pi-mine": 0.7, "zero-shot": 0.3, "pair-nli": 0.5}}]
    assert ordered(runs) == ["zero-shot", "pi-tuning", "pi-mine"]  # pair- runs feed the transfer matrix
    rows = [line.split(" | ")[0].strip("| ") for line in table("snli-ve", "accuracy", runs).splitlines()[2:]]
    assert rows[:3] == ["zero-shot", "pi-tuning", "pi-mine"]
    assert len(METHODS) == len(_METHODS)  # no two methods of one name


def test_results_name_their_scores_by_the_metric_and_older_files_still_read():
    from common.report import scores_of

    assert scores_of({"metric": "cider", "scores": {"pi-tuning": 0.9}}) == {"pi-tuning": 0.9}
    # before 2026-12
    assert scores_of({"metric": "vqa_accuracy", "accuracy": {"pi-tuning": 0.4}}) == {"pi-tuning": 0.4}


def test_the_report_matches_run_names_exactly_so_seed_1_is_not_seed_10(tmp_path):
    """With 11 seeds, run ...-s1's similarity files are its own: ...-s10.json is seed 10's, not an embedding
    of seed 1's named ''."""
    from common.config import load_config
    from common.embeddings import recorded
    from common.provenance import artifact
    from common.report import _similarities

    cfg = load_config("configs/micro.yaml", [f"runs_dir={tmp_path}"])
    (cfg.run_dir / "similarity").mkdir(parents=True)
    runs = []
    for seed in range(11):
        run = f"snli-ve-8shot-s{seed}"
        artifact(cfg, "similarity", run).write_text(
            json.dumps(
                {
                    "names": [run, "nli", "shape"],
                    "row": [1.0, seed / 10, -seed / 10],
                    "embed": recorded(cfg.embed),
                    "config": cfg.to_dict(),
                }
            )
        )
        runs.append({"run": run, "seed": seed})
    sims = _similarities(cfg, runs)
    assert list(sims) == ["retrieval (fisher)"]
    assert sims["retrieval (fisher)"]["snli-ve-8shot-s1"] == {
        "snli-ve-8shot-s1": 1.0,
        "nli": 0.1,
        "shape": -0.1,
    }
    assert sims["retrieval (fisher)"]["snli-ve-8shot-s10"] == {
        "snli-ve-8shot-s10": 1.0,
        "nli": 1.0,
        "shape": -1.0,
    }


def test_a_one_seed_table_shows_the_value_without_a_spread():
    from common.report import table

    runs = [{"shots": 8, "scores": {"target-only": 0.6, "pi-tuning": 0.625}}]
    text = table("snli-ve", "accuracy", runs)
    assert "| 8-shot (1 seed) |" in text and "| pi-tuning | 0.625 |" in text and "±" not in text
    two = table(
        "snli-ve", "accuracy", runs + [{"shots": 8, "scores": {"target-only": 0.62, "pi-tuning": 0.635}}]
    )
    assert "| 8-shot (2 seeds) |" in two and "| pi-tuning | 0.630 ± 0.007 |" in two


def test_a_default_chosen_without_the_target_never_reads_the_target(monkeypatch):
    """Leave one target out on validation: each target's row is chosen from the other targets' validation
    gains alone. Target c favours `fisher top-1` hugely; that decides a's and b's rows, never c's own."""
    from types import SimpleNamespace

    from common import report
    from common.embeddings import ALONE

    def meta(val_alone, weights, fisher):
        return {
            "candidates": [
                {"experts": [], "by": [ALONE], "val": val_alone},
                {"experts": ["x", "y"], "by": ["weights top-2"], "val": val_alone + weights},
                {"experts": ["z"], "by": ["fisher top-1"], "val": val_alone + fisher},
            ]
        }

    metas = {
        "a-s0": meta(0.5, 0.01, 0.0),
        "a-s1": meta(0.6, 0.03, -0.01),
        "b-s0": meta(0.4, 0.02, 0.0),
        "c-s0": meta(0.7, -0.01, 0.2),
    }
    monkeypatch.setattr(report, "_selection", lambda cfg, run: metas.get(run))
    cfg = SimpleNamespace(
        embed=SimpleNamespace(embedding="weights"),
        interpolate=SimpleNamespace(top_k=2, retrieval="fixed", experts=[]),
    )
    at = {t: [{"run": r} for r in metas if r.startswith(t)] for t in "abc"}
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")[1:3]
        for line in report.default_without_target(cfg, at)
        if line.startswith("| ") and not line.startswith("| target")
    }
    assert rows["c"] == ["weights top-2", "+0.0200"]  # (a's mean 0.02 + b's 0.02) / 2: c's own -0.01 unread
    # c's 0.2 decides theirs
    assert rows["a"] == ["fisher top-1", "+0.1000"] and rows["b"][0] == "fisher top-1"
    metas["c-s0"] = meta(0.7, -0.05, -0.5)  # on b and c together every retrieval hurts: a's default is k = 0
    rows = [line for line in report.default_without_target(cfg, at) if line.startswith("| a |")]
    assert rows == [f"| a | {ALONE} | +0.0000 | -0.0150 |"]
