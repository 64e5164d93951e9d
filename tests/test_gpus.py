"""GPUS="...": concurrent jobs hold distinct GPUs (fake ids: only CUDA_VISIBLE_DEVICES is set), and a job that
ends, however it ends, gives its GPU back."""

from __future__ import annotations

import os
import shlex
import sys

from conftest import run


def launcher(locks, gpus: str, *cmd: str) -> list[str]:
    return [sys.executable, "-m", "common.gpus", "--locks", str(locks), gpus, *cmd]


def test_concurrent_jobs_hold_distinct_gpus_and_give_them_back(tmp_path):
    from common.gpus import acquire

    locks = tmp_path / "locks"
    held, fd = acquire(["0"], locks)  # another job holds GPU 0
    inner = shlex.join(
        launcher(locks, "0 1 2", sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
    )
    # the outer job holds its GPU while the inner one, started meanwhile, asks for one
    p = run(*launcher(locks, "0 1 2", "sh", "-c", f"echo $CUDA_VISIBLE_DEVICES; {inner}"))
    assert held == "0" and p.stdout.split() == ["1", "2"]
    os.close(fd)
    p = run(
        *launcher(
            locks,
            "2 1",
            sys.executable,
            "-c",
            "import os, signal; print(os.environ['CUDA_VISIBLE_DEVICES']); "
            "os.kill(os.getpid(), signal.SIGKILL)",
        ),
        check=False,
    )
    assert p.returncode == -9 and p.stdout.split() == ["2"]
    assert acquire(["2"], locks)[0] == "2"  # free again: the kill released it


def test_make_puts_every_stage_behind_the_gpu_lock_and_the_launcher():
    p = run(
        "make",
        "-n",
        "experts",
        "PROFILE=micro",
        f"PY={sys.executable}",
        "STAMP=",
        "GPUS=0 1",
        "LAUNCH=srun --gres=gpu:1",
        "OVERRIDES=runs_dir=/nonexistent-runs",
    )
    stages = [line for line in p.stdout.splitlines() if "train_expert.py" in line]
    assert stages and all(
        f'-m common.gpus --locks /tmp/pi-tuning-gpus "0 1" srun --gres=gpu:1 {sys.executable} '
        f"train_expert.py" in line
        for line in stages
    ), p.stdout
