"""Every config error before the first stage, in one line: what a stage would otherwise find only after the
backbone and the pool experts have trained. make runs it once per command;
each stage runs it on what it reads.

    python -m common.checks CONFIG [key=value ...] --targets snli-ve [nli ...] [--shots "32 64"]
    python -m common.checks CONFIG [key=value ...] --pool-targets    # the pool entries with data (make loto)

Checked: the pool's and the targets' task names; the imported experts' folders (or hub ids); a local
backbone.source (missing, empty, not a checkpoint);
each target's shots against its training split; every task read from files (its definition's files, columns
and first row); on the embedded backbone, the words of those tasks against its vocabulary."""

from __future__ import annotations

import json
import sys

from common import data
from common.backbone import backbone_dir, check_source
from common.config import load_config, split_overrides
from common.device import resolve
from common.errors import UserError, cli
from common.imported import adapter_dir


def preflight(
    cfg,
    targets: list[str] = (),
    shots: list[int] | None = None,
    read: list[str] | None = None,
    splits: tuple = ("train", "val", "test"),
    download: bool = False,
) -> None:
    """Raise the first config error a run of these targets (at these shots; default: tasks.target_shots) would
    meet, as one line. read: the tasks whose files to open (None: every pool task's, as make's run reads them;
    a stage by hand checks those it reads), and which splits of them
    (a stage that chooses never opens test)."""
    for t in cfg.tasks.pool:
        if data.has_data(cfg, t):
            data.task(cfg, t, where=f"tasks.pool ({cfg.where('tasks.pool')})")
        if t in cfg.tasks.imported:  # make's checks fetch a hub id, before make asks for its hash
            adapter_dir(cfg, t, download=download)
    for t in targets:
        if t not in cfg.tasks.pool:
            raise UserError(
                f"{cfg.where('tasks.pool')}: target {t!r} is not in tasks.pool "
                f"({', '.join(cfg.tasks.pool)}); pick one of those or add it there"
            )
        if not data.has_data(cfg, t):
            raise UserError(
                f"{cfg.where('tasks.imported')}: target {t!r} is an expert imported without data "
                f"(tasks.imported.{t}); a target trains on its task's shots: pick a task with data"
            )
    check_source(cfg)
    resolve(cfg)  # the device and precision this machine has
    read = [t for t in (cfg.tasks.pool if read is None else read) if data.has_data(cfg, t)]
    files = [t for t in read if not data.from_world(cfg, t)]
    for t in files:  # every split opens: its files, columns and first row
        for which in splits:
            data.split(cfg, t, which)
    for t in targets:
        if cfg.tasks.shots_per_class:  # k of each class: as many as a class has
            continue
        # the mini world's images all differ: the overlap guard leaves its whole train split
        rows = cfg.world.train_size if data.from_world(cfg, t) else data.train_rows(cfg, t)["used"]
        for k in shots or [cfg.tasks.target_shots]:
            if k > rows:
                where = f"REPORT_SHOTS ({k})" if shots else cfg.where("tasks.target_shots")
                raise UserError(
                    f"{where}: field 'tasks.target_shots' is {k}, but {t}'s train split has {rows} examples; "
                    f"use at most {rows} (0 = all of them)"
                )
    if files and cfg.backbone.source == "embedded":
        built = backbone_dir(cfg) / "tokenizer.json"
        vocab = _built_vocab(built) if built.is_file() else data.world_vocabulary(cfg.world)
        for t in files:
            data.check_words(cfg, t, vocab, *(data.split(cfg, t, which) for which in splits))


def _built_vocab(path) -> list[str]:
    return list(json.loads(path.read_text())["model"]["vocab"])


def targets(cfg) -> list[str]:
    """The pool entries that can be a target (make loto's): those with data (an import may have none)."""
    return [t for t in cfg.tasks.pool if data.has_data(cfg, t)]


def main(argv: list[str]) -> None:
    if len(argv) > 1 and argv[-1] == "--pool-targets":
        return print(" ".join(targets(load_config(argv[0], split_overrides(argv[1:-1])))))
    if not argv or "--targets" not in argv:
        raise UserError(
            'usage: python -m common.checks CONFIG [key=value ...] (--targets T [T ...] [--shots "32 64"] | '
            "--pool-targets)"
        )
    at = argv.index("--targets")
    cfg = load_config(argv[0], split_overrides(argv[1:at]))
    rest = argv[at + 1 :]
    shots = None
    if "--shots" in rest:
        i = rest.index("--shots")
        shots, rest = [int(k) for k in rest[i + 1].split()], rest[:i] + rest[i + 2 :]
    preflight(cfg, rest, shots, download=True)


if __name__ == "__main__":
    cli(main, sys.argv[1:])
