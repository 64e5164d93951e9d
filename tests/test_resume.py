"""Long runs: a training stage killed after a checkpoint resumes from it and ends where an uninterrupted run
ends (CPU, one thread: bit-exact); another config's checkpoint is another file, never resumed; without a
terminal a stage prints a progress line per interval."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import backbone_only, run, stage


def test_a_killed_expert_resumes_from_its_checkpoint_and_ends_bit_exact(micro, tmp_path):
    from common.config import load_config
    from common.experts import expert_dir

    common = (
        "--task",
        "nli",
        "--config",
        "configs/micro.yaml",
        "threads=1",
        "expert.steps=10",
        "expert.checkpoint_every=3",
    )
    whole, broken = backbone_only(micro, tmp_path / "whole"), backbone_only(micro, tmp_path / "broken")
    code, _, err = stage("train_expert.py", *common, f"runs_dir={whole}")
    assert code == 0, err
    p = run("python", "train_expert.py", *common, f"runs_dir={broken}", "debug.kill_at_step=7", check=False)
    expert = expert_dir(load_config("configs/micro.yaml", [f"runs_dir={broken}", *common[4:]]), "nli")
    ckpt = expert.with_name(f".{expert.name}.ckpt")
    # killed: nothing half-written, the state kept
    assert p.returncode == -9 and not expert.exists() and ckpt.is_file()

    # another config is another artifact (its own name@digest, its own checkpoint):
    # nothing resumed, this one kept
    code, _, err = stage("train_expert.py", *common, f"runs_dir={broken}", "expert.lr=2e-3")
    assert code == 0 and "resumed" not in err and ckpt.is_file()
    code, _, err = stage("train_expert.py", *common, f"runs_dir={broken}")
    assert code == 0 and "resumed from step 6" in err, err
    assert not ckpt.exists()  # removed once the expert landed
    a, b = (load_file(str(d / "micro/experts/nli/adapter_model.safetensors")) for d in (whole, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [
        json.loads((d / "micro/experts/nli/meta.json").read_text())["final_loss"] for d in (whole, broken)
    ]
    assert losses[0] == losses[1]


def test_a_killed_two_process_expert_resumes_each_ranks_own_state(micro, tmp_path):
    """Under torchrun on two processes, with dropout on (each rank draws its own masks, from its own
    generator): killed after a checkpoint and resumed, each rank restores its own generator's state, and the
    expert ends where the uninterrupted two-process run ends, bit for bit
    (gloo's sum of two ranks is exact in any order)."""
    common = (
        "--task",
        "nli",
        "--config",
        "configs/micro.yaml",
        "threads=1",
        "expert.steps=10",
        "expert.checkpoint_every=3",
        "expert.dropout=0.3",
    )
    launch = (
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train_expert.py",
    )
    whole, broken = backbone_only(micro, tmp_path / "whole"), backbone_only(micro, tmp_path / "broken")
    run(*launch, *common, f"runs_dir={whole}")
    p = run(*launch, *common, f"runs_dir={broken}", "debug.kill_at_step=7", check=False)
    assert p.returncode != 0 and not (broken / "micro/experts/nli").exists()
    p = run(*launch, *common, f"runs_dir={broken}")
    assert "resumed from step 6" in p.stderr, p.stderr
    a, b = (load_file(str(d / "micro/experts/nli/adapter_model.safetensors")) for d in (whole, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_terminal_each_training_stage_prints_progress_lines(micro):
    out = micro[2]  # the micro run's piped `make all`, made with log_every=0 (a line per step)
    for line in (
        "pretrain backbone: step 20/20 | loss",
        "expert nli: step 10/10 | loss",
        "interpolate snli-ve-8shot-s0: step 5/5 | loss",
    ):
        assert line in out, out[-3000:]
    assert "examples/s" in out and "left" in out


def test_log_with_sends_each_step_to_the_tracker_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    from accelerate.tracking import GeneralTracker

    from common import device
    from common.device import fresh
    from common.training import train_steps

    class Recorder(GeneralTracker):  # what accelerate's tensorboard / wandb trackers are handed
        name, requires_logging_directory, main_process_only = "recorder", False, True

        def __init__(self):
            super().__init__()
            self.logged, self.finished = [], 0

        @property
        def tracker(self):
            return self

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

        def finish(self):
            self.finished += 1

    rec, lin = Recorder(), torch.nn.Linear(2, 1)
    batches = iter(lambda: [torch.ones(2)], None)
    train_steps(
        lambda b: lin(b[0]).pow(2).sum(),
        [{"params": list(lin.parameters()), "lr": 0.1}],
        batches,
        4,
        accel=fresh("cpu", "fp32", log_with=[rec]),
    )
    assert [s for s, _ in rec.logged] == [1, 2, 3, 4] and rec.finished == 1
    assert all(set(v) == {"loss", "lr", "examples_per_s"} and v["loss"] > 0 for _, v in rec.logged)
    assert rec.logged[0][1]["lr"] > rec.logged[-1][1]["lr"]  # the schedule's decay, as stepped

    monkeypatch.setitem(device.TRACKERS, "tensorboard", "no_such_tracker_package")
    code, out, err = stage(
        "train_expert.py",
        "--task",
        "nli",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={tmp_path}",
        "log_with=tensorboard",
    )
    assert code == 2 and err.count("\n") == 1 and "field 'log_with' is 'tensorboard'" in err
    assert "pip install no_such_tracker_package" in err and not (tmp_path / "micro").exists()
