"""Shared fixtures: one micro-profile pipeline run (built offline in a temp dir) that many tests read."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the repo root with this interpreter; output captured as text."""
    cmd = [sys.executable if a == "python" else a for a in args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def make(*targets: str, runs_dir: Path, extra: str = "") -> subprocess.CompletedProcess:
    """`make <targets> PROFILE=micro` writing under runs_dir, with this interpreter (no venv step)."""
    return run("make", *targets, "PROFILE=micro", f"PY={sys.executable}", "STAMP=",
               f"OVERRIDES=runs_dir={runs_dir} {extra}".strip())


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """`make all TARGET=snli-ve` on the micro profile, once per session: (runs_dir, run_dir, make output)."""
    runs = tmp_path_factory.mktemp("runs")
    out = make("all", runs_dir=runs)
    return runs, runs / "micro", out.stdout + out.stderr


@pytest.fixture
def micro_cfg(micro):
    from common.config import load_config

    return load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={micro[0]}"])
