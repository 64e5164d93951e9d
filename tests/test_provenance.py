"""Results you can trust: every figure comes from artifacts made under the config in force (stale ones are
rebuilt by make, refused by a stage, left out of tables and the report), and bad values stop at the door."""

from __future__ import annotations

import dataclasses
import json

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
    numeric = [
        name for name, _, d in schema_fields() if isinstance(d, (int, float)) and not isinstance(d, bool)
    ]
    assert numeric and sorted(numeric) == sorted(name for name, _, _ in RANGED)


@pytest.mark.parametrize("name, allowed, default", RANGED, ids=[n for n, _, _ in RANGED])
def test_every_ranged_field_refuses_a_value_out_of_range(name, allowed, default):
    from common.config import load_config
    from common.errors import UserError

    assert default in allowed
    bad = allowed.outside()
    with pytest.raises(UserError, match=rf"override '{name}={bad}': field '{name}' is {bad!r}; use a value "):
        load_config("configs/micro.yaml", [f"{name}={bad}"])


@pytest.mark.parametrize("name", NONEMPTY)
def test_every_list_that_must_hold_something_refuses_an_empty_one(name):
    from common.config import load_config
    from common.errors import UserError

    with pytest.raises(UserError, match=rf"field '{name}' is empty"):
        load_config("configs/micro.yaml", [f"{name}=[]"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["interpolate.top_k=3"],
            "field 'interpolate.top_k' is 3, but tasks.pool has 2 tasks beside the target",
        ),
        (  # the override that left too few tasks is named, not the file that set top_k
            ["tasks.pool=[snli-ve,nli]"],
            r"^override 'tasks.pool=\[snli-ve,nli\]': field 'interpolate.top_k' is 2, but tasks.pool has 1",
        ),
        (["tasks.pool=[snli-ve,nli,nli]"], "field 'tasks.pool' names a task twice"),
        (["tasks.pool=[snli-ve,nli,null]"], "field 'tasks.pool' holds None, not a task name"),
        (
            ["tasks.pool=[snli-ve,nli,'null']"],
            "field 'tasks.pool' names a task 'null', the name of the transfer row's",
        ),
        (["backbone.heads=3"], "field 'backbone.heads' is 3, which does not divide backbone.d_model 32"),
        (["backbone.vision_heads=[1,1]"], "field 'backbone.vision_heads' has 2 entries, vision_dims 3"),
        (["expert.lr=.nan"], "field 'expert.lr' is nan; use a value 0 or more"),  # a range holds no NaN
    ],
)
def test_fields_that_must_agree_are_checked_together(overrides, message):
    from common.config import load_config
    from common.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config("configs/micro.yaml", overrides)


