"""A researcher's own tasks, defined in a YAML profile (tasks.define) over files written as a user would."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image, ImageDraw

from common.errors import UserError
from conftest import REPO, backbone_only, stage, stages

SHAPES = {  # a CSV of image paths, questions and answers, images drawn with PIL
    "my-shapes": {
        "files": {"train": "shapes/train.csv", "test": "shapes/test.csv"},
        "image": "path",
        "image_root": "shapes/images",
        "prompt": " what is the {what} of the object?",
        "answer": "answer",
        "candidates": ["circle", "square"],
    },
    # a JSONL text task with a label map (0/1 -> yes/no), its own val split
    "my-entail": {
        "files": {"train": "entail/train.jsonl", "val": "entail/val.jsonl", "test": "entail/test.jsonl"},
        "prompt": ' can text1 " {premise} " imply text2 " {hypothesis} "?',
        "answer": "label",
        "labels": {0: "yes", 1: "no"},
    },
}


def write_user_files(root):
    (root / "shapes/images").mkdir(parents=True)
    for split, n in (("train", 20), ("test", 8)):
        lines = ["path,what,answer"]
        for i in range(n):
            shape = ("circle", "square")[i % 2]
            img = Image.new("RGB", (64, 64), (20, 20, 20))
            box = (8 + i, 16, 48, 48)  # each image its own
            (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
                box, fill=(220, 40, 40)
            )
            img.save(root / f"shapes/images/{split}{i}.png")
            lines.append(f"{split}{i}.png,shape,{shape}")
        (root / f"shapes/{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "entail").mkdir()
    colours = ("red", "blue", "green")
    for split, n in (("train", 16), ("val", 6), ("test", 8)):
        rows = [
            {
                "premise": f"a {colours[i % 3]} circle is at the top",
                "hypothesis": f"a {colours[(i // 2) % 3]} circle is at the top",
                "label": int(i % 3 != (i // 2) % 3),
            }
            for i in range(n)
        ]
        (root / f"entail/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def profile(tmp_path, define, pool, **extra) -> str:
    """configs/micro.yaml with these tasks defined and this pool, as a user's own profile file."""
    cfg = yaml.safe_load((REPO / "configs/micro.yaml").read_text())
    cfg["tasks"] |= {"pool": pool, "define": define}
    cfg["data"] = {"root": str(tmp_path / "data")} | extra
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_defined_tasks_run_the_four_stages_in_a_pool_with_world_tasks(micro, tmp_path):
    write_user_files(tmp_path / "data")
    runs = backbone_only(micro, tmp_path / "runs")
    config = profile(tmp_path, SHAPES, ["my-shapes", "nli", "my-entail"])
    stages(runs, "tasks.target_shots=8", target="my-shapes", config=config)
    rd = runs / "micro"
    for name in ("nli", "my-entail", "my-shapes-8shot-s0"):
        assert (rd / f"experts/{name}/adapter_model.safetensors").is_file()
    entail = json.loads((rd / "experts/my-entail/meta.json").read_text())
    assert entail["train_size"] == 16 and entail["val_size"] == 6 and entail["family"] == "language"
    sim = json.loads((rd / "similarity/my-shapes-8shot-s0.json").read_text())
    assert sim["names"] == ["my-shapes-8shot-s0", "nli", "my-entail"] and len(sim["top_k"]) == 2
    # each Fisher's embed.samples (8) of its expert's examples: a file's a seeded random sample, not its
    # first rows; the mini world's first (drawn at random already); recorded in the similarity file
    assert sim["examples"] == {
        "my-shapes-8shot-s0": "all 8",
        "my-entail": "8 of 16, a seeded random sample ('fisher/my-entail')",
        "nli": "the first 8 of 64 (the mini world draws each at random)",
    }
    result = json.loads((rd / "results/my-shapes-8shot-s0.json").read_text())
    assert result["metric"] == "accuracy" and result["test_size"] == 8 and "pi-tuning" in result["scores"]

    # the target as a pool task: no val file, so val is a seeded tenth of train (2 of 20), apart from train
    from common import data
    from common.config import load_config

    cfg = load_config(config, [f"runs_dir={runs}"])
    train, val = data.split(cfg, "my-shapes", "train"), data.split(cfg, "my-shapes", "val")
    assert (
        len(train) == 18
        and len(val) == 2
        and not {e.image.tobytes() for e in val} & {e.image.tobytes() for e in train}
    )
    again = data.split(cfg, "my-shapes", "val")  # the same carve every time
    assert [e.image.tobytes() for e in again] == [e.image.tobytes() for e in val] and train[
        0
    ].candidates is None
    assert data.task(cfg, "my-shapes").candidates == ("circle", "square") and train[0].image.shape == (
        64,
        64,
        3,
    )
    # val serving as test (GLUE, VQA): val is carved from train as well, so choices never see the test rows
    same = {
        **SHAPES["my-shapes"],
        "files": {"train": "shapes/train.csv", "val": "shapes/test.csv", "test": "shapes/test.csv"},
    }
    config = profile(tmp_path, {**SHAPES, "my-shapes": same}, ["my-shapes", "nli", "my-entail"])
    cfg = load_config(config, [f"runs_dir={runs}"])
    assert [e.image.tobytes() for e in data.split(cfg, "my-shapes", "val")] == [
        e.image.tobytes() for e in val
    ]
    assert len(data.split(cfg, "my-shapes", "train")) == 18 and len(data.split(cfg, "my-shapes", "test")) == 8
    # a cap on a file's rows takes a seeded random sample of them, the same every time, not the first rows
    capped = load_config(config, [f"runs_dir={runs}", "data.test_size=4"])
    first = [e.image.tobytes() for e in data.split(cfg, "my-shapes", "test")]
    sample = [e.image.tobytes() for e in data.split(capped, "my-shapes", "test")]
    assert len(sample) == 4 and sample != first[:4] and set(sample) <= set(first)
    assert [e.image.tobytes() for e in data.split(capped, "my-shapes", "test")] == sample


