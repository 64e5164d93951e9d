"""Results you can trust: every figure comes from artifacts made under the config in force (stale ones are
rebuilt by make, refused by a stage, left out of tables and the report), and bad values stop at the door."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from conftest import REPO, inproc, make, stage

NAME = "snli-ve-8shot-s0"
CONFIG = ("--config", "configs/micro.yaml")


def schema_fields(cls=None, prefix=""):
    """Every leaf field of the config schema as (dotted name, dataclass field, default)."""
    from common.config import Config

    cls = cls or Config
    for f in dataclasses.fields(cls):
        if f.name == "path":
            continue
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            yield from schema_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, default


RANGED = [(name, f.metadata["range"], d) for name, f, d in schema_fields() if "range" in f.metadata]
NONEMPTY = [name for name, f, _ in schema_fields() if f.metadata.get("nonempty")]


def test_every_numeric_field_declares_its_range():
    numeric = [name for name, _, d in schema_fields() if isinstance(d, (int, float)) and not isinstance(d, bool)]
    assert numeric and sorted(numeric) == sorted(name for name, _, _ in RANGED)


@pytest.mark.parametrize("name, allowed, default", RANGED, ids=[n for n, _, _ in RANGED])
def test_every_ranged_field_refuses_a_value_out_of_range(name, allowed, default):
    from common.config import UserError, load_config

    assert default in allowed
    bad = allowed.outside()
    with pytest.raises(UserError, match=rf"configs/micro.yaml: field '{name}' is {bad!r}; use a value "):
        load_config("configs/micro.yaml", [f"{name}={bad}"])


@pytest.mark.parametrize("name", NONEMPTY)
def test_every_list_that_must_hold_something_refuses_an_empty_one(name):
    from common.config import UserError, load_config

    with pytest.raises(UserError, match=rf"field '{name}' is empty"):
        load_config("configs/micro.yaml", [f"{name}=[]"])


@pytest.mark.parametrize("overrides, message", [
    (["interpolate.top_k=3"], "field 'interpolate.top_k' is 3, but tasks.pool has 2 tasks beside the target"),
    (["tasks.pool=[snli-ve,nli,nli]"], "field 'tasks.pool' names a task twice"),
    (["tasks.pool=[snli-ve,nli,null]"], "field 'tasks.pool' holds None, not a task name"),
    (["tasks.pool=[snli-ve,nli,'null']"], "field 'tasks.pool' names a task 'null', the name of the transfer row's"),
    (["backbone.heads=3"], "field 'backbone.heads' is 3, which does not divide backbone.d_model 32"),
    (["backbone.vision_heads=[1,1]"], "field 'backbone.vision_heads' has 2 entries, vision_dims 3"),
    (["expert.lr=.nan"], "field 'expert.lr' is nan; use a value 0 or more"),  # a range holds no NaN
])
def test_fields_that_must_agree_are_checked_together(overrides, message):
    from common.config import UserError, load_config

    with pytest.raises(UserError, match=message):
        load_config("configs/micro.yaml", overrides)


def files(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("args, message", [
    (["train_expert.py", "--task", "snli-ve", "--shots", "-5"], "--shots -5: use 0"),
    (["train_expert.py", "--task", "snli-ve", "--shots", "65"], "--shots is 65, but snli-ve's train split has 64"),
    (["embed_tasks.py", "--target", "snli-ve", "tasks.pool=[]"], "field 'tasks.pool' is empty"),
    # what a stage reads must have been made under the config in force
    (["embed_tasks.py", "--target", "snli-ve", "expert.r=2"], "experts/snli-ve-8shot-s0: made under another config "
                                                             "(expert.r: 4 -> 2)"),
    (["embed_tasks.py", "--target", "snli-ve", "tasks.shots_per_class=true"],
     "experts/snli-ve-8shot-s0: made under another config (tasks.shots_per_class: False -> True)"),
    (["interpolate.py", "--target", "snli-ve", "fisher.normalize=none"],
     f"similarity/{NAME}.json: made under another config (fisher.normalize: 'mean' -> 'none')"),
    (["evaluate.py", "--target", "snli-ve", "interpolate.steps=3"],
     f"interpolated/{NAME}: made under another config (interpolate.steps: 5 -> 3)"),
    (["train_expert.py", "--task", "nli", "pretrain.steps=21"], "backbone: built under another config "
                                                                "(pretrain.steps: 20 -> 21)"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(micro, args, message):
    before = files(micro[0])
    code, _, err = stage(*args, *CONFIG, f"runs_dir={micro[0]}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert files(micro[0]) == before


def test_a_nan_loss_stops_the_stage_and_writes_no_expert(micro_copy):
    runs, rd = micro_copy
    before = files(rd)
    p = inproc("train_expert.py", "--task", "snli-ve", "--shots", "4", *CONFIG, f"runs_dir={runs}",
               "expert.lr=1e9", "expert.grad_clip=0", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "expert snli-ve-4shot-s0: loss nan at step" in p.stderr and "lower expert.lr" in p.stderr
    assert files(rd) == before  # no expert directory, no temp directory beside it


def test_after_a_rebuilt_backbone_no_stage_uses_the_old_experts_or_fishers(micro_copy):
    from common.config import load_config
    from common.similarity import fisher_cache

    runs, rd = micro_copy
    before = load_config("configs/micro.yaml", [f"runs_dir={runs}"])
    old_keys = [fisher_cache(before, n)[1] for n in ("nli", NAME)]
    inproc("train_expert.py", "--pretrain", *CONFIG, f"runs_dir={runs}", "pretrain.steps=21")
    code, out, err = stage("embed_tasks.py", "--target", "snli-ve", *CONFIG, f"runs_dir={runs}", "pretrain.steps=21")
    assert code == 2 and "trained on another backbone" in err and "cached" not in out
    after = load_config("configs/micro.yaml", [f"runs_dir={runs}", "pretrain.steps=21"])
    assert all(fisher_cache(after, n)[1] != k for n, k in zip(("nli", NAME), old_keys))  # an old Fisher never matches


def test_the_fisher_cache_key_holds_every_setting_that_changes_the_fisher(micro):
    from common.config import load_config
    from common.similarity import fisher_cache

    def key(name, *overrides):
        return fisher_cache(load_config("configs/micro.yaml", [f"runs_dir={micro[0]}", *overrides]), name)[1]

    assert key("nli") == key("nli", "fisher.batch_size=2")  # a per-sample Fisher takes one example at a time
    assert key("nli", "fisher.estimator=batch") != key("nli", "fisher.estimator=batch", "fisher.batch_size=2")
    for setting in ("fisher.samples=4", "fisher.passes=2", "world.train_size=60", "data.train_size=9"):
        assert key("nli") != key("nli", setting), setting
    for setting in ("world.val_size=9", "world.test_size=9", "data.val_size=9", "data.test_size=9"):
        assert key("nli") == key("nli", setting), setting  # the Fisher reads the train split alone
    # the target's k-shot sample depends on the sampling, a pool expert's full split does not
    assert key(NAME) != key(NAME, "tasks.shots_per_class=true")
    assert key("nli") == key("nli", "tasks.shots_per_class=true")


def test_runs_that_want_the_same_fishers_share_the_work(micro_copy, monkeypatch):
    """make study: a run finding one Fisher being computed by another process (its lock held) computes the
    free ones first, then takes that one once the lock is let go; the Fishers are what one run alone gives."""
    import fcntl

    from common import similarity
    from common.config import load_config

    runs, rd = micro_copy
    cfg = load_config("configs/micro.yaml", [f"runs_dir={runs}"])
    names = [NAME, "nli", "shape"]
    alone, _ = similarity.fisher_embeddings(cfg, names)
    for f in (rd / "fisher").iterdir():
        f.unlink()
    busy, _ = similarity.fisher_cache(cfg, NAME)
    other = open(busy.with_name(f".{busy.name}.lock"), "w")  # another process, computing the target's Fisher
    fcntl.flock(other, fcntl.LOCK_EX)
    order, compute = [], similarity._fisher_of

    def recording(cfg, name, *args):
        order.append(name)
        if name == "shape":
            other.close()  # the other process has let go (without writing it: this one computes it)
        return compute(cfg, name, *args)

    monkeypatch.setattr(similarity, "_fisher_of", recording)
    shared, what = similarity.fisher_embeddings(cfg, names)
    assert order == ["nli", "shape", NAME] and what == "3 Fisher computed, 0 cached"
    for a, b in zip(alone, shared):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_config_changes_the_table_and_the_report_and_mixes_no_runs(micro_copy):
    """interpolate.steps changed: make reruns interpolate and evaluate only, the table and the report hold the
    runs made under the new config, and the older ones are named as left out."""
    from common.config import load_config
    from common.report import write_report

    runs, rd = micro_copy
    # another seed's result, made under this config (a copy stands in for running seed 1: only its config counts)
    seed1 = json.loads((rd / f"results/{NAME}.json").read_text()) | {"run": "snli-ve-8shot-s1", "seed": 1}
    (rd / "results/snli-ve-8shot-s1.json").write_text(json.dumps(seed1))
    inproc("interpolate.py", "--target", "snli-ve", "--variant", "random", *CONFIG, f"runs_dir={runs}")
    inproc("evaluate.py", "--target", "snli-ve", *CONFIG, f"runs_dir={runs}")
    table = (rd / "results/snli-ve.md").read_text()
    assert "8-shot (2 seeds)" in table and "| pi-random |" in table

    out = make("all", runs_dir=runs, extra="interpolate.steps=3").stdout  # seed 0 again, under a new config
    assert out.count("| pi-tuning |") == 1  # make all prints the table once
    # only the stages that read the changed section rerun, and once rerun, nothing is stale
    assert "interpolate.py" in out and "evaluate.py" in out
    assert "train_expert.py" not in out and "embed_tasks.py" not in out
    assert ".py" not in make("all", runs_dir=runs, extra="interpolate.steps=3").stdout.replace("pipeline.mk", "")
    table = (rd / "results/snli-ve.md").read_text()
    new = json.loads((rd / f"results/{NAME}.json").read_text())
    assert "8-shot (1 seed)" in table and f"| pi-tuning | {new['scores']['pi-tuning']:.3f} |" in table
    assert "| pi-random |" not in table and "pi-random (interpolate.steps: 5 -> 3)" in out  # a stale baseline run
    assert "snli-ve-8shot-s1 (interpolate.steps: 5 -> 3)" in table  # a stale seed, named, not averaged in
    summary = json.loads((rd / "results/snli-ve.json").read_text())
    assert list(summary["runs"]) == [NAME] and summary["runs"][NAME]["config"]["interpolate"]["steps"] == 3

    write_report(load_config("configs/micro.yaml", [f"runs_dir={runs}", "interpolate.steps=3"]), "snli-ve")
    report = (rd / "report.md").read_text()
    assert f"| pi-tuning | {new['scores']['pi-tuning']:.3f} |" in report and "8-shot (1 seed)" in report
    assert "left out as made under another: snli-ve-8shot-s1 (interpolate.steps: 5 -> 3)" in report
    write_report(load_config("configs/micro.yaml", [f"runs_dir={runs}"]), "snli-ve")  # the old config: seed 1 only
    assert f"{NAME} (interpolate.steps: 3 -> 5)" in (rd / "report.md").read_text()


def test_the_pool_list_and_the_sampling_are_stamped_apart(micro_copy):
    runs = micro_copy[0]
    plan = make("-n", "all", runs_dir=runs, extra="tasks.pool=[snli-ve,nli] interpolate.top_k=1").stdout  # dry run
    assert "embed_tasks.py" in plan and "interpolate.py" in plan and "train_expert.py" not in plan  # no expert retrains
    plan = make("-n", "all", runs_dir=runs, extra="tasks.shots_per_class=true").stdout
    assert "train_expert.py --task snli-ve --shots 8" in plan and "--task nli" not in plan and "--task shape" not in plan


def test_larger_scored_splits_rescore_and_rebuild_nothing(micro_copy):
    """world.test_size: only evaluate.py reruns; the backbone, the experts, the Fishers and the interpolation
    stay. A run made when world.json still held the sizes: that stamp is left as it is, and the sizes' own
    stamps, new, count as changed only where the value differs from what it held."""
    from common.config import changed_fields, load_config

    runs, rd = micro_copy
    stamp = rd / ".config/world.json"
    old = json.loads(stamp.read_text()) | {"world.test_size": 24, "world.val_size": 16}  # as stamps held them
    stamp.write_text(json.dumps(old))
    os.utime(stamp, (0, 0))
    for k in ("world.test_size", "world.val_size"):
        (rd / f".config/{k}.json").unlink()
    plan = make("-n", "all", runs_dir=runs, extra="world.test_size=30").stdout  # dry run
    assert "evaluate.py --target snli-ve" in plan
    assert not any(s in plan for s in ("train_expert.py", "embed_tasks.py", "interpolate.py")), plan
    assert stamp.stat().st_mtime == 0 and (rd / ".config/world.val_size.json").stat().st_mtime == 0
    assert (rd / ".config/world.test_size.json").stat().st_mtime > 0
    cfg = load_config("configs/micro.yaml", [f"runs_dir={runs}", "world.test_size=30"])
    recorded = json.loads((rd / "backbone/meta.json").read_text())["config"]
    assert changed_fields(recorded, cfg, "backbone") == [] and changed_fields(recorded, cfg, "interpolated") == []
    assert changed_fields(recorded, cfg, "result") == ["world.test_size: 24 -> 30"]


def test_each_pool_expert_is_merged_at_its_own_saved_scale(micro_copy):
    """An expert saved with twice the alpha and half the B adds the same update: the merge sees the same tensors."""
    from safetensors.torch import load_file, save_file

    from common.config import load_config
    from common.experts import load_pool

    runs, rd = micro_copy
    cfg = load_config("configs/micro.yaml", [f"runs_dir={runs}"])
    before = load_pool(cfg, [NAME, "nli"])
    conf = rd / "experts/nli/adapter_config.json"
    c = json.loads(conf.read_text())
    c["lora_alpha"] *= 2
    conf.write_text(json.dumps(c))
    weights = rd / "experts/nli/adapter_model.safetensors"
    save_file({k: v / 2 if ".lora_B." in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    after = load_pool(cfg, [NAME, "nli"])
    assert any(not torch.equal(v, load_file(str(weights))[k]) for k, v in after[1].items())  # B was rescaled
    for old, new in zip(before, after):
        assert old.keys() == new.keys() and all(torch.allclose(old[k], new[k], atol=0, rtol=1e-6) for k in old)


def test_a_field_newer_than_an_artifact_counts_at_its_default_and_checkpointing_is_never_stale(tmp_path):
    from common.config import changed_fields, load_config, write_stamps

    cfg = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={tmp_path}"])
    recorded = cfg.to_dict()
    del recorded["expert"]["grad_accum"], recorded["precision"]  # made before these fields existed
    assert changed_fields(recorded, cfg, "result") == []
    later = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={tmp_path}", "expert.grad_accum=2"])
    assert changed_fields(recorded, later, "expert") == ["expert.grad_accum: 1 -> 2"]
    assert changed_fields(None, cfg, "backbone")  # no recorded config at all: stale
    write_stamps(cfg)
    stamps = {p.name: p.read_text() for p in (tmp_path / "micro/.config").iterdir()}
    checkpointed = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={tmp_path}", "expert.gradient_checkpointing=true",
                                                               "interpolate.gradient_checkpointing=true"])
    assert changed_fields(cfg.to_dict(), checkpointed, "result") == []
    write_stamps(checkpointed)  # how an expert is trained is not what it is: make rebuilds nothing
    assert {p.name: p.read_text() for p in (tmp_path / "micro/.config").iterdir()} == stamps
    write_stamps(later)
    assert json.loads((tmp_path / "micro/.config/expert.json").read_text())["expert.grad_accum"] == 2


def test_a_stamp_changes_only_when_a_value_does(tmp_path):
    """A stamp holds every value; one lacking a field (added to the code since, or written when stamps held only
    what differed from the defaults) reads it at its default: same values, the stamp is left as it is, and
    make rebuilds nothing."""
    import os

    from common.config import load_config, write_stamps

    cfg = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={tmp_path}"])
    write_stamps(cfg)
    stamp = tmp_path / "micro/.config/interpolate.json"
    values = json.loads(stamp.read_text())
    assert values["interpolate.steps"] == 5 and "interpolate.grad_clip" in values  # every value, not only changes
    older = {k: v for k, v in values.items() if k != "interpolate.grad_clip"}  # a field the code has gained since
    stamp.write_text(json.dumps(older))
    os.utime(stamp, (0, 0))
    write_stamps(cfg)
    assert stamp.stat().st_mtime == 0 and json.loads(stamp.read_text()) == older
    write_stamps(load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={tmp_path}", "interpolate.steps=7"]))
    assert stamp.stat().st_mtime > 0 and json.loads(stamp.read_text())["interpolate.steps"] == 7
