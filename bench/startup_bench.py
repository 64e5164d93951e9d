"""A stage process's start-up and exit, with the cyclic garbage collector kept out of the imports' objects
(what every stage script does: common.stage.run_stage) and with it left as Python sets it.

    python bench/startup_bench.py [--rounds 3] [--stage "train_expert.py --task nli"]

Builds the micro profile's backbone in a temp folder, then runs the same stage process both ways, taking turns
(`--rounds` each): as is, and with gc.disable() made a no-op before the script starts, so that run_stage sees
the collector on and leaves it alone. Each process reports when its imports were done and when main()
returned; the bench prints, per way, the median seconds to the end of the imports, of main() and of the
process, and the ratios of the two ways measured in this run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the stage run as `python SCRIPT ARGS` would run it, reporting its imports' end (the first call of main) and
# main's end on the pipe MARKS; GC=on makes the script's gc.disable() a no-op
RUNNER = """
import gc, os, runpy, sys, time
if os.environ["GC"] == "on":
    gc.disable = lambda: None
else:  # what the script's first lines do, before its imports (common.stage's among them)
    gc.disable()
import common.stage as stage
MARKS = int(os.environ["MARKS"])
run_stage = stage.run_stage
def timed_run_stage(main):
    def timed_main():
        os.write(MARKS, b"imports %.6f\\n" % time.time())
        main()
        os.write(MARKS, b"main %.6f\\n" % time.time())
    run_stage(timed_main)
stage.run_stage = timed_run_stage
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def one(cmd: list[str], gc_mode: str) -> dict[str, float]:
    read, write = os.pipe()
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-c", RUNNER, *cmd],
        cwd=REPO,
        pass_fds=(write,),
        capture_output=True,
        text=True,
        env={**os.environ, "GC": gc_mode, "MARKS": str(write), "OMP_NUM_THREADS": "1"},
    )
    end = time.time()
    os.close(write)
    with os.fdopen(read) as f:
        marks = dict(line.split() for line in f)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return {"imports": float(marks["imports"]) - t0, "main": float(marks["main"]) - t0, "process": end - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stage", default="train_expert.py --task nli", help="the stage and its arguments")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--config", "configs/micro.yaml", f"runs_dir={tmp}", "threads=1"]
        one(["train_expert.py", "--pretrain", *base], "off")
        cmd = [*shlex.split(args.stage), *base]
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for mode in runs:
                runs[mode].append(one(cmd, mode))
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    print(
        f"{args.stage} on the micro profile, one thread, median of {args.rounds} processes each way (seconds)"
    )
    print(f"{'':34} {'imports done':>12} {'main done':>10} {'exited':>8}")
    for mode, label in (("on", "collector as Python sets it"), ("off", "imports frozen (run_stage)")):
        m = med[mode]
        print(f"{label:34} {m['imports']:12.2f} {m['main']:10.2f} {m['process']:8.2f}")
    on, off = med["on"], med["off"]
    print(
        f"ratio frozen / as set: imports {off['imports'] / on['imports']:.2f}, "
        f"exit (process - main) {(off['process'] - off['main']) / (on['process'] - on['main']):.2f}, "
        f"whole process {off['process'] / on['process']:.2f}"
    )


if __name__ == "__main__":
    main()
