"""Shared fixtures: one micro-profile pipeline run (built offline in a temp dir) that many tests read.

Under pytest-xdist (`make test` runs two workers) each worker uses one torch thread, and so do the stages
it starts (OMP_NUM_THREADS is inherited); the micro run is built once for all workers, behind a file lock
(`built_once`), and is read-only: a test that changes it works on its own copy (`micro_copy`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the repo root with this interpreter; output captured as text."""
    cmd = [sys.executable if a == "python" else a for a in args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        )
    return p


def stage(script: str, *args: str) -> tuple[int, str, str]:
    """A stage script run in this process, as its command line would run it: (exit code, stdout, stderr).
    For runs that stop early (bad input, --help): no interpreter start-up, so they cost milliseconds."""
    import contextlib
    import importlib
    import io

    from common.stage import run_stage

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_stage(importlib.import_module(script.removesuffix(".py")).main)
                code = 0
            except SystemExit as e:
                code = e.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def inproc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`run("python", SCRIPT, ...)` in this process (stage()): the same exit code and output, without the
    seconds of an interpreter start-up and torch's import."""
    script, *rest = args[1:] if args[0] == "python" else args
    code, out, err = stage(script, *rest)
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(rest)} failed ({code}):\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess([script, *rest], code, out, err)


def stages(
    runs_dir: Path,
    *overrides: str,
    target: str = "snli-ve",
    backbone: bool = False,
    config: str = "configs/micro.yaml",
) -> str:
    """The pipeline `make all` runs, stage by stage in this process (no interpreter start-ups): the pool
    experts, the target's, embed, interpolate, evaluate (and first the backbone stage, with backbone=True).
    Returns their output; a stage that fails fails the test with its message."""
    from common.config import load_config

    args = ("--config", config, "seed=0", f"runs_dir={runs_dir}", *overrides)
    cfg = load_config(config, list(args[3:]))
    calls = [("train_expert.py", "--pretrain")] if backbone else []
    calls += [("train_expert.py", "--task", t) for t in cfg.tasks.pool if t != target]
    calls += [
        ("train_expert.py", "--task", target, "--shots", str(cfg.tasks.target_shots)),
        ("embed_tasks.py", "--target", target),
        ("interpolate.py", "--target", target),
        ("evaluate.py", "--target", target),
    ]
    out = []
    for call in calls:
        code, stdout, stderr = stage(*call, *args)
        if code:
            raise AssertionError(f"{' '.join(call)} failed ({code}): {stderr[-2000:]}")
        out.append(stdout + stderr)
    return "".join(out)


def make(
    *targets: str, runs_dir: Path, extra: str = "", check: bool = True, launch: str = ""
) -> subprocess.CompletedProcess:
    """`make <targets> PROFILE=micro` writing under runs_dir, with this interpreter
    (no venv step); launch: LAUNCH."""
    return run(
        "make",
        *targets,
        "PROFILE=micro",
        f"PY={sys.executable}",
        "STAMP=",
        f"LAUNCH={launch}",
        f"OVERRIDES=runs_dir={runs_dir} {extra}".strip(),
        check=check,
    )


