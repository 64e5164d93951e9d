"""The overlap guard (data.exclude_scored_images): no image of a scored split (validation or test) of a pool
task in any task's training data. Tasks over OFA-format TSVs written here share image ids, as RefCOCOg's train
shares COCO images with RefCOCO's testA; the mini world's images are all distinct."""

from __future__ import annotations

import base64
import io
import json

import yaml
from PIL import Image

from common.config import load_config
from conftest import REPO, backbone_only, stage

VE = yaml.safe_load((REPO / "configs/paper_tasks.yaml").read_text())["snli-ve"]  # OFA's SNLI-VE TSV layout


def tsv(path, ids):
    """An OFA SNLI-VE TSV: uniq-id, image-id, base64 image, hypothesis, premise, label;
    one row per image id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image_id in enumerate(ids):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (image_id * 7 % 256, 40, 40)).save(buf, format="PNG")
        label = ("entailment", "contradiction", "neutral")[i % 3]
        rows.append(
            f"{i}\t{image_id}\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}\tthere is a red circle\t"
            f"premise\t{label}\n"
        )
    path.write_text("".join(rows))


def profile(tmp_path, runs, **data) -> str:
    """micro with two SNLI-VE-format tasks over Flickr30k ids (ve-a,
    ve-b) in the pool beside the world's nli."""
    files = {name: {s: f"{name}/{s}.tsv" for s in ("train", "val", "test")} for name in ("ve-a", "ve-b")}
    cfg = yaml.safe_load((REPO / "configs/micro.yaml").read_text())
    cfg["runs_dir"] = str(runs)
    cfg["tasks"] |= {
        "pool": ["ve-a", "ve-b", "nli"],
        "define": {name: {**VE, "files": f, "get": ""} for name, f in files.items()},
    }
    cfg["data"] = {"root": str(tmp_path / "data"), **data}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def write_data(root):
    # 1, 2: ve-b's test; 10: its own
    tsv(root / "ve-a/train.tsv", [1, 1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18])
    tsv(root / "ve-a/val.tsv", [20, 21])
    tsv(root / "ve-a/test.tsv", [30, 31, 10])
    tsv(root / "ve-b/train.tsv", [40, 41, 42, 43, 44, 45, 46, 47, 30])  # 30: ve-a's test
    tsv(root / "ve-b/val.tsv", [50, 51])
    tsv(root / "ve-b/test.tsv", [1, 2, 3])


def test_training_examples_that_show_a_scored_image_of_any_pool_task_are_left_out_counted_and_reported(
    micro, tmp_path
):
    from common import data
    from common.report import overlap_note

    write_data(tmp_path / "data")
    runs = backbone_only(micro, tmp_path / "runs")
    config = profile(tmp_path, runs)
    cfg = load_config(config)
    train = data.split(cfg, "ve-a", "train")
    ids = [train.source.row(int(j))["image_id"] for j in train.index]
    assert ids == ["11", "12", "13", "14", "15", "16", "17", "18"]  # 1, 1, 2 (ve-b's test), 10 (its own test)
    assert len(data.split(cfg, "ve-b", "train")) == 8
    assert data.train_rows(cfg, "ve-a") == {"rows": 12, "dropped_scored_images": 4, "used": 8}
    kept = load_config(config, ["data.exclude_scored_images=false"])
    assert len(data.split(kept, "ve-a", "train")) == 12

    # the expert trains on what is left, says so in its meta.json, and the report says it for every pool task
    code, out, err = stage("train_expert.py", "--task", "ve-a", "--config", config)
    assert code == 0, err
    meta = json.loads((runs / "micro/experts/ve-a/meta.json").read_text())
    assert meta["train_size"] == 8 and meta["train_rows"]["dropped_scored_images"] == 4
    assert stage("train_expert.py", "--task", "ve-b", "--config", config)[0] == 0
    note = overlap_note(cfg)
    assert "ve-a 4 of 12, ve-b 1 of 9, nli not recorded." in note  # (nli: no expert trained here)

    # a task whose every training image is scored somewhere stops in one line, nothing written
    tsv(tmp_path / "data/ve-b/train.tsv", [20, 21, 30])
    fresh = backbone_only(micro, tmp_path / "r2")
    code, out, err = stage("train_expert.py", "--task", "ve-b", "--config", config, f"runs_dir={fresh}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "every training example of ve-b (3) shows an image of a scored split" in err
    assert "data.exclude_scored_images=false" in err and not (fresh / "micro/experts").exists()


def test_the_mini_world_shares_no_image_so_the_guard_changes_no_artifact(micro, tmp_path):
    """micro's images are all distinct (each draws its own background noise): nothing is left out, and a pool
    expert trained with the guard off is bit for bit the one the micro run made with it on."""
    from common import data

    cfg = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={micro[0]}"])
    # snli-ve's and shape's val and test: nli has no images
    assert len(data.scored_images(cfg)) == 2 * (16 + 24)
    for task in cfg.tasks.pool:
        assert data.train_rows(cfg, task)["dropped_scored_images"] == 0
    runs = backbone_only(micro, tmp_path / "runs")
    code, out, err = stage(
        "train_expert.py",
        "--task",
        "shape",
        "--config",
        "configs/micro.yaml",
        "seed=0",
        f"runs_dir={runs}",
        "data.exclude_scored_images=false",
    )
    assert code == 0, err
    weights = "experts/shape/adapter_model.safetensors"
    assert (runs / "micro" / weights).read_bytes() == (micro[1] / weights).read_bytes()
    assert json.loads((micro[1] / "experts/shape/meta.json").read_text())["train_rows"] == {
        "rows": 64,
        "dropped_scored_images": 0,
        "used": 64,
    }


def test_the_mini_worlds_image_keys_are_drawn_without_the_images_from_the_same_stream():
    """world_keys replays a split's stream with each image left undrawn (its key: the scene and the noise seed
    render would draw): the examples around it are the same, and keys differ wherever the pictures do."""
    from common import data
    from common.config import WorldConfig

    world = WorldConfig(train_size=200, val_size=50, test_size=50)
    for task in ("snli-ve", "shape-at", "count"):
        keys = data.world_keys(task, "train", world)
        drawn = data.examples(task, "train", world)
        assert len(keys) == len(drawn) == 200 and len(set(keys.tolist())) == 200
        token = data._UNDRAWN.set(True)
        try:
            undrawn = data.examples(task, "train", world)
        finally:
            data._UNDRAWN.reset(token)
        assert [(e.prompt, e.answer) for e in undrawn] == [(e.prompt, e.answer) for e in drawn]
