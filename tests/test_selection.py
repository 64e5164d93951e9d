"""π-Tuning chosen on the target's validation split (interpolate.py --variant select,
interpolate.retrieval=select): every candidate retrieval scored on validation, the best kept, k = 0 among
them; test is never read to choose."""

from __future__ import annotations

import builtins
import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, backbone_only, inproc, stage

NAME = "snli-ve-8shot-s0"
CONFIG = ("--config", "configs/micro.yaml")


def test_a_candidate_that_hurts_on_validation_is_never_chosen(micro_copy):
    """With every pool expert spoilt (its update twenty times over), each interpolation with one hurts on
    validation: selection keeps the target's expert alone, bit for bit,
    and scores it as target-only scores."""
    runs, rd = micro_copy
    for t in ("nli", "shape"):
        f = (rd / "experts" / t / "adapter_model.safetensors").resolve()
        save_file({k: v * 20 if "lora_B" in k else v for k, v in load_file(str(f)).items()}, str(f))
    args = (*CONFIG, f"runs_dir={runs}")
    inproc("embed_tasks.py", "--target", "snli-ve", "--embedding", "fisher,weights,prototypes", *args)
    out = inproc("interpolate.py", "--target", "snli-ve", "--variant", "select", *args).stdout
    meta = json.loads((rd / f"interpolated/{NAME}.select/meta.json").read_text())
    scores = {tuple(c["experts"]): c["val"] for c in meta["candidates"]}
    alone = scores.pop(())
    assert scores and all(v < alone for v in scores.values()), scores  # every candidate with an expert hurts
    assert (
        meta["experts"] == [NAME]
        and "k = 0" in meta["retrieval"]
        and "select snli-ve-8shot-s0 on validation" in out
    )
    kept, target = (
        load_file(str(rd / d / "adapter_model.safetensors"))
        for d in (f"interpolated/{NAME}.select", f"experts/{NAME}")
    )
    assert kept.keys() == target.keys() and all(torch.equal(kept[k], target[k]) for k in kept)
    inproc("evaluate.py", "--target", "snli-ve", *args)
    result = json.loads((rd / f"results/{NAME}.json").read_text())
    assert result["scores"]["pi-select"] == result["scores"]["target-only"]


def test_the_choice_opens_no_test_file(micro, tmp_path, monkeypatch):
    """A target defined from files (a CSV of image paths): while the choice is made, opening its test file or
    a test image raises; the choice is made all the same. Evaluating, which scores test,
    is refused by the same guard."""
    from test_tasks import SHAPES, profile, write_user_files

    write_user_files(tmp_path / "data")
    runs = backbone_only(micro, tmp_path / "runs")
    config = profile(tmp_path, SHAPES, ["my-shapes", "nli", "my-entail"])
    args = ("--config", config, f"runs_dir={runs}", "tasks.target_shots=8")
    for cmd in (
        ("train_expert.py", "--task", "nli"),
        ("train_expert.py", "--task", "my-entail"),
        ("train_expert.py", "--task", "my-shapes", "--shots", "8"),
        ("embed_tasks.py", "--target", "my-shapes", "--embedding", "fisher,weights,prototypes"),
    ):
        inproc(*cmd, *args)
    test_files = ("shapes/test.csv", "shapes/images/test")

    def guarded(real):
        def opened(file, *a, **k):
            if any(t in str(file) for t in test_files):
                raise PermissionError(13, "the test split is not to be read here", str(file))
            return real(file, *a, **k)

        return opened

    monkeypatch.setattr(builtins, "open", guarded(builtins.open))
    monkeypatch.setattr(io, "open", guarded(io.open))
    code, out, err = stage("interpolate.py", "--target", "my-shapes", "--variant", "select", *args)
    assert code == 0, err
    assert (runs / "micro/interpolated/my-shapes-8shot-s0.select/meta.json").is_file()
    with pytest.raises(PermissionError):  # the guard holds: scoring test opens it
        stage("evaluate.py", "--target", "my-shapes", *args)


@pytest.mark.parametrize(
    "override, says",
    [
        ("interpolate.select_from=[weights,nope]", "field 'interpolate.select_from' names 'nope'"),
        ("interpolate.select_k=[0,1]", "field 'interpolate.select_k' holds 0"),
        ("interpolate.retrieval=best", "field 'interpolate.retrieval' is 'best'; use one of fixed, select"),
    ],
)
def test_a_bad_selection_setting_is_one_line(override, says):
    from common.config import load_config
    from common.errors import UserError

    with pytest.raises(UserError, match=says.replace("[", r"\[")):
        load_config(str(REPO / "configs/micro.yaml"), [override])


def test_a_candidate_is_the_interpolation_pi_tuning_makes_of_those_experts(micro_copy, monkeypatch):
    """Selection compares the target's expert alone with π-Tuning of each candidate set: a candidate must be
    trained and scored exactly as `interpolate.py` makes π-Tuning of the same experts, or the comparison with
    k = 0 is biased, however many candidates were trained before it in the same process. With the top-1 and
    top-2 by `weights` the candidates, the top-2's validation score is evaluate.py's for pi-tuning; every
    candidate is scored with dropout off (micro has none to show it in the scores; the mini backbone's 0.1
    cost each interpolated candidate about 0.02 of validation accuracy against the target's expert alone)."""
    import interpolate

    runs, rd = micro_copy
    real, modes = interpolate.task_scores, []

    def scoring(model, *a, **k):
        modes.append(any(m.training for m in model.modules()))
        return real(model, *a, **k)

    monkeypatch.setattr(interpolate, "task_scores", scoring)
    args = (*CONFIG, f"runs_dir={runs}", "interpolate.select_from=[weights]", "interpolate.select_k=[1,2]")
    inproc("embed_tasks.py", "--target", "snli-ve", "--embedding", "weights", *args)
    inproc("interpolate.py", "--target", "snli-ve", "--variant", "pi,select", *args)
    meta = json.loads((rd / f"interpolated/{NAME}.select/meta.json").read_text())
    pi = json.loads((rd / f"interpolated/{NAME}/meta.json").read_text())
    cand = {tuple(c["experts"]): c["val"] for c in meta["candidates"]}
    # alone, the top-1, then π-Tuning's top-2
    assert len(cand) == 3 and tuple(pi["experts"][1:]) in cand, cand
    assert modes == [False] * 3  # k = 0, the top-1, the top-2: each scored in eval mode
    # nothing of the candidates left over, not even a readable name pointing at them
    assert not [p.name for p in (rd / "interpolated").iterdir() if "candidates" in p.name]
    inproc("evaluate.py", "--target", "snli-ve", "evaluate.validation=true", *args)
    result = json.loads((rd / f"results/{NAME}.json").read_text())
    assert cand[()] == result["val_scores"]["target-only"]
    assert cand[tuple(pi["experts"][1:])] == result["val_scores"]["pi-tuning"]