def shared_dir(tmp_path_factory) -> Path:
    """A temp folder all workers of this test session see (one worker: its own base temp)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(shared: Path, name: str, build) -> tuple[Path, str]:
    """build(runs_dir) -> make output, run by the first worker to ask, behind a file lock; later askers (any
    worker) wait for it and share its folder: (runs_dir, output)."""
    runs, log = shared / f"{name}-runs", shared / f"{name}-make.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not log.is_file():
            log.write_text(json.dumps(build(runs)))
    return runs, json.loads(log.read_text())


def cached(folder: Path, expert: str, variant: str = "") -> Path:
    """The cache file of an expert in fisher/ or embeddings/ (named by the expert's name@digest, then the
    variant): the one there is."""
    (found,) = [
        p
        for p in folder.glob(f"{expert}@*{variant}.safetensors")
        if p.name.split("@")[1][8:] == variant + ".safetensors"
    ]
    return found


def make_output(p: subprocess.CompletedProcess) -> str:
    return p.stdout + p.stderr


def build_micro(shared: Path) -> tuple[Path, str]:
    # log_every=0: a progress line per step in the piped output (changes nothing the artifacts are made from)
    return built_once(
        shared, "micro", lambda runs: make_output(make("all", runs_dir=runs, extra="log_every=0"))
    )


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """`make all TARGET=snli-ve` on the micro profile, once for all workers: (runs_dir, run_dir, make output).
    Read-only: use `micro_copy` to change it."""
    runs, out = build_micro(shared_dir(tmp_path_factory))
    return runs, runs / "micro", out


@pytest.fixture
def micro_copy(micro, tmp_path):
    """A private copy of the micro run (mtimes kept, so make sees it as up to date): (runs_dir, run_dir)."""
    runs = tmp_path / "runs"
    shutil.copytree(micro[0], runs, symlinks=True)  # readable names stay links to their artifacts
    return runs, runs / "micro"


def backbone_only(micro, root: Path) -> Path:
    """root as a runs dir holding only the micro run's backbone (for stages after the backbone): its folder
    and the readable link to it."""
    (root / "micro").mkdir(parents=True, exist_ok=True)
    for built in micro[1].glob("backbone@*"):
        shutil.copytree(built, root / "micro" / built.name)
    os.symlink((micro[1] / "backbone").readlink(), root / "micro" / "backbone")
    return root


@pytest.fixture
def micro_cfg(micro):
    from common.config import load_config

    return load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={micro[0]}"])


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory):
    """A tiny random T5 with a word-level tokenizer over the mini world's words,
    saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    from common import data
    from common.backbone import build_vocab
    from common.config import WorldConfig

    texts = [
        t
        for name in ("nli", "paraphrase", "arith")
        for e in data.examples(name, "train", WorldConfig(), 200)
        for t in (e.prompt, e.answer, *data.TASKS[name].candidates)
    ]
    vocab = build_vocab(texts)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(vocab),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    )
    out = tmp_path_factory.mktemp("t5")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def rehearsal(tmp_path_factory) -> Path:
    """The rehearsal's checkpoint and data files (common/rehearsal.py: what `make ... PROFILE=rehearsal`
    builds), built once for all workers: their folder (florence-2-rehearsal/, data/)."""
    from common.rehearsal import build

    shared = shared_dir(tmp_path_factory)
    out = shared / "rehearsal-assets"
    with FileLock(str(shared / "rehearsal.lock")):
        if not out.is_dir():
            build(out)
    return out


def rehearsal_config(assets: Path, *overrides: str):
    """configs/rehearsal.yaml on the assets at `assets`."""
    from common.config import load_config

    return load_config(
        str(REPO / "configs/rehearsal.yaml"),
        [f"backbone.source={assets / 'florence-2-rehearsal'}", f"data.root={assets / 'data'}", *overrides],
    )


HEAVY = {"micro_copy", "runs", "t5_dir"}  # fixtures of tests that run a pipeline or several stages
LONGEST = (
    "test_make_report_runs_every_baseline_and_writes_the_report",  # about 2 min each, started first
    "test_make_all_under_torchrun_equals_the_single_process_run",
)
_background: list[threading.Thread] = []


# the fixtures of a run of the pipeline (the micro run, another expert type's, T5's, the rehearsal's)
PIPELINE = {"micro", "micro_copy", "micro_cfg", "runs", "t5_dir", "rehearsal"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes each; `make test-slow` runs them (CI runs both groups)")
    config.addinivalue_line(
        "markers",
        "pipeline: builds or runs stages (a fixture of PIPELINE, make, the stages in process); "
        "`make test-fast` leaves them out",
    )


def pytest_collection_modifyitems(config, items):
    """The tests that need no micro run first (longest first), while one worker builds it in the background;
    then those that need it, longest first, the short ones filling the gaps at the end."""

    def order(item):
        names = set(getattr(item, "fixturenames", ()))
        longest = item.name in LONGEST
        return ("micro" in names, not (longest or names & HEAVY), not longest)

    items.sort(key=order)  # stable: each group keeps the files' order
    for item in items:
        if PIPELINE & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pipeline)


def pytest_collection_finish(session):
    """Under xdist, worker gw0 starts the micro run in the background as soon as it knows a test needs it:
    both workers run tests that need none of it meanwhile, instead of one waiting on the lock."""
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw0" and any(
        "micro" in getattr(item, "fixturenames", ()) for item in session.items
    ):
        thread = threading.Thread(target=build_micro, args=(Path(session.config.option.basetemp).parent,))
        thread.start()
        _background.append(thread)


def pytest_sessionfinish(session):
    for thread in _background:
        thread.join()
