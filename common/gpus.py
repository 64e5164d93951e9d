"""One GPU per job: `python -m common.gpus [--locks DIR] "0 1 2 3" CMD ...` runs CMD with CUDA_VISIBLE_DEVICES
set to a GPU of the list that no other job holds, waiting while all are taken. The hold is an flock on
DIR/gpu-<id>.lock, passed to CMD (exec) and released by the kernel when CMD ends, killed or not: two jobs of a
`make -j4 experts GPUS="0 1 2 3"` never share a GPU, and a crashed job leaves nothing to clean up."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path


def acquire(ids: list[str], locks: Path, wait: float = 0.5) -> tuple[str, int]:
    """(GPU id, the open lock's fd) for the first id no one holds; polls every `wait` s while all are held."""
    locks.mkdir(parents=True, exist_ok=True)
    while True:
        for gpu in ids:
            fd = os.open(locks / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return gpu, fd
            except BlockingIOError:
                os.close(fd)
        time.sleep(wait)


def main(argv: list[str]) -> None:
    locks = Path("/tmp/pi-tuning-gpus")
    if argv[:1] == ["--locks"]:
        locks, argv = Path(argv[1]), argv[2:]
    if len(argv) < 2 or not argv[0].split():
        sys.exit(
            'usage: python -m common.gpus [--locks DIR] "0 1 2 3" CMD ...  (GPUS must list at least one id)'
        )
    gpu, fd = acquire(argv[0].split(), locks)
    os.set_inheritable(fd, True)  # CMD holds the lock from here on
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
