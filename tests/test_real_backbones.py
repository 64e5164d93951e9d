"""Real backbones and real data with only a config change: the paper profile offline, the four stages on
files in OFA's TSV and the hub's parquet formats, and a text-only T5 backbone."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, backbone_only, inproc, stage, stages
from test_readers import b64, write_tsv


@pytest.fixture
def offline(monkeypatch):
    """Stage runs (in this process) with the hub switched off, as HF_HUB_OFFLINE=1 does: tests never touch
    the network. huggingface_hub reads the variable when imported, so its constant is switched too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return lambda *args: inproc(*args, check=False)


def test_paper_profile_offline_says_which_model_is_missing_and_how_to_supply_it(offline, tmp_path):
    p = offline(
        "python",
        "train_expert.py",
        "--pretrain",
        "--config",
        "configs/florence2-base.yaml",
        f"runs_dir={tmp_path}",
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert (
        "florence-community/Florence-2-base" in line
        and "hf download" in line
        and "backbone.source=DIR" in line
    )


def test_paper_profile_with_a_local_backbone_names_the_missing_data(micro, offline, tmp_path):
    backbone = f"backbone.source={micro[1] / 'backbone'}"
    common = [
        "--config",
        "configs/florence2-base.yaml",
        f"runs_dir={tmp_path}",
        backbone,
        f"data.root={tmp_path}/data",
    ]
    p = offline("python", "train_expert.py", "--task", "snli-ve", *common)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "snli_ve_data/snli_ve_train.tsv" in line and "snli_ve_data.zip" in line
    p = offline("python", "train_expert.py", "--task", "rte", *common)  # data.download: the hub is off
    (line,) = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "nyu-mll/glue" in line and "data.root=DIR" in line


COLOURS = ("red", "blue", "green")  # the embedded backbone's words: it refuses a task with words it lacks


def write_real_data(root):
    """SNLI-VE as OFA's TSVs (base64 images) and RTE as the hub's parquet shards
    (`hf download nyu-mll/glue`)."""
    labels = ["entailment", "contradiction", "neutral"]
    for split, n in (("train", 12), ("dev", 6), ("test", 9)):
        rows = [
            (
                str(i),
                f"{split}{i}",
                b64(40, 30, (30 * i % 255, 90, 200)),
                f"a {COLOURS[i % 3]} circle",
                "premise",
                labels[i % 3],
            )
            for i in range(n)
        ]  # each split its own images (ids)
        write_tsv(root / f"snli_ve_data/snli_ve_{split}.tsv", rows)
    for split, n in (("train", 12), ("validation", 6)):
        (root / "rte").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "sentence1": [f"a {COLOURS[i % 3]} square" for i in range(n)],
                    "sentence2": ["a square"] * n,
                    "label": [i % 2 for i in range(n)],
                    "idx": list(range(n)),
                }
            ),
            root / f"rte/{split}-00000-of-00001.parquet",
        )


def test_the_four_stages_run_on_real_file_formats(micro, tmp_path):
    """The micro backbone on SNLI-VE (TSV) with RTE (parquet) in the pool: only data.* changes."""
    write_real_data(tmp_path / "data")
    runs = tmp_path / "runs"
    backbone_only(micro, runs)
    stages(
        runs,
        "data.source=files",
        f"data.root={tmp_path}/data",
        "tasks.pool=[snli-ve,rte]",
        "tasks.target_shots=4",
        "interpolate.top_k=1",
    )
    result = json.loads((runs / "micro/results/snli-ve-4shot-s0.json").read_text())
    assert result["test_size"] == 9 and result["experts"] == ["snli-ve-4shot-s0", "rte"]
    meta = json.loads((runs / "micro/experts/rte/meta.json").read_text())
    # GLUE's validation is its test: val carved from train
    assert meta["train_size"] == 11 and meta["val_size"] == 1


def test_the_embedded_backbone_refuses_a_catalogue_task_with_words_it_lacks(micro, tmp_path):
    write_real_data(tmp_path / "data")
    rows = [(str(i), str(i), b64(8, 8), "a zebra grazes", "premise", "neutral") for i in range(4)]
    write_tsv(tmp_path / "data/snli_ve_data/snli_ve_train.tsv", rows)
    runs = backbone_only(micro, tmp_path / "runs")
    code, out, err = stage(
        "train_expert.py",
        "--task",
        "snli-ve",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={runs}",
        "data.source=files",
        f"data.root={tmp_path}/data",
        "tasks.pool=[snli-ve,rte]",
        "interpolate.top_k=1",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        "configs/paper_tasks.yaml: snli-ve uses words the embedded backbone's vocabulary lacks: grazes, zebra"
        in err
    )
    assert not (runs / "micro/experts").exists()


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_text_only_t5_backbone_runs_the_four_stages(t5_dir, tmp_path, method):
    out = stages(
        tmp_path,
        f"backbone.source={t5_dir}",
        "tasks.pool=[nli,paraphrase,arith]",
        f"expert.method={method}",
        target="nli",
        backbone=True,
    )
    assert "t5" in json.loads((tmp_path / "micro/backbone/meta.json").read_text())["kind"]
    result = json.loads((tmp_path / "micro/results/nli-8shot-s0.json").read_text())
    peft_merges = {"linear-merge", "ties-merge"} if method == "lora" else set()
    assert (
        set(result["scores"]) == {"zero-shot", "target-only", "uniform-merge", "pi-tuning"} | peft_merges
    ), out


