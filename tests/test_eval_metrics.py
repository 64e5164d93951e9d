"""Real-data metrics on hand-computable cases: VQA accuracy, IoU / Acc@IoU,
BLEU-4 and CIDEr-D as coco-caption."""

import math

import pytest

from common.metrics import acc_at_iou, bleu4, box_iou, cider, vqa_accuracy, vqa_normalize


def leave_one_out(pred, refs):
    """The official loop, written out: for each human answer left out,
    min(#others equal to pred / 3, 1); the mean."""
    return sum(
        min(sum(r == pred for j, r in enumerate(refs) if j != i) / 3, 1) for i in range(len(refs))
    ) / len(refs)


@pytest.mark.parametrize(
    "answer, compared_as",
    [
        ("Two Dogs", "2 dogs"),  # lower case; number words as digits
        ("none", "0"),
        ("the red car", "red car"),
        ("an apple", "apple"),
        ("a dog", "dog"),  # articles go
        ("dog.", "dog"),
        ("3.5", "3.5"),
        ("e.g.", "eg"),  # a period goes unless a digit follows it
        ("t-shirt", "t shirt"),
        ("black/white", "black white"),  # a mark glued to a word becomes a space
        ("yes, it is", "yes it is"),
        ("red - white", "red white"),  # one next to a space goes
        ("t-shirt 1,000", "tshirt 1000"),  # any comma between digits: every mark goes
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("im", "im"),
        ("somebody'd", "somebodyd"),  # the contractions map, as is
        ("  yes\n", "yes"),
    ],
)
def test_vqa_answers_are_processed_as_the_official_evaluation_processes_them(answer, compared_as):
    assert vqa_normalize(answer) == compared_as


