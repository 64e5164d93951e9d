"""Real-data readers on small files written here in the real formats (OFA TSV, CoOp JSON,
hub parquet); offline."""

import base64
import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.errors import UserError
from common.metrics import vqa_accuracy
from common.readers import box_to_tokens, catalogue, fetch_hub, read_defined, tokens_to_box
from common.tasks import k_shot

CATALOGUE = catalogue()


def png(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def b64(w: int, h: int, colour=(200, 30, 30)) -> str:
    return base64.urlsafe_b64encode(png(w, h, colour)).decode()  # OFA decodes with urlsafe_b64decode


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


def snli_rows():
    return [
        ("1", "11", b64(32, 24), "A Man-in blue.", "premise", "entailment"),
        ("2", "12", b64(32, 24, (0, 0, 250)), "two dogs", "premise", "contradiction"),
        ("3", "13", b64(32, 24), "a cat", "premise", "neutral"),
    ]


def test_snli_ve_tsv_prompts_answers_images(tmp_path):
    write_tsv(tmp_path / "snli_ve_data/snli_ve_train.tsv", snli_rows())
    exs = read_defined(CATALOGUE["snli-ve"], "train", tmp_path)
    assert [e.prompt for e in exs] == [
        ' does the image describe " a man in blue. "?',
        ' does the image describe " two dogs "?',
        ' does the image describe " a cat "?',
    ]
    assert [e.answer for e in exs] == ["yes", "no", "maybe"]
    assert exs[1].image.shape == (24, 32, 3) and exs[1].image.dtype == np.uint8
    assert tuple(exs[1].image[5, 5]) == (0, 0, 250)


def test_tsv_rows_are_decoded_when_asked_for_and_the_index_is_cached(tmp_path):
    rows = snli_rows()[:2] + [("3", "13", "!!!not-an-image!!!", "a cat", "premise", "neutral")]
    path = tmp_path / "snli_ve_data/snli_ve_train.tsv"
    write_tsv(path, rows)
    assert len(read_defined(CATALOGUE["snli-ve"], "train", tmp_path)[:2]) == 2
    exs = read_defined(CATALOGUE["snli-ve"], "train", tmp_path)  # indexed, nothing decoded
    assert len(exs) == 3 and exs[1].answer == "no" and [e.answer for e in exs[:2]] == ["yes", "no"]
    with pytest.raises(UserError) as e:
        exs[2]  # the batch that takes row 3
    msg = str(e.value)
    assert "snli_ve_train.tsv:3:" in msg and "image" in msg and "\n" not in msg
    index = path.with_name(".snli_ve_train.tsv.lines.npz")
    assert index.is_file()
    index.write_bytes(b"garbage")  # a cut-short index is built again
    assert read_defined(CATALOGUE["snli-ve"], "train", tmp_path)[0].answer == "yes"
    write_tsv(path, rows[:2])  # a changed file: a new index
    assert len(read_defined(CATALOGUE["snli-ve"], "train", tmp_path)) == 2


def test_forked_data_workers_read_their_own_rows_of_a_file_the_parent_has_open(tmp_path):
    """Rows in DataLoader worker processes forked after the parent read from the file: each worker reads
    through its own handle (a shared one moves one file offset for all of them), so every row is its own."""
    import random

    import torch

    # rows longer than a read buffer, read out of order: each row is a seek and a read from the file
    rows = [
        (str(i), str(i), b64(8, 8), f"scene {i} " + "x" * 9000, "premise", "entailment") for i in range(200)
    ]
    write_tsv(tmp_path / "snli_ve_data/snli_ve_train.tsv", rows)
    exs = read_defined(CATALOGUE["snli-ve"], "train", tmp_path)
    assert exs[0].prompt.split()[6] == "0"  # the parent's handle is open
    order = random.Random(0).sample(range(200), 200)
    loader = torch.utils.data.DataLoader(
        exs,
        sampler=order,
        batch_size=4,
        num_workers=2,
        collate_fn=lambda b: [int(e.prompt.split()[6]) for e in b],
    )
    assert [i for batch in loader for i in batch] == order


def test_wrong_column_count_names_file_and_line(tmp_path):
    write_tsv(tmp_path / "snli_ve_data/snli_ve_dev.tsv", [snli_rows()[0], ("4", "14", b64(8, 8), "no label")])
    with pytest.raises(UserError) as e:
        read_defined(CATALOGUE["snli-ve"], "val", tmp_path)[1]
    assert "snli_ve_dev.tsv:2:" in str(e.value) and "4 tab-separated columns, expected 6" in str(e.value)


def test_missing_file_says_what_to_put_there(tmp_path):
    with pytest.raises(UserError) as e:
        read_defined(CATALOGUE["snli-ve"], "test", tmp_path)
    msg = str(e.value)
    assert (
        str(tmp_path / "snli_ve_data/snli_ve_test.tsv") in msg
        and "snli_ve_data.zip" in msg
        and "\n" not in msg
    )


def test_vqa_tsv_question_answer_and_ten_refs(tmp_path):
    # OFA layout: question-id, image-id, question, conf|!+answer&&..., objects, image
    write_tsv(
        tmp_path / "vqa_data/vqa_val.tsv",
        [
            (
                "7",
                "70",
                "What colour is the cat",
                "1.0|!+white&&0.6|!+gray&&0.3|!+black",
                "cat&&sofa",
                b64(16, 16),
            )
        ],
    )
    (ex,) = read_defined(CATALOGUE["vqa"], "test", tmp_path)
    assert ex.prompt == " what colour is the cat?" and ex.answer == "white"
    assert len(ex.refs) == 10 and ex.refs.count("white") == 4 and ex.refs.count("gray") == 2
    # the rebuilt refs give back OFA's per-answer VQA scores
    assert [round(vqa_accuracy(a, ex.refs), 6) for a in ("white", "gray", "black", "")] == [
        1.0,
        0.6,
        0.3,
        0.0,
    ]


def test_refcoco_tsv_location_tokens_round_trip_within_a_bin(tmp_path):
    w, h, box = 200, 100, (20.0, 10.0, 121.3, 60.7)
    write_tsv(
        tmp_path / "refcoco_data/refcoco_train.tsv",
        [("79_1", "5", "The Woman in white", ",".join(map(str, box)), b64(w, h))],
    )
    (ex,) = read_defined(CATALOGUE["refcoco"], "train", tmp_path)
    assert ex.prompt == ' which region does the text " the woman in white " describe?'
    assert ex.answer == "<loc_100><loc_100><loc_606><loc_607>" == box_to_tokens(box, w, h)
    back = np.array(tokens_to_box(ex.answer)) * [w, h, w, h]
    assert np.all(np.abs(back - box) <= np.array([w, h, w, h]) / 1000)
    assert tokens_to_box("no box here <loc_1><loc_2>") is None


def test_caption_tsv_refs_are_every_caption(tmp_path):
    write_tsv(
        tmp_path / "caption_data/caption_test.tsv",
        [("1", "9", "A dog runs.&&Two dogs, playing!", "dog", b64(10, 10))],
    )
    (ex,) = read_defined(CATALOGUE["caption"], "test", tmp_path)
    assert ex.prompt == " what does the image describe?"
    assert ex.refs == ("a dog runs", "two dogs playing") and ex.answer == "a dog runs"


def test_all_answers_candidates_are_every_class_of_the_training_file_never_the_scored_splits(tmp_path):
    """candidates: all-answers is the answer set of the task's training file: a class that only the test split
    holds is no candidate (the scored split's own answers would hand its gold labels to the scoring)."""
    write_tsv(
        tmp_path / "imagenet_1k_data/imagenet_1k_train.tsv",
        [(b64(8, 8, (i, 0, 0)), "0", name) for i, name in enumerate(["tench", "great_white_shark"] * 5)],
    )
    rows = [(b64(8, 8), "0", "tench"), (b64(8, 8), "0", "tench"), (b64(8, 8), "1", "goldfish")]
    write_tsv(tmp_path / "imagenet_1k_data/imagenet_1k_val.tsv", rows)
    exs = read_defined(CATALOGUE["imagenet"], "test", tmp_path)
    assert [e.answer for e in exs] == ["tench", "tench", "goldfish"]
    assert exs[0].candidates == ("great white shark", "tench")  # goldfish is in test alone: not a candidate
    assert exs[0].prompt == " what does the image describe?"
    # ImageNet's val is carved from train (OFA's val subset is drawn from the val file that is test here)
    val, train = (read_defined(CATALOGUE["imagenet"], s, tmp_path) for s in ("val", "train"))
    assert len(val) == 1 and len(train) == 9 and val[0].candidates == exs[0].candidates


def test_glue_tsvs_in_ofa_layouts(tmp_path):
    write_tsv(
        tmp_path / "glue_data/mnli_dev.tsv",
        [("The Cat  sat.", "A cat sat.", "1"), ("x", "y", "0"), ("x", "y", "2")],
    )
    write_tsv(tmp_path / "glue_data/rte_dev.tsv", [("0", "It Rains.", "It is wet.", "not_entailment")])
    write_tsv(tmp_path / "glue_data/qnli_dev.tsv", [("0", "Who won?", "Ann won.", "entailment")])
    mnli = read_defined(CATALOGUE["mnli"], "test", tmp_path)
    assert (
        mnli[0].prompt == ' can text1 " the cat sat. " imply text2 " a cat sat. "?' and mnli[0].image is None
    )
    assert [e.answer for e in mnli] == ["yes", "maybe", "no"]  # OFA's own label coding for its MNLI TSV
    (rte,) = read_defined(CATALOGUE["rte"], "test", tmp_path)
    assert rte.prompt == ' can text1 " it rains. " imply text2 " it is wet. "?' and rte.answer == "no"
    (qnli,) = read_defined(CATALOGUE["qnli"], "test", tmp_path)
    assert (
        qnli.prompt == ' does " ann won. " contain the answer to question " who won? "?'
        and qnli.answer == "yes"
    )
    # GLUE's dev file is its test here (the labelled test is hidden): val is a seeded tenth of train instead
    write_tsv(tmp_path / "glue_data/mnli_train.tsv", [(f"s{i}", "y", "1") for i in range(20)])
    train, val = (read_defined(CATALOGUE["mnli"], s, tmp_path) for s in ("train", "val"))
    assert len(train) == 18 and len(val) == 2 and not {e.prompt for e in train} & {e.prompt for e in val}


def test_glue_parquet_in_the_hub_layout(tmp_path):
    # `hf download nyu-mll/glue --local-dir DIR` layout: DIR/mnli/<split>-00000-of-00001.parquet
    (tmp_path / "mnli").mkdir()
    table = pa.table(
        {
            "premise": ["A man sleeps.", "Kids play."],
            "hypothesis": ["Someone rests.", "Nobody plays."],
            "label": [0, 2],
            "idx": [0, 1],
        }
    )
    pq.write_table(table, tmp_path / "mnli/validation_matched-00000-of-00001.parquet")
    pq.write_table(
        table.slice(0, 1).set_column(2, "label", pa.array([1])),
        tmp_path / "mnli/validation_mismatched-00000-of-00001.parquet",
    )
    exs = read_defined(CATALOGUE["mnli"], "test", tmp_path)
    # the hub's coding: 0 entailment, 1 neutral, 2 contradiction
    assert [e.answer for e in exs] == ["yes", "no"]
    assert exs[0].prompt == ' can text1 " a man sleeps. " imply text2 " someone rests. "?'
    pq.write_table(table, tmp_path / "mnli/train-00000-of-00001.parquet")
    assert len(read_defined(CATALOGUE["mnli"], "val", tmp_path)) == 1  # carved from train: val is the test


def test_parquet_with_image_bytes_and_class_label_names(tmp_path):
    meta = {
        "info": {
            "features": {
                "image": {"_type": "Image"},
                "label": {"names": ["banded", "bubbly_dots"], "_type": "ClassLabel"},
            }
        }
    }
    table = pa.table(
        {
            "image": [{"bytes": png(12, 6, (0, 200, 0)), "path": None}, {"bytes": png(4, 4), "path": None}],
            "label": [1, 0],
        }
    )
    pq.write_table(
        table.replace_schema_metadata({"huggingface": json.dumps(meta)}), tmp_path / "dtd-train.parquet"
    )
    for split in ("val", "test"):
        pq.write_table(
            table.slice(0, 1).replace_schema_metadata({"huggingface": json.dumps(meta)}),
            tmp_path / f"dtd-{split}.parquet",
        )
    task = dataclasses.replace(
        CATALOGUE["dtd"], files={s: f"dtd-{s}.parquet" for s in ("train", "val", "test")}
    )
    a, b = read_defined(task, "train", tmp_path)
    assert (a.answer, b.answer) == ("bubbly dots", "banded") and a.candidates == ("banded", "bubbly dots")
    (c,) = read_defined(task, "test", tmp_path)  # the schema's classes, whichever split
    assert c.candidates == ("banded", "bubbly dots")
    assert a.image.shape == (6, 12, 3) and tuple(a.image[0, 0]) == (0, 200, 0)


def test_coop_split_json(tmp_path):
    folder = tmp_path / "oxford_pets"
    (folder / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / "images" / name).write_bytes(png(8, 8))
    split = {
        "train": [["a.jpg", 1, "great_pyrenees"], ["b.jpg", 0, "abyssinian"]],
        "val": [["c.jpg", 0, "abyssinian"]],
        "test": [["c.jpg", 2, "pug"]],
    }
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    exs = read_defined(CATALOGUE["oxford-pets"], "train", tmp_path)
    assert [e.answer for e in exs] == ["great pyrenees", "abyssinian"]
    assert exs[0].candidates == ("abyssinian", "great pyrenees")  # train's classes: test's pug is not one
    # each split's image keys (cached beside the one file that holds them all) are its own
    keys = {
        s: read_defined(CATALOGUE["oxford-pets"], s, tmp_path).image_keys() for s in ("val", "train", "test")
    }
    assert (
        len(keys["train"]) == 2
        and len(keys["val"]) == 1
        and keys["val"][0] == keys["test"][0] != keys["train"][0]
    )
    (folder / "images/c.jpg").unlink()
    with pytest.raises(UserError, match="missing image"):
        read_defined(CATALOGUE["oxford-pets"], "test", tmp_path)


def test_fetch_hub_offline_is_one_line_and_makes_no_request(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        fetch_hub(CATALOGUE["rte"], "train", tmp_path)
    msg = str(e.value)
    assert (
        "nyu-mll/glue" in msg and "hf download nyu-mll/glue --repo-type dataset" in msg and "data.root" in msg
    )
    assert "\n" not in msg


def test_fetch_hub_network_failure_is_a_user_error(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(UserError, match=r"cannot fetch nyu-mll/glue \(cola: ConnectionError\)"):
        fetch_hub(CATALOGUE["cola"], "val", tmp_path)
    with pytest.raises(UserError, match="no hub dataset"):
        fetch_hub(CATALOGUE["snli-ve"], "train", tmp_path)


def test_k_shot_per_class_is_seeded_and_order_stable():
    from common.data import Example

    exs = [Example(f"p{i}", c) for i, c in enumerate("abc" * 5 + "d")]  # 5 each of a, b, c; one d
    s = k_shot(exs, 2, seed=0, per_class=True)
    assert sorted(e.answer for e in s) == ["a", "a", "b", "b", "c", "c", "d"]  # d has fewer than k: all of it
    idx = [int(e.prompt[1:]) for e in s]
    assert idx == sorted(idx)  # the input's order
    assert k_shot(exs, 2, seed=0, per_class=True) == s
    assert any(k_shot(exs, 2, seed=t, per_class=True) != s for t in range(1, 6))
    flat = k_shot(exs, 4, seed=0, per_class=False)
    assert len(flat) == 4 and k_shot(exs, 4, seed=0, per_class=False) == flat
    assert k_shot(exs, 0, seed=0, per_class=True) == exs and k_shot(exs, 99, seed=0, per_class=False) == exs


def test_the_shipped_catalogue_is_task_definitions_covering_the_papers_pool():
    """configs/paper_tasks.yaml holds the pool as definitions of the tasks.define schema; the real profiles'
    pools are all in it."""
    import yaml

    from conftest import REPO

    for profile in ("florence2-base", "t5-base"):
        pool = yaml.safe_load((REPO / f"configs/{profile}.yaml").read_text())["tasks"]["pool"]
        assert set(pool) <= set(CATALOGUE), profile
    assert len(yaml.safe_load((REPO / "configs/florence2-base.yaml").read_text())["tasks"]["pool"]) == 21
    assert sum(t.family == "vision" for t in CATALOGUE.values()) >= 8
    assert {t.metric for t in CATALOGUE.values()} == {"accuracy", "vqa_accuracy", "acc_iou", "cider"}
    assert CATALOGUE["mnli"].hub.splits["test"] == "validation_matched"
    assert CATALOGUE["snli-ve"].where == "configs/paper_tasks.yaml: snli-ve"


def test_a_catalogue_entry_copied_under_another_name_reads_the_same_examples(tmp_path):
    """The catalogue is definitions of the tasks.define schema: its SNLI-VE entry, copied into a profile as a
    task of one's own, reads OFA's TSV into the same examples."""
    import yaml

    from common.tasks import define
    from conftest import REPO

    write_tsv(tmp_path / "snli_ve_data/snli_ve_train.tsv", snli_rows())
    spec = yaml.safe_load((REPO / "configs/paper_tasks.yaml").read_text())["snli-ve"]
    written = json.dumps(spec, sort_keys=True)
    mine = define("my-snli", spec, "configs/mine.yaml")
    # the profile's mapping (recorded in artifacts) is left as is
    assert json.dumps(spec, sort_keys=True) == written
    assert mine.where == "configs/mine.yaml: tasks.define.my-snli"
    ours, theirs = (
        read_defined(mine, "train", tmp_path),
        read_defined(CATALOGUE["snli-ve"], "train", tmp_path),
    )
    assert [(e.prompt, e.answer, e.image.tobytes()) for e in ours] == [
        (e.prompt, e.answer, e.image.tobytes()) for e in theirs
    ]


def test_a_label_the_map_lacks_names_its_row(tmp_path):
    rows = snli_rows()[:2] + [("3", "13", b64(8, 8), "a cat", "premise", "contradicton")]
    write_tsv(tmp_path / "snli_ve_data/snli_ve_train.tsv", rows)
    exs = read_defined(CATALOGUE["snli-ve"], "train", tmp_path)
    with pytest.raises(
        UserError,
        match=r"snli_ve_train.tsv:3: answer 'contradicton' is not a key of labels "
        r"\(entailment, contradiction, neutral\)",
    ):
        exs[2]


def test_batches_of_a_split_decoded_in_workers_are_the_batches_read_in_order(tmp_path):
    """common.data.batches (the evaluation's and the Fisher's batches) over a split with data.num_workers=2
    yields the examples a plain read does, in order; a row that does not read stops it in one line."""
    from common.data import batches

    rows = [(str(i), str(i), b64(8, 8, (i, 0, 0)), "a cat", "premise", "neutral") for i in range(7)]
    write_tsv(
        tmp_path / "snli_ve_data/snli_ve_train.tsv", rows + [("7", "7", "not-an-image", "x", "p", "neutral")]
    )
    plain = read_defined(CATALOGUE["snli-ve"], "train", tmp_path)[:7]
    ahead = read_defined(CATALOGUE["snli-ve"], "train", tmp_path, workers=2)[:7]
    assert ahead.workers == 2 and ahead[1:].workers == 2

    def seen(exs):
        return [[int(e.image[0, 0, 0]) for e in batch] for batch in batches(exs, 3)]

    assert seen(ahead) == seen(plain) == [[0, 1, 2], [3, 4, 5], [6]]
    broken = read_defined(CATALOGUE["snli-ve"], "train", tmp_path, workers=2)
    with pytest.raises(UserError, match="snli_ve_train.tsv:8: unreadable image"):
        list(batches(broken, 3))


def test_a_headerless_csv_is_read_by_its_columns_quotes_and_all(tmp_path):
    from common.tasks import define

    (tmp_path / "qa.csv").write_text('1,"is it red, or blue?",red\n2,is it green?,green\n')
    task = define(
        "qa",
        {
            "files": {"train": "qa.csv", "test": "qa.csv"},
            "columns": ["", "question", "answer"],
            "prompt": " {question}",
            "answer": "answer",
        },
        "mine.yaml",
    )
    exs = read_defined(task, "test", tmp_path)
    assert [(e.prompt, e.answer) for e in exs] == [
        (" is it red, or blue?", "red"),
        (" is it green?", "green"),
    ]
