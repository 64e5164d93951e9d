"""make report: every baseline, the transfer matrix row, and a report with its plots (micro profile)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run


def test_spearman_matches_hand_computed_ranks():
    from common.report import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: x ranks 0, 1.5, 1.5, 3 against y ranks 0, 1, 2, 3
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_make_report_runs_every_baseline_and_writes_the_report(micro, tmp_path):
    import sys

    runs = tmp_path / "runs"
    shutil.copytree(micro[0], runs)  # the session's micro run, so only the study's extra runs train here
    p = run("make", "report", "PROFILE=micro", f"PY={sys.executable}", "STAMP=", "REPORT_SHOTS=8", "REPORT_SEEDS=0",
            "TRANSFER_SHOTS=8", f"OVERRIDES=runs_dir={runs}")
    result = json.loads((runs / "micro/results/snli-ve-8shot-s0.json").read_text())
    assert {"target-only-2x", "full-ft", "linear-merge", "ties-merge", "pi-random", "pi-frozen", "pi-oracle",
            "pair-nli", "pair-shape"} <= set(result["accuracy"]), p.stdout[-2000:]
    assert set(result["transfer"]) == {"nli", "shape"}
    best = max(result["transfer"], key=result["transfer"].get)
    assert result["experts_by_method"]["pi-oracle"][1] == best  # the oracle ranks by measured transfer
    report = (runs / "micro/report.md").read_text()
    assert "| pi-tuning |" in report and "Spearman" in report
    # retrieval's own embedding (micro: the Fisher) and both embeddings computed beside it, each against transfer
    assert (runs / "micro/similarity/snli-ve-8shot-s0.weights.json").is_file()
    for row in ("| 8 | retrieval (fisher) | 1 |", "| 8 | fisher | 1 |", "| 8 | weights | 1 |"):
        assert row in report
    for png in ("accuracy_vs_shots", "similarity", "task_graph", "weights", "transfer_vs_similarity"):
        f = runs / f"micro/report/{png}.png"
        assert f.read_bytes()[:4] == b"\x89PNG" and f"report/{png}.png" in report
    # the pair runs were made together in one process; each equals the same run made alone
    solo = tmp_path / "solo"
    shutil.copytree(runs, solo)
    shutil.rmtree(solo / "micro/interpolated/snli-ve-8shot-s0.pair-shape")
    run("python", "interpolate.py", "--target", "snli-ve", "--variant", "pair-shape", "--config", "configs/micro.yaml",
        "tasks.target_shots=8", "threads=1", f"runs_dir={solo}")  # make report runs one thread per stage
    for d in (runs, solo):
        assert (d / "micro/interpolated/snli-ve-8shot-s0.pair-nli/meta.json").is_file()
    together, alone = (load_file(str(d / "micro/interpolated/snli-ve-8shot-s0.pair-shape/adapter_model.safetensors"))
                       for d in (runs, solo))
    assert together.keys() == alone.keys() and all(torch.equal(together[k], alone[k]) for k in together)
    again = run("make", "report", "PROFILE=micro", f"PY={sys.executable}", "STAMP=", "REPORT_SHOTS=8",
                "REPORT_SEEDS=0", "TRANSFER_SHOTS=8", f"OVERRIDES=runs_dir={runs}")
    assert "interpolate.py" not in again.stdout and "train_expert.py" not in again.stdout  # nothing to redo
