"""Long runs: a training stage killed after a checkpoint resumes from it and ends where an uninterrupted run
ends (CPU, one thread: bit-exact); a checkpoint made under another config is not resumed; without a terminal
a stage prints a progress line per interval."""
from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from conftest import backbone_only, run, stage


def test_a_killed_expert_resumes_from_its_checkpoint_and_ends_bit_exact(micro, tmp_path):
    common = ("--task", "nli", "--config", "configs/micro.yaml", "threads=1", "expert.steps=10",
              "expert.checkpoint_every=3")
    whole, broken = backbone_only(micro, tmp_path / "whole"), backbone_only(micro, tmp_path / "broken")
    code, _, err = stage("train_expert.py", *common, f"runs_dir={whole}")
    assert code == 0, err
    p = run("python", "train_expert.py", *common, f"runs_dir={broken}", "debug.kill_at_step=7", check=False)
    expert, ckpt = broken / "micro/experts/nli", broken / "micro/experts/.nli.ckpt"
    assert p.returncode == -9 and not expert.exists() and ckpt.is_file()  # killed: nothing half-written, the state kept
    kept = ckpt.read_bytes()

    code, _, err = stage("train_expert.py", *common, f"runs_dir={broken}", "expert.lr=2e-3")
    assert code == 0 and "made under another config (expert.lr: 0.001 -> 0.002)" in err and "starting at step 0" in err
    shutil.rmtree(expert)
    ckpt.write_bytes(kept)
    code, _, err = stage("train_expert.py", *common, f"runs_dir={broken}")
    assert code == 0 and "resumed from step 6" in err, err
    assert not ckpt.exists()  # removed once the expert landed
    a, b = (load_file(str(d / "micro/experts/nli/adapter_model.safetensors")) for d in (whole, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads((d / "micro/experts/nli/meta.json").read_text())["final_loss"] for d in (whole, broken)]
    assert losses[0] == losses[1]


def test_without_a_terminal_each_training_stage_prints_progress_lines(micro):
    out = micro[2]  # the micro run's piped `make all`, made with log_every=0 (a line per step)
    for line in ("pretrain backbone: step 20/20 | loss", "expert nli: step 10/10 | loss",
                 "interpolate snli-ve-8shot-s0: step 5/5 | loss"):
        assert line in out, out[-3000:]
    assert "examples/s" in out and "left" in out