def test_an_image_task_on_a_text_only_backbone_is_one_line(t5_dir, tmp_path):
    p = inproc(
        "train_expert.py",
        "--pretrain",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={tmp_path}",
        f"backbone.source={t5_dir}",
    )
    p = inproc(
        "train_expert.py",
        "--task",
        "snli-ve",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={tmp_path}",
        f"backbone.source={t5_dir}",
        check=False,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "text-only model" in p.stderr.strip().splitlines()[-1]


def test_snli_ve_from_its_own_annotations_and_a_flickr30k_dir(tmp_path):
    """data.files points a task at other files:
    SNLI-VE's jsonl annotations + flickr30k-images/ under data.root."""
    from common import data
    from common.config import load_config
    from common.errors import UserError
    from test_readers import png

    (tmp_path / "flickr30k-images").mkdir()
    (tmp_path / "flickr30k-images/1000092795.jpg").write_bytes(png(20, 10, (0, 200, 0)))
    rows = [
        {
            "Flikr30kID": "1000092795.jpg",
            "sentence1": "two men",
            "sentence2": "Two Men are outside.",
            "gold_label": "entailment",
        },
        {"Flikr30kID": "404.jpg", "sentence1": "x", "sentence2": "y", "gold_label": "neutral"},
    ]
    (tmp_path / "snli_ve").mkdir()
    (tmp_path / "snli_ve/snli_ve_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # (the overlap guard off: the profile's 20 other pool tasks' scored splits are not written here)
    cfg = load_config(
        str(REPO / "configs/florence2-base.yaml"),
        [
            f"data.root={tmp_path}",
            "data.files={snli-ve: {train: snli_ve/snli_ve_train.jsonl}}",
            "data.exclude_scored_images=false",
        ],
    )
    ex = data.split(cfg, "snli-ve", "train")[0]
    assert ex.prompt == ' does the image describe " two men are outside. "?' and ex.answer == "yes"
    assert ex.image.shape == (10, 20, 3) and tuple(ex.image[0, 0]) == (0, 200, 0)
    with pytest.raises(
        UserError, match="snli_ve_train.jsonl:2: missing image file .*flickr30k-images/404.jpg"
    ):
        data.split(cfg, "snli-ve", "train")[1]  # read when a batch takes the row


def test_data_workers_read_and_encode_the_same_batches_as_the_stage_alone(micro, tmp_path, monkeypatch):
    """data.num_workers=2: the TSV's rows are decoded and encoded in two DataLoader worker processes, for the
    training batches and for the validation, and the expert trained on them is the one the stage trains
    reading them itself, bit for bit, with the same validation score."""
    from safetensors.torch import load_file

    from common import data

    write_real_data(tmp_path / "data")
    readers_pids = tmp_path / "pids"

    def recorded(fetch, what):
        def fetched(self, key):  # which process read each batch (forked workers inherit the patch)
            with open(readers_pids, "a") as f:
                f.write(f"{what} {os.getpid()}\n")
            return fetch(self, key)

        return fetched

    monkeypatch.setattr(data._Encoded, "__getitems__", recorded(data._Encoded.__getitems__, "train"))
    monkeypatch.setattr(data._Decoded, "__getitems__", recorded(data._Decoded.__getitems__, "val"))
    weights, pids, scores = {}, {}, {}
    for workers in (0, 2):
        runs = tmp_path / f"runs{workers}"
        backbone_only(micro, runs)
        code, _, err = stage(
            "train_expert.py",
            "--task",
            "snli-ve",
            "--config",
            "configs/micro.yaml",
            f"runs_dir={runs}",
            "data.source=files",
            f"data.root={tmp_path}/data",
            "tasks.pool=[snli-ve,rte]",
            "interpolate.top_k=1",
            f"data.num_workers={workers}",
            "expert.batch_size=4",
        )
        assert code == 0, err
        weights[workers] = load_file(str(next((runs / "micro/experts/snli-ve").glob("*.safetensors"))))
        scores[workers] = json.loads((runs / "micro/experts/snli-ve/meta.json").read_text())["val_value"]
        pids[workers] = {tuple(line.split()) for line in readers_pids.read_text().splitlines()}
        readers_pids.unlink()
    me = str(os.getpid())
    # 0: no DataLoader read
    assert {pid for _, pid in pids[2]}.isdisjoint({me}) and pids[0] == {("train", me)}
    assert len({pid for what, pid in pids[2] if what == "train"}) == 2 and any(w == "val" for w, _ in pids[2])
    assert scores[0] == scores[2]
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
