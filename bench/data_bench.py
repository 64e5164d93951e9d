"""Real-size data: time to an expert's first training step, and the stage's peak RSS, on generated OFA SNLI-VE
TSVs (base64 PNG images, the mini world's scenes and words) of 20,000 and 200,000 training
rows, micro backbone.

    python bench/data_bench.py                    # rows 20000 200000; about 2 min here
    python bench/data_bench.py --rows 2000 20000  # smaller

Each size runs the stage twice: the first run indexes the TSV (one pass over the file), the second opens the
cached index. Printed per run: seconds from the process start to the first step's progress line, and the
peak RSS (sampled every 20 ms); last, the ratio of the largest size's peak RSS to the smallest's (the target:
within 1.10, i.e. the memory does not grow with the split)."""

from __future__ import annotations

import argparse
import base64
import io
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_tsvs(root: Path, rows: int) -> int:
    """OFA's snli_ve_data/snli_ve_{train,dev,test}.tsv: id, image id, base64 image,
    hypothesis, caption, label."""
    from PIL import Image

    from common import world as W

    rng, lines = random.Random(0), []
    labels = {"yes": "entailment", "no": "contradiction", "maybe": "neutral"}
    for i in range(64):  # 64 distinct rows, cycled with their own ids
        scene = W.random_scene(rng)
        hyp, label = W.hypothesis(scene, rng)
        buf = io.BytesIO()
        Image.fromarray(W.render(scene, 64, rng)).save(buf, format="PNG")
        lines.append(
            f"\t{i}\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}\t{hyp}\t{W.describe(scene)}"
            f"\t{labels[label]}\n"
        )
    d = root / "snli_ve_data"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("dev", 200), ("test", 200)):
        with open(d / f"snli_ve_{split}.tsv", "w") as fh:
            for i in range(n):
                fh.write(f"{i}{lines[i % 64]}")
    return (d / "snli_ve_train.tsv").stat().st_size


def measure(args: list[str]) -> tuple[float, float, float]:
    """(seconds to the first step's line, seconds in all, peak RSS in MB) of one stage process."""
    t0 = time.time()
    p = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc, peak, first = psutil.Process(p.pid), 0, None
    import threading

    err = []

    def watch():
        nonlocal first
        for line in p.stderr:
            err.append(line)
            if first is None and ": step 1/" in line:
                first = time.time() - t0

    reader = threading.Thread(target=watch)
    reader.start()
    while p.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    reader.join()
    if p.returncode:
        sys.exit(f"stage failed ({p.returncode}):\n{''.join(err)[-2000:]}")
    return first or float("nan"), time.time() - t0, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--dir", help="work folder (default: a temp one, removed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dir or tmp)
        common = ["--config", "configs/micro.yaml", f"runs_dir={work / 'runs'}", "threads=1"]
        subprocess.run(
            [sys.executable, "train_expert.py", "--pretrain", *common],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        print(
            f"{'rows':>8} {'TSV MB':>7} {'run':>13} {'to 1st step s':>14} {'stage s':>8} {'peak RSS MB':>12}"
        )
        peaks = {}
        for rows in args.rows:
            data = work / f"data{rows}"
            size = write_tsvs(data, rows)
            stage = [
                "train_expert.py",
                "--task",
                "snli-ve",
                *common,
                "data.source=files",
                f"data.root={data}",
                "tasks.pool=[snli-ve,vqa]",  # the paper's tasks (micro's pool is the mini world's)
                "interpolate.top_k=1",
                "data.exclude_scored_images=false",  # the guard's own cost: bench/overlap_bench.py
                "expert.steps=1",
                "expert.eval_size=16",
                "log_every=0",
            ]
            for run in ("first run", "cached index"):
                first, total, peak = measure(stage)
                peaks[rows] = max(peaks.get(rows, 0), peak)
                print(f"{rows:>8} {size / 2**20:>7.0f} {run:>13} {first:>14.1f} {total:>8.1f} {peak:>12.0f}")
                sys.stdout.flush()
        lo, hi = min(args.rows), max(args.rows)
        print(f"peak RSS at {hi} rows / at {lo} rows: {peaks[hi] / peaks[lo]:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
