"""Run by tests/test_dist.py under `torchrun --nproc_per_node 2` (gloo, CPU): the data-parallel pieces of
common.dist and train_steps on a model small enough to check by hand. Each rank writes what it saw to
OUT/rank<r>.json; then rank 1 fails after the last step of a training loop whose artifact, OUT/artifact/,
rank 0 would write (debug.fail_rank): the run must end non-zero with no artifact.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import dist  # noqa: E402
from common.artifacts import atomic_dir  # noqa: E402
from common.device import fresh  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.training import Checkpoint, train_steps  # noqa: E402


def ragged_batches(seed: int, sizes=(3,)):
    """Batches of 3 (or, in turn, `sizes`) 'sequences' of 1 to 6 elements each: ranks' shares differ in how
    many loss terms they hold; a batch of 1 leaves the second of two ranks none
    (an epoch's ragged last batch)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(1000):
        yield [
            torch.randn(int(torch.randint(1, 7, (1,), generator=g)), 4, generator=g)
            for _ in range(sizes[i % len(sizes)])
        ]


def train(nan_on_rank: int = -1, checkpoint=None, sizes=(3,)) -> list[float]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)

    def loss_fn(batch):  # the mean over every element of the batch, as a seq2seq loss over its tokens
        x = torch.cat(batch)
        loss = (lin(x).squeeze(-1) - x.sum(-1)).pow(2).mean()
        return loss * float("nan") if dist.rank() == nan_on_rank else loss

    train_steps(
        loss_fn,
        [{"params": list(lin.parameters()), "lr": 0.05}],
        ragged_batches(0, sizes),
        6,
        grad_clip=0,
        accel=fresh("cpu", "fp32"),
        count=lambda b: sum(len(s) for s in b),
        checkpoint=checkpoint,
    )
    return [v for p in lin.parameters() for v in p.detach().flatten().tolist()]


def main() -> None:
    out = Path(sys.argv[1])
    fresh("cpu", "fp32")  # sets up the process group, as a stage's accelerator does
    seen = {"world": dist.world(), "rank": dist.rank()}
    items = list(range(7))
    seen["shard"] = dist.shard(items)
    seen["gathered"] = dist.gather([i * 10 for i in dist.shard(items)], len(items))
    seen["summed"] = dist.all_sum([torch.tensor([dist.rank() + 1.0, 2.0])])[0].tolist()
    seen["weights"] = train()
    try:
        train(nan_on_rank=1)
        seen["nan"] = "trained on"
    except UserError as e:
        seen["nan"] = str(e)
    seen["ragged"] = train(sizes=(3, 1))  # every other batch of one example: rank 1 takes a masked row
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(seen))
    weights = train(checkpoint=Checkpoint(out / ".artifact.ckpt", 0, None, fail_rank=1))
    with atomic_dir(out / "artifact") as tmp:  # what a stage does after its training loop
        (tmp / "weights.json").write_text(json.dumps(weights))


if __name__ == "__main__":
    main()
