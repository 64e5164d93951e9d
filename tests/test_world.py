"""The embedded mini world is deterministic and its tasks are well-formed."""

import numpy as np
import pytest

from common import data
from common.config import WorldConfig
from common.errors import UserError

W = WorldConfig(train_size=40, val_size=10, test_size=10)


@pytest.mark.parametrize("task", list(data.TASKS))
def test_examples_are_deterministic_and_answers_are_candidates(task):
    a, b = data.examples(task, "train", W), data.examples(task, "train", W)
    assert [(e.prompt, e.answer) for e in a] == [(e.prompt, e.answer) for e in b]
    assert all(
        (x.image is None) == (y.image is None) and (x.image is None or np.array_equal(x.image, y.image))
        for x, y in zip(a, b)
    )
    t = data.TASKS[task]
    if t.candidates is not None:
        assert all(e.answer in t.candidates for e in a)
    assert (a[0].image is not None) == (t.family != "language")


def test_splits_and_world_seeds_differ():
    train = [e.prompt + e.answer for e in data.examples("snli-ve", "train", W)]
    test = [e.prompt + e.answer for e in data.examples("snli-ve", "test", W)]
    other = [
        e.prompt + e.answer for e in data.examples("snli-ve", "train", WorldConfig(seed=7, train_size=40))
    ]
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


WIDER = (
    "ve-2way",
    "nli-2way",
    "colour-text",
    "ve-decide",
    "nli-decide",  # configs/mini-wide.yaml's beyond mini's
    "ve-strict",
    "ve-lenient",
    "nli-strict",  # and the conventions under the target's own prompt
    "shape-at",
    "nli-shuffled",  # and the targets' decisions from other inputs
    "shape-plus",
    "shape-large",
)


def test_the_wider_pools_tasks_use_no_word_the_backbone_lacks():
    """The vocabulary (and so the embedded backbone) is built from every task's words: the wider pool's tasks
    must add none, or every profile of the world would rebuild its backbone."""
    from common.backbone import build_vocab

    texts = {
        n: [
            t
            for e in data.examples(n, "train", W, 400)
            for t in (e.prompt, e.answer, *(data.get_task(n).candidates or ()))
        ]
        for n in [*data.TASKS, *data.PRETRAIN_TASKS]
    }
    before = [t for n, ts in texts.items() if n not in WIDER for t in ts]
    assert build_vocab(before) == build_vocab(before + [t for n in WIDER for t in texts[n]])


def _drawn_alike(three: str, other: str) -> list:
    """300 (target, other task) example pairs, each pair drawn from the same seed."""
    import random

    return [
        (data.TASKS[three].make(random.Random(i), 64), data.TASKS[other].make(random.Random(i), 64))
        for i in range(300)
    ]


def test_two_way_tasks_are_the_three_way_statements_with_undecidable_counted_as_not_entailed():
    def hyp(e):  # the statement: the last quoted text
        return e.prompt.split('"')[-2]

    for three, two in (("snli-ve", "ve-2way"), ("nli", "nli-2way")):
        pairs = _drawn_alike(three, two)
        assert all(hyp(a) == hyp(b) for a, b in pairs) and {a.answer for a, _ in pairs} == {
            "yes",
            "no",
            "maybe",
        }
        assert all(b.answer == ("yes" if a.answer == "yes" else "no") for a, b in pairs)
        # its own prompt: another task, not a relabelled copy
        assert all(a.prompt != b.prompt for a, b in pairs)


def test_decide_tasks_ask_whether_the_three_way_statement_is_decidable():
    """ve-decide / nli-decide: the target's statements, yes when entailed or contradicted, no when
    undecidable, under a prompt one word from the target's."""
    for three, decide in (("snli-ve", "ve-decide"), ("nli", "nli-decide")):
        pairs = _drawn_alike(three, decide)
        assert all(a.prompt.split('"')[-2] == b.prompt.split('"')[-2] for a, b in pairs)
        assert all(b.answer == ("no" if a.answer == "maybe" else "yes") for a, b in pairs)
        differ = [sum(x != y for x, y in zip(a.prompt.split(), b.prompt.split())) for a, b in pairs]
        assert set(differ) == {1}


