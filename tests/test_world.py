"""The embedded mini world is deterministic and its tasks are well-formed."""
import numpy as np
import pytest

from common import data
from common.config import UserError, WorldConfig

W = WorldConfig(train_size=40, val_size=10, test_size=10)


@pytest.mark.parametrize("task", list(data.TASKS))
def test_examples_are_deterministic_and_answers_are_candidates(task):
    a, b = data.examples(task, "train", W), data.examples(task, "train", W)
    assert [(e.prompt, e.answer) for e in a] == [(e.prompt, e.answer) for e in b]
    assert all((x.image is None) == (y.image is None) and (x.image is None or np.array_equal(x.image, y.image))
               for x, y in zip(a, b))
    t = data.TASKS[task]
    if t.candidates is not None:
        assert all(e.answer in t.candidates for e in a)
    assert (a[0].image is not None) == (t.family != "language")


def test_splits_and_world_seeds_differ():
    train = [e.prompt + e.answer for e in data.examples("snli-ve", "train", W)]
    test = [e.prompt + e.answer for e in data.examples("snli-ve", "test", W)]
    other = [e.prompt + e.answer for e in data.examples("snli-ve", "train", WorldConfig(seed=7, train_size=40))]
    assert train != test and train != other


def test_snli_ve_labels_are_balanced_and_images_show_objects():
    exs = data.examples("snli-ve", "train", WorldConfig(train_size=600))
    counts = {a: sum(e.answer == a for e in exs) for a in ("yes", "no", "maybe")}
    assert min(counts.values()) > 150, counts
    img = exs[0].image
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.max() > 200  # a bright object is drawn


def test_the_low_shot_sample_is_seeded_and_draws_what_the_mini_profile_always_drew():
    import random

    exs = data.examples("nli", "train", W)
    s0, s0b, s1 = data.k_shot(exs, 8, 0, False), data.k_shot(exs, 8, 0, False), data.k_shot(exs, 8, 1, False)
    assert len(s0) == 8 and [e.prompt for e in s0] == [e.prompt for e in s0b] != [e.prompt for e in s1]
    assert s0 == random.Random(0).sample(exs, 8)  # the draws, in their order, of the sampler it replaced


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UserError, match="unknown task 'snli' .*snli-ve"):
        data.get_task("snli")
