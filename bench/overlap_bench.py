"""The overlap guard's cost at real size: a pool task's 500,000-row OFA TSV (image ids, base64 images) against
the scored splits of the pool, once with no cache (the line index and the image keys are one pass over the
file each) and once with them cached beside the file, as every later stage finds them.

    python bench/overlap_bench.py                   # 500,000 training rows, 50,000 scored; about 2 min here
    python bench/overlap_bench.py --rows 50000      # smaller

Printed per pass: seconds for data.split(train) with the guard (the keys of every scored split and of the
training split, np.isin, the view without the shared rows) and the process's peak RSS so far; then the same
split read with data.exclude_scored_images=false, for what the guard adds. The images are tiny (a 2x2 PNG: by
image id the guard never decodes one); --bytes keys them by their decoded bytes instead (no image_id)."""

from __future__ import annotations

import argparse
import base64
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write(path: Path, ids) -> None:
    """An OFA SNLI-VE TSV, one row per image id; each image a 2x2 PNG with the id's 8 bytes after its end (PIL
    reads past them), so that every image's bytes differ."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i, image_id in enumerate(ids):
            payload = base64.urlsafe_b64encode(buf.getvalue() + image_id.to_bytes(8, "little")).decode()
            fh.write(f"{i}\t{image_id}\t{payload}\tthere is a red circle\tpremise\tentailment\n")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--bytes", action="store_true", help="key images by their bytes (no image_id)")
    args = ap.parse_args()
    from common import data
    from common.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scored = args.rows // 10
        # the pool task's training images: ids 0 .. rows-1; the other task's test shares every 50th of them
        write(root / "big/train.tsv", range(args.rows))
        write(root / "big/val.tsv", range(10**9, 10**9 + 1000))
        write(root / "big/test.tsv", range(2 * 10**9, 2 * 10**9 + 1000))
        write(root / "other/train.tsv", range(3 * 10**9, 3 * 10**9 + 1000))
        write(root / "other/val.tsv", range(4 * 10**9, 4 * 10**9 + 1000))
        write(root / "other/test.tsv", [i * 50 for i in range(scored)])
        ve = yaml.safe_load((REPO / "configs/paper_tasks.yaml").read_text())["snli-ve"]
        if args.bytes:
            ve = {k: v for k, v in ve.items() if k not in ("image_id", "image_set")}
        spec = {
            name: {**ve, "files": {s: f"{name}/{s}.tsv" for s in ("train", "val", "test")}}
            for name in ("big", "other")
        }
        profile = root / "bench.yaml"
        profile.write_text(
            yaml.safe_dump(
                {
                    "profile": "bench",
                    "runs_dir": str(root / "runs"),
                    "data": {"source": "files", "root": str(root)},
                    "tasks": {"pool": ["big", "other"], "define": spec},
                    "interpolate": {"top_k": 1},
                }
            )
        )
        size = (root / "big/train.tsv").stat().st_size / 2**20
        print(
            f"training split: {args.rows:,} rows ({size:.0f} MB); scored: {scored + 4000:,} rows of 6 "
            f"splits; images keyed by {'their bytes' if args.bytes else 'image id'}"
        )
        cfg = load_config(str(profile))
        print(f"  peak RSS before: {peak_mb():.0f} MB (python, torch, the files written)")
        for what in ("no cache", "cached"):
            t0 = time.perf_counter()
            train = data.split(cfg, "big", "train")
            print(
                f"  {what:8s}: {time.perf_counter() - t0:6.2f} s, {len(train):,} rows kept "
                f"({args.rows - len(train):,} left out), peak RSS {peak_mb():.0f} MB",
                flush=True,
            )
        off = load_config(str(profile), ["data.exclude_scored_images=false"])
        t0 = time.perf_counter()
        train = data.split(off, "big", "train")
        print(f"  guard off: {time.perf_counter() - t0:6.2f} s, {len(train):,} rows (the index cached)")


if __name__ == "__main__":
    main()