def files(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize(
    "args, message",
    [
        (["train_expert.py", "--task", "snli-ve", "--shots", "-5"], "--shots -5: use 0"),
        (
            ["train_expert.py", "--task", "snli-ve", "--shots", "65"],
            "--shots is 65, but snli-ve's train split has 64",
        ),
        (["embed_tasks.py", "--target", "snli-ve", "tasks.pool=[]"], "field 'tasks.pool' is empty"),
        # what a stage reads is this config's (its path carries the config's digest): another config's is not
        # there, and the refusal names the command that makes it, as typed
        (
            ["embed_tasks.py", "--target", "snli-ve", "expert.r=2"],
            "missing expert; run `.venv/bin/python train_expert.py "
            "--task snli-ve --shots 8 --config configs/micro.yaml ",
        ),
        (
            ["interpolate.py", "--target", "snli-ve", "embed.normalize=none"],
            "missing similarity; run `.venv/bin/python embed_tasks.py --target snli-ve "
            "--config configs/micro.yaml ",
        ),
        (
            ["evaluate.py", "--target", "snli-ve", "interpolate.steps=3"],
            "missing interpolated expert; run `.venv/bin/python interpolate.py --target snli-ve "
            "--config configs/micro.yaml ",
        ),
        (
            ["train_expert.py", "--task", "nli", "pretrain.steps=21"],
            "no backbone built under this config; run `.venv/bin/python train_expert.py --pretrain ",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(micro, args, message):
    before = files(micro[0])
    code, _, err = stage(*args, *CONFIG, f"runs_dir={micro[0]}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert files(micro[0]) == before


def test_the_command_a_refusal_names_works_as_typed(micro_copy):
    """A stage refused for a missing input names the command that makes it, with --config and the overrides:
    typed in a shell (in the repo, with the venv's python), it makes exactly what was missing."""
    import shlex
    import subprocess
    import sys

    runs = micro_copy[0]
    code, _, err = stage(
        "embed_tasks.py", "--target", "snli-ve", *CONFIG, f"runs_dir={runs}", "expert.steps=3"
    )
    command = err.split("run `", 1)[1].split("`", 1)[0]
    assert (
        code == 2
        and command.startswith(
            ".venv/bin/python train_expert.py --task snli-ve --shots 8 --config configs/micro.yaml "
        )
        and "expert.steps=3" in command
    )
    words = shlex.split(command)
    subprocess.run([sys.executable, *words[1:]], cwd=REPO, check=True, capture_output=True)
    code, _, err = stage(
        "embed_tasks.py", "--target", "snli-ve", *CONFIG, f"runs_dir={runs}", "expert.steps=3"
    )
    assert code == 2 and "--task nli" in err  # the next one missing: the pool's experts of that config


def test_a_nan_loss_stops_the_stage_and_writes_no_expert(micro_copy):
    runs, rd = micro_copy
    before = files(rd)
    p = inproc(
        "train_expert.py",
        "--task",
        "snli-ve",
        "--shots",
        "4",
        *CONFIG,
        f"runs_dir={runs}",
        "expert.lr=1e9",
        "expert.grad_clip=0",
        check=False,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "expert snli-ve-4shot-s0: loss nan at step" in p.stderr and "lower expert.lr" in p.stderr
    assert files(rd) == before  # no expert directory, no temp directory beside it


def test_after_a_rebuilt_backbone_no_stage_uses_the_old_experts_or_fishers(micro_copy):
    from common.config import load_config
    from common.experts import expert_dir
    from common.similarity import fisher_cache

    runs, rd = micro_copy
    before = load_config("configs/micro.yaml", [f"runs_dir={runs}"])
    old = [fisher_cache(before, n) for n in ("nli", NAME)]
    inproc("train_expert.py", "--pretrain", *CONFIG, f"runs_dir={runs}", "pretrain.steps=21")
    assert len(list(rd.glob("backbone@*"))) == 2  # the other backbone kept beside it
    code, out, err = stage(
        "embed_tasks.py", "--target", "snli-ve", *CONFIG, f"runs_dir={runs}", "pretrain.steps=21"
    )
    assert code == 2 and "missing expert" in err and "cached" not in out
    after = load_config("configs/micro.yaml", [f"runs_dir={runs}", "pretrain.steps=21"])
    # an old Fisher is never found: it sits beside its expert's name@digest
    for n, (path, _) in zip(("nli", NAME), old):
        assert (
            path.name.startswith(expert_dir(before, n).name)
            and expert_dir(after, n).name != expert_dir(before, n).name
        )


def test_the_fisher_cache_key_holds_every_setting_that_changes_the_fisher(micro):
    from common.config import load_config
    from common.similarity import fisher_cache

    def key(name, *overrides):
        return fisher_cache(load_config("configs/micro.yaml", [f"runs_dir={micro[0]}", *overrides]), name)[1]

    def expert(name, *overrides):
        from common.experts import expert_dir

        return expert_dir(load_config("configs/micro.yaml", [f"runs_dir={micro[0]}", *overrides]), name).name

    assert key("nli") == key("nli", "embed.batch_size=2")  # a per-sample Fisher takes one example at a time
    assert key("nli", "embed.estimator=batch") != key("nli", "embed.estimator=batch", "embed.batch_size=2")
    for setting in ("embed.samples=4", "embed.passes=2"):
        assert key("nli") != key("nli", setting), setting
    # another expert (its own name@digest, its own Fisher)
    for setting in ("world.train_size=60", "data.train_size=9"):
        assert expert("nli") != expert("nli", setting), setting
    for setting in ("world.val_size=9", "world.test_size=9", "data.val_size=9", "data.test_size=9"):
        assert key("nli") == key("nli", setting), setting  # the Fisher reads the train split alone
    # the target's k-shot sample depends on the sampling, a pool expert's full split does not
    assert expert(NAME) != expert(NAME, "tasks.shots_per_class=true")
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


def times(root):
    return {
        p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in root.rglob("*")
        if not p.is_symlink()
    }


def test_an_override_then_the_default_again_rebuilds_nothing_and_keeps_both_results(micro_copy):
    """(1) make with an override, then with the profile as written: the second make finds everything it needs
    (the artifacts of each config live at their own paths), and both configs' results stay, each table headed
    by the fields that make its config."""
    runs, rd = micro_copy
    first = make("all", runs_dir=runs, extra="interpolate.top_k=1").stdout
    assert "interpolate.py" in first and "evaluate.py" in first and "train_expert.py" not in first
    assert "## configs/micro.yaml with interpolate.top_k=1 (this config)" in first
    again = make("all", runs_dir=runs).stdout
    assert ".py --" not in again.replace("evaluate.py --tables", "")  # nothing rebuilt
    assert (
        "## configs/micro.yaml as written (this config)" in again
        and "## configs/micro.yaml with interpolate.top_k=1" in again
    )
    assert len(list((rd / "results").glob(f"{NAME}@*.json"))) == 2
    assert ".py --" not in make("all", runs_dir=runs, extra="interpolate.top_k=1").stdout.replace(
        "--tables", ""
    )
    # (6) the two configs side by side, seed by seed: make compare
    table = make("compare", "AGAINST=interpolate.top_k=1", runs_dir=runs).stdout
    assert (
        "- A: configs/micro.yaml as written" in table
        and "- B: configs/micro.yaml with interpolate.top_k=1" in table
    )
    assert "| 8-shot | pi-tuning |" in table and (rd / "compare-snli-ve.md").is_file()


def test_prune_drops_what_this_config_would_not_make_and_clean_drops_the_profile(micro_copy):
    """Disk in check: make prune keeps exactly what the config in force is made of (another config's
    interpolation and result go, with the links left dangling), so make all after it does nothing; make clean
    removes the whole run folder, the backbone too, and says so."""
    runs, rd = micro_copy
    make("all", runs_dir=runs, extra="interpolate.steps=3")
    kept = {p for p in rd.rglob("*@*") if not p.is_symlink()}
    out = make("prune", runs_dir=runs).stdout
    gone = kept - {p for p in rd.rglob("*@*") if not p.is_symlink()}
    assert "removed" in out and gone and all(p.parent.name in ("interpolated", "results") for p in gone), gone
    # the interpolation, its result, its tables
    assert {p.name.split("@")[0] for p in gone} == {NAME, "snli-ve"}
    assert len(list((rd / "results").glob("snli-ve@*.md"))) == 1  # the config in force keeps its own tables
    assert ".py --" not in make("all", runs_dir=runs).stdout.replace("common.report", "")
    out = make("clean", runs_dir=runs).stdout
    assert f"removing {rd}" in out and "the backbone too" in out and not rd.exists()


def test_make_n_writes_nothing(micro_copy):
    """(2) make -n plans without touching a file: no stamp, no cache, no link."""
    runs = micro_copy[0]
    before = times(runs)
    plan = make("-n", "all", runs_dir=runs, extra="expert.steps=3").stdout
    assert "train_expert.py --task nli" in plan
    plan = make(
        "-n", "report", "REPORT_SHOTS=8", "TRANSFER_SHOTS=8", "REPORT_SEEDS=0 1", runs_dir=runs
    ).stdout
    assert "--variant pairs" in plan and "seed=1" in plan
    assert times(runs) == before


def test_a_stage_run_by_hand_is_what_make_would_make(micro_copy):
    """(3) interpolate.py by hand with an override, then make with the same override: make finds it and
    rebuilds nothing before evaluate; then make with the profile as written: nothing refused,
    its own artifacts found."""
    runs, rd = micro_copy
    inproc("interpolate.py", "--target", "snli-ve", *CONFIG, f"runs_dir={runs}", "interpolate.groups=global")
    out = make("all", runs_dir=runs, extra="interpolate.groups=global").stdout
    assert "interpolate.py" not in out and "evaluate.py --target snli-ve" in out
    out = make("all", runs_dir=runs).stdout
    assert "error" not in out and "| pi-tuning |" in out and "interpolate.py" not in out


def test_the_pool_list_and_the_sampling_are_made_from_apart(micro_copy):
    runs = micro_copy[0]
    # dry run
    plan = make("-n", "all", runs_dir=runs, extra="tasks.pool=[snli-ve,nli] interpolate.top_k=1").stdout
    # no expert retrains
    assert "embed_tasks.py" in plan and "interpolate.py" in plan and "train_expert.py" not in plan
    plan = make("-n", "all", runs_dir=runs, extra="tasks.shots_per_class=true").stdout
    assert (
        "train_expert.py --task snli-ve --shots 8" in plan
        and "--task nli" not in plan
        and "--task shape" not in plan
    )


def test_larger_scored_splits_rescore_and_rebuild_nothing(micro_copy):
    """world.test_size: only evaluate.py reruns; the backbone, the experts, the Fishers and the interpolation
    are made from the training data, not the scored splits."""
    runs = micro_copy[0]
    plan = make("-n", "all", runs_dir=runs, extra="world.test_size=30").stdout  # dry run
    assert "evaluate.py --target snli-ve" in plan
    assert not any(s in plan for s in ("train_expert.py", "embed_tasks.py", "interpolate.py")), plan


def test_a_new_task_defined_beside_a_built_pool_rebuilds_no_other_expert(micro_copy, tmp_path):
    """(7) A profile that defines one task of its own beside the built pool: only that task's expert is made;
    no other expert is rebuilt or refused (an expert is made from its own task's definition,
    not every task's)."""
    import yaml

    runs = micro_copy[0]
    rows = [
        {
            "premise": f"a {c} circle is at the top",
            "hypothesis": f"a {d} circle is at the top",
            "label": int(c != d),
        }
        for c in ("red", "blue", "green")
        for d in ("red", "blue", "green")
    ]
    (tmp_path / "entail.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    define = {
        "my-entail": {
            "files": {"train": str(tmp_path / "entail.jsonl"), "test": str(tmp_path / "entail.jsonl")},
            "prompt": ' can text1 " {premise} " imply text2 " {hypothesis} "?',
            "answer": "label",
            "labels": {0: "yes", 1: "no"},
        }
    }
    config = tmp_path / "mine.yaml"  # micro, and one task of its own in the pool
    config.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO / "configs/micro.yaml"),
                "tasks": {"define": define, "pool": ["snli-ve", "nli", "shape", "my-entail"]},
            }
        )
    )
    out = make("all", f"CONFIG={config}", runs_dir=runs).stdout
    assert "train_expert.py --task my-entail" in out and "--task nli" not in out and "--task shape" not in out
    assert "train_expert.py --task snli-ve --shots 8" not in out and "| pi-tuning |" in out


def test_digests_ignore_fields_at_their_default_and_how_an_artifact_is_made(tmp_path):
    """A field the code gains later sits at its default: no digest moves. Activation checkpointing and the
    loop's checkpoints change how an artifact is made, not what it is."""
    from common.config import load_config
    from common.provenance import digest

    cfg = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={tmp_path}"])
    same = load_config(
        str(REPO / "configs/micro.yaml"),
        [
            f"runs_dir={tmp_path}",
            "expert.grad_accum=1",
            "expert.gradient_checkpointing=true",
            "interpolate.checkpoint_every=2",
            "threads=1",
        ],
    )
    for kind, name in (
        ("backbone", ""),
        ("expert", "nli"),
        ("expert", NAME),
        ("similarity", NAME),
        ("interpolated", NAME),
        ("result", NAME),
    ):
        assert digest(cfg, kind, name) == digest(same, kind, name), kind
    later = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={tmp_path}", "expert.grad_accum=2"])
    assert digest(later, "expert", "nli") != digest(cfg, "expert", "nli")
    assert digest(later, "backbone") == digest(cfg, "backbone")


ENTAIL = {
    "files": {"train": "e.jsonl", "test": "e.jsonl"},
    "answer": "label",
    "labels": {0: "yes", 1: "no"},
    "prompt": ' can text1 " {premise} " imply text2 " {hypothesis} "?',
}


@pytest.mark.parametrize(
    "change, says",
    [
        (
            "tasks.target_shots=1000",
            "field 'tasks.target_shots' is 1000, but snli-ve's train split has 64 examples",
        ),
        (
            "tasks.pool=[snli-ve,nli,shpe]",
            "unknown task 'shpe' in tasks.pool (override 'tasks.pool=[snli-ve,nli,shpe]')",
        ),
        ("interpolate.topk=3", "override 'interpolate.topk=3': unknown field 'interpolate.topk'"),
        (
            "backbone.source=/nowhere/at/all",
            "backbone.source '/nowhere/at/all' is a path that does not exist",
        ),
        ("backbone.source=EMPTY", "is an empty directory"),
        ("backbone.source=NOT_A_CHECKPOINT", "is not a checkpoint (no config.json in it)"),
        (
            {"my-entail": ENTAIL | {"answer": "anwser"}},
            "tasks.define.my-entail.answer: column 'anwser' is not in",
        ),
        (
            {"my-entail": ENTAIL | {"colum": "x"}},
            "tasks.define.my-entail.colum is not a field of a task definition",
        ),
        (
            {"my-entail": ENTAIL | {"prompt": ' does " {premise} " entail " {hypothesis} "?'}},
            "uses words the embedded backbone's vocabulary lacks: entail; it has the mini world's",
        ),
    ],
)
def test_every_config_error_stops_make_before_the_first_stage_in_one_line(tmp_path, change, says):
    """(5) What a stage would find only after the backbone and the pool experts trained, make refuses before
    running any: one line, exit 2, nothing written."""
    import yaml

    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NOT_A_CHECKPOINT").mkdir()
    (tmp_path / "NOT_A_CHECKPOINT/model.safetensors").write_bytes(b"")
    (tmp_path / "e.jsonl").write_text(
        json.dumps({"premise": "a red circle", "hypothesis": "a circle", "label": 0}) + "\n"
    )
    config = tmp_path / "mine.yaml"
    base = {"base": str(REPO / "configs/micro.yaml"), "data": {"root": str(tmp_path)}}
    extra = ""
    if isinstance(change, dict):
        base["tasks"] = {"define": change, "pool": ["snli-ve", "nli", "my-entail"]}
    else:
        extra = change.replace("EMPTY", str(tmp_path / "EMPTY")).replace(
            "NOT_A_CHECKPOINT", str(tmp_path / "NOT_A_CHECKPOINT")
        )
    config.write_text(yaml.safe_dump(base))
    p = make("all", f"CONFIG={config}", runs_dir=tmp_path / "runs", extra=extra, check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and says in errors[0], p.stderr
    assert "Traceback" not in p.stderr and ".py " not in p.stdout and not (tmp_path / "runs").exists()


def test_each_pool_expert_is_merged_at_its_own_saved_scale(micro_copy):
    """An expert saved with twice the alpha and half the B adds the same update:
    the merge sees the same tensors."""
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
        assert old.keys() == new.keys() and all(
            torch.allclose(old[k], new[k], atol=0, rtol=1e-6) for k in old
        )