@pytest.mark.parametrize("matches, score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_mean_over_the_ten_leave_one_out_subsets(matches, score):
    refs = ["2"] * matches + ["blue"] * (10 - matches)
    assert vqa_accuracy("two", refs) == pytest.approx(score) == pytest.approx(leave_one_out("2", refs))


def test_vqa_human_answers_lose_their_punctuation_only_where_they_differ_and_nothing_else():
    # the answer is processed, the humans' are not lower-cased or stripped of articles (the annotations are)
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0  # a missing apostrophe, matched through the map
    assert vqa_accuracy("dog", ["dog."] * 10) == 0.0  # ten alike: taken as they are
    # they differ: "dog." is "dog"
    assert vqa_accuracy("dog", ["dog."] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("dog", ["Dog"] * 9 + ["cat"]) == 0.0  # no lower-casing of theirs
    # "a dog" keeps its article, and "dog," becomes "dog "
    # (a mark glued to a word is a space; nothing strips it)
    refs = ["a dog", "dog", "dog,", "cat", "cat", "cat", "cat", "bird", "fish", "dogs"]
    assert vqa_accuracy("a dog", refs) == pytest.approx(leave_one_out("dog", refs)) == pytest.approx(0.3)
    assert vqa_accuracy("", ["", "yes"]) == 0.0 and vqa_accuracy("yes", []) == 0.0


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)  # overlap 2, union 6
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_acc_at_iou_parses_location_tokens():
    gold = "<loc_100><loc_100><loc_500><loc_500>"
    preds = [
        gold,
        "<loc_300><loc_300><loc_700><loc_700>",
        "a dog <loc_1>",
        "<loc_120><loc_100><loc_520><loc_500>",
    ]
    # exact; IoU 0.04/(0.32-0.04) = 1/7; unparseable; IoU 0.152/(0.32-0.152) = 0.905
    assert acc_at_iou(preds, [gold] * 4) == 0.5
    assert acc_at_iou(preds, [gold] * 4, threshold=0.1) == 0.75
    with pytest.raises(ValueError):
        acc_at_iou(preds, [gold])


def test_bleu4_identical_is_one():
    refs = [["a man rides a horse on the beach", "someone riding"], ["two cats sleep on a red sofa"]]
    assert bleu4(
        ["A man rides a horse on the beach.", "two cats sleep on a red sofa"], refs
    ) == pytest.approx(1.0)


def test_bleu4_hand_computed_precisions():
    # p1..p4 = 5/6, 3/5, 2/4, 1/3; same length, so no brevity penalty
    got = bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert got == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu4_clips_repeated_ngrams():
    # 'the' x3 against 'the' x2 in the reference: p1 = 6/7, not 7/7; p2..p4 = 5/6, 3/5, 2/4
    got = bleu4(["the cat sat on the the mat"], [["the cat sat on the mat"]])
    assert got == pytest.approx((6 / 7 * 5 / 6 * 3 / 5 * 2 / 4) ** 0.25)
    assert got != pytest.approx((5 / 6 * 3 / 5 * 2 / 4) ** 0.25)


def test_bleu4_brevity_penalty_closest_reference_and_corpus_level():
    assert bleu4(["the cat sat on"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(1 - 6 / 4))
    assert bleu4(
        ["the cat sat on"], [["the cat sat on", "the cat sat on the mat and more"]]
    ) == pytest.approx(1)
    # the closest reference length (6), not the shortest (3) nor the mean: BP = exp(1 - 6/5)
    got = bleu4(["the cat sat on the"], [["the cat sat", "the cat sat on the mat"]])
    assert got == pytest.approx(math.exp(1 - 6 / 5))
    # corpus BLEU pools counts and lengths: BP = exp(1 - 10/8), not the mean of sentence BLEUs
    got = bleu4(["a b c d", "e f g h"], [["a b c d"], ["e f g h i j"]])
    assert got == pytest.approx(math.exp(1 - 10 / 8))


def test_cider_identical_captions_score_ten():
    refs = [["a red car parked outside"], ["a blue boat floating away"]]  # 'a' is in both images: idf 0
    assert cider(["a red car parked outside", "a blue boat floating away"], refs) == pytest.approx(10.0)
    # three words: no 4-grams, so the mean over n = 1..4 is 3/4
    got = cider(["red car parked", "blue boat floats"], [["red car parked"], ["blue boat floats"]])
    assert got == pytest.approx(7.5)


def test_cider_one_image_has_no_idf():
    assert cider(["a red car"], [["a red car"]]) == 0.0  # log(1 image) - log(df 1) = 0 for every n-gram


def test_cider_clips_term_frequencies():
    # 'p p' vs 'p q': unigram cos with clipping = min(2L, L)*L / (2L * sqrt(2) L) = 1/(2 sqrt 2) (1/sqrt 2
    # unclipped); no shared bigram; the other image scores 10
    got = cider(["p p", "r s t u"], [["p q"], ["r s t u"]])
    assert got == pytest.approx((10 * (1 / (2 * math.sqrt(2))) / 4 + 10) / 2)


def test_cider_gaussian_length_penalty():
    # hyp 'p q r s z' vs ref 'p q r s': cosines 4/(2 sqrt5), 3/(2 sqrt3), 2/(sqrt3 sqrt2),
    # 1/sqrt2; delta 1, sigma 6
    cos = [
        4 / (2 * math.sqrt(5)),
        3 / (2 * math.sqrt(3)),
        2 / (math.sqrt(3) * math.sqrt(2)),
        1 / math.sqrt(2),
    ]
    got = cider(["p q r s z", "w x y v"], [["p q r s"], ["w x y v"]])
    assert got == pytest.approx((10 * math.exp(-1 / 72) * sum(cos) / 4 + 10) / 2)


def test_cider_averages_over_references():
    # one reference matches exactly (10), the other shares nothing (0): the image scores 5
    got = cider(
        ["red car parked here", "blue boat floats away"],
        [["red car parked here", "green tree"], ["blue boat floats away"]],
    )
    assert got == pytest.approx((5 + 10) / 2)


def test_candidate_scoring_in_batches_of_alike_lengths_gives_each_example_its_own_hit(micro_cfg):
    """Scoring sorts the examples by prompt length so batches pad less; the hits must come back in the
    examples' order, each the hit that example gets scored alone."""
    from common import data
    from common.backbone import load_backbone
    from common.experts import expert_dir, load_expert
    from common.metrics import candidate_hits

    model, processor = load_backbone(micro_cfg)
    model = load_expert(model, expert_dir(micro_cfg, "nli"))
    enc, task = data.Encoder(processor), data.task(micro_cfg, "nli")
    exs = data.examples("nli", "test", micro_cfg.world, 24)
    assert data.by_length(exs) != list(range(len(exs)))  # the order does change: the test can fail
    alone = [candidate_hits(model, enc, task, [e])[0] for e in exs]
    batched = candidate_hits(model, enc, task, exs, batch_size=12)
    assert batched == alone and len(set(alone)) == 2  # right and wrong hits both there to misplace


def test_cider_per_image_scores_average_to_the_corpus_score():
    """Each image's CIDEr-D (document frequencies from every image's references) is what a paired bootstrap
    resamples: their mean is the corpus figure,
    and the image captioned right scores above the one captioned wrong."""
    from common.metrics import cider_each

    preds = ["a red car parked outside", "green tree grows", "blue boat floats"]
    refs = [
        ["a red car parked outside", "red car outside"],
        ["a blue boat on water"],
        ["blue boat floats away"],
    ]
    each = cider_each(preds, refs)
    assert len(each) == 3 and sum(each) / 3 == pytest.approx(cider(preds, refs), abs=1e-12)
    assert each[0] > each[2] > each[1] == 0.0


def test_token_accuracy_per_example_scores_weigh_by_answer_length(monkeypatch):
    """Token accuracy weighs an example by its answer's length; each example's score is its right tokens over
    the mean answer length, so their mean is the metric exactly (not the mean of per-example ratios) and the
    report can give an open-answer task an interval."""
    from common import metrics, tasks

    right, total = [1, 2, 0, 3], [2, 4, 1, 3]
    monkeypatch.setattr(metrics, "token_hits_each", lambda model, enc, exs, bs: (right, total))
    task = tasks.Task(name="t", family="language", make=None, candidates=None)
    exs = [tasks.Example(prompt="x", answer="y")] * 4
    metric, score, each = metrics.task_scores(None, None, task, exs)
    assert metric == "token_accuracy" and score == 6 / 10
    assert each == pytest.approx([0.4, 0.8, 0.0, 1.2]) and sum(each) / 4 == pytest.approx(score)


def test_token_hits_per_example_do_not_depend_on_the_batch(micro_cfg):
    """Each example's (right, total) answer tokens are its own, whatever it is batched and padded with."""
    from common import data
    from common.backbone import load_backbone
    from common.experts import expert_dir, load_expert
    from common.metrics import token_hits_each

    model, processor = load_backbone(micro_cfg)
    model = load_expert(model, expert_dir(micro_cfg, "shape"))
    enc = data.Encoder(processor)
    exs = data.examples("caption", "test", micro_cfg.world, 6) + data.examples(
        "snli-ve", "test", micro_cfg.world, 6
    )
    right, total = token_hits_each(model, enc, exs, batch_size=12)
    alone = [token_hits_each(model, enc, [e]) for e in exs]
    assert right == [r[0] for r, _ in alone] and total == [t[0] for _, t in alone]
    assert len(set(total)) > 1  # padded rows of several lengths