def test_strict_and_lenient_tasks_are_the_targets_very_examples_under_another_convention():
    """ve-strict / ve-lenient / nli-strict: the target's prompt, image and statement drawn alike, the answer
    its label under a two-way convention (undecidable: no when strict, yes when lenient), never maybe;
    shape-plus: shape's prompt and image, the cross named plus."""
    for three, other, maybe in (
        ("snli-ve", "ve-strict", "no"),
        ("snli-ve", "ve-lenient", "yes"),
        ("nli", "nli-strict", "no"),
        ("shape", "shape-plus", None),
    ):
        pairs = _drawn_alike(three, other)
        assert all(a.prompt == b.prompt for a, b in pairs)
        assert all(
            (a.image is None) == (b.image is None) and (a.image is None or (a.image == b.image).all())
            for a, b in pairs
        )
        if maybe is None:  # shape-plus: the cross named plus, every other shape as shape names it
            assert all(b.answer == ("plus" if a.answer == "cross" else a.answer) for a, b in pairs)
            assert {b.answer for _, b in pairs} == {"circle", "square", "triangle", "plus"}
            continue
        assert all(b.answer == (maybe if a.answer == "maybe" else a.answer) for a, b in pairs)
        assert {a.answer for a, _ in pairs} == {"yes", "no", "maybe"} and {b.answer for _, b in pairs} == {
            "yes",
            "no",
        }


def test_shape_large_is_shapes_question_on_the_same_object_drawn_large():
    """shape-large: shape's prompt and answer, drawn alike, the object always large: where shape drew it
    small, shape-large's image covers it and more; where shape drew it large, the images are the same."""
    pairs = _drawn_alike("shape", "shape-large")
    assert all(a.prompt == b.prompt and a.answer == b.answer for a, b in pairs)
    drawn = [
        ((a.image > 40).any(-1).sum(), (b.image > 40).any(-1).sum(), (a.image == b.image).all())
        for a, b in pairs
    ]  # the object's pixels (the background is grey below 40), and whether alike
    assert all(nb >= na and (nb > na) != same for na, nb, same in drawn)
    assert 0.3 < sum(same for *_, same in drawn) / len(drawn) < 0.7  # shape's sizes: small or large, evenly


def test_shape_at_names_the_shape_of_the_object_in_the_cell_it_asks_about():
    """shape-at draws a scene of 2-3 objects and asks for the shape in one cell:
    the answer is that object's."""
    import random

    from common import world

    for i in range(300):
        e = data.TASKS["shape-at"].make(random.Random(i), 64)
        rng = random.Random(i)
        scene = world.random_scene(rng, rng.randint(2, 3))  # the draw shape-at makes first
        cell = world.POSITIONS.index(e.prompt.split(" at the ")[1].rstrip("?"))
        assert len(scene.objects) in (2, 3) and [o.shape for o in scene.objects if o.pos == cell] == [
            e.answer
        ]


def test_nli_shuffled_is_nlis_decision_on_its_statements_against_a_reordered_description():
    """nli-shuffled: drawn alike, the same statement and three-way label as nli, the same objects described in
    any order, under its own prompt."""

    def parts(e):
        text, hyp = e.prompt.split('"')[1].strip(), e.prompt.split('"')[-2]
        return hyp, sorted(text.split(" : ")[1].replace(" , ", " and ").split(" and "))

    pairs = _drawn_alike("nli", "nli-shuffled")
    assert all(parts(a) == parts(b) and a.answer == b.answer and a.prompt != b.prompt for a, b in pairs)
    assert sum(a.prompt.split('"')[1] != b.prompt.split('"')[1] for a, b in pairs) > 50  # reordered, often
    assert {b.answer for _, b in pairs} == {"yes", "no", "maybe"} and all(b.image is None for _, b in pairs)


def test_colour_text_answers_the_colour_its_description_names():
    from common import world

    for e in data.examples("colour-text", "train", W):
        named = [c for c in world.COLOURS if f" {c} " in e.prompt]
        assert named == [e.answer] and e.image is None