@pytest.mark.parametrize(
    "change, message",
    [
        ({"my-shapes": {"answer": "anwser"}}, "tasks.define.my-shapes.answer: column 'anwser' is not in"),
        (
            {"my-shapes": {"prompt": " what is the {colour} of the object?"}},
            "tasks.define.my-shapes.prompt: column 'colour' is not in",
        ),
        (
            {"my-shapes": {"files": {"train": "shapes/nope.csv", "test": "shapes/test.csv"}}},
            "tasks.define.my-shapes.files.train:",
        ),
        ({"my-shapes": {"files": {"train": "shapes/empty.csv", "test": "shapes/test.csv"}}}, "has no rows"),
        (
            {"my-shapes": {"metric": "f1"}},
            "tasks.define.my-shapes.metric is 'f1'; metric: accuracy | vqa_accuracy",
        ),
        ({"my-shapes": {"colum": "x"}}, "tasks.define.my-shapes.colum is not a field of a task definition"),
        (
            {"my-entail": {"prompt": ' does " {premise} " entail " {hypothesis} "?'}},
            "tasks.define.my-entail uses words the embedded backbone's vocabulary lacks: entail",
        ),
    ],
)
def test_a_bad_definition_is_one_line_naming_the_field(micro, tmp_path, change, message):
    write_user_files(tmp_path / "data")
    (tmp_path / "data/shapes/empty.csv").write_text("path,what,answer\n")
    runs = backbone_only(micro, tmp_path / "runs")
    define = {name: spec | change.get(name, {}) for name, spec in SHAPES.items()}
    config = profile(tmp_path, define, ["my-shapes", "nli", "my-entail"])
    task = next(iter(change))
    code, out, err = stage("train_expert.py", "--task", task, "--config", config, f"runs_dir={runs}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (runs / "micro/experts").exists()


def test_a_defined_task_reads_an_image_when_a_batch_takes_its_row(micro, tmp_path):
    """A split of a defined task holds its rows' fields, not their images: a missing image file goes unnoticed
    until its row is taken; then the stage stops in one line naming the file and the row, also when the row
    was taken in a DataLoader worker (data.num_workers=2), and writes nothing."""
    from common import data
    from common.config import load_config

    write_user_files(tmp_path / "data")
    runs = backbone_only(micro, tmp_path / "runs")
    config = profile(tmp_path, SHAPES, ["my-shapes", "nli", "my-entail"])
    cfg = load_config(config, [f"runs_dir={runs}"])
    train = data.split(cfg, "my-shapes", "train")
    row = int(train.index[5])
    missing = train.source.records[row]["path"]
    (tmp_path / "data/shapes/images" / missing).unlink()
    again = data.split(cfg, "my-shapes", "train")  # read without the image: nothing is decoded yet
    assert len(again) == 18 and [e.answer for e in again.texts()] == again.answers()
    with pytest.raises(UserError) as e:
        again[5]
    assert f"shapes/train.csv:{row + 2}: missing image file " in str(e.value) and missing in str(e.value)
    code, out, err = stage(
        "train_expert.py", "--task", "my-shapes", "--config", config, f"runs_dir={runs}", "data.num_workers=2"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"shapes/train.csv:{row + 2}: missing image file " in err and "DataLoader" not in err
    assert not (runs / "micro/experts").exists()
