"""The four stages on the micro profile, end to end through `make all`, and what a user checks after."""

import json
import re
import shutil

import pytest
import torch

from conftest import cached, inproc, make, stage

NAME = "snli-ve-8shot-s0"


def test_make_all_writes_every_artifact(micro):
    _, rd, out = micro
    meta = json.loads((rd / "backbone/meta.json").read_text())
    assert meta["kind"] == "embedded-florence2" and (rd / "backbone/model.safetensors").is_file()
    for name in ("nli", "shape", NAME):
        e = rd / "experts" / name
        assert (e / "adapter_config.json").is_file() and (e / "adapter_model.safetensors").is_file()
        m = json.loads((e / "meta.json").read_text())
        assert (
            m["backbone"] and m["method"] == "lora" and "val_value" in m and m["config"]["profile"] == "micro"
        )
    assert json.loads((rd / f"experts/{NAME}/meta.json").read_text())["train_size"] == 8
    assert not (rd / "experts/snli-ve").exists()  # the target's full-data expert would leak its labels
    sim = json.loads((rd / f"similarity/{NAME}.json").read_text())
    assert sim["names"][0] == NAME and sorted(sim["top_k"]) == ["nli", "shape"]
    w = json.loads((rd / f"interpolated/{NAME}/weights.json").read_text())
    for probs in w["groups"].values():
        assert abs(sum(probs.values()) - 1) < 1e-5
    res = json.loads((rd / f"results/{NAME}.json").read_text())
    assert set(res["scores"]) == {
        "zero-shot",
        "target-only",
        "uniform-merge",
        "linear-merge",
        "ties-merge",
        "pi-tuning",
    }
    assert all(0 <= v <= 1 for v in res["scores"].values())
    assert out.count("| pi-tuning |") == 1  # make all prints the table, once


def test_what_the_backbone_sees_is_recorded_and_does_not_depend_on_the_probes_batches(micro, micro_cfg):
    """meta.json's caption-word accuracy per attribute is what the saved backbone gives on the validation
    captions, whether they are probed in one batch or in several (bench/pretrain_bench.py probes 1,000)."""
    from common import data
    from common.backbone import load_backbone
    from train_expert import attribute_probe

    meta = json.loads((micro[1] / "backbone/meta.json").read_text())
    model, processor = load_backbone(micro_cfg)
    enc = data.Encoder(processor, "cpu")
    exs = data.examples("pt-caption", "val", micro_cfg.world, 200)
    whole, chunked = attribute_probe(model, enc, exs), attribute_probe(model, enc, exs, batch_size=5)
    assert len(exs) > 5 and whole == chunked == meta["val_caption_word_accuracy"]
    assert set(whole) == {"shape", "colour", "size", "count", "position"} and any(whole.values())


def test_retrieval_compares_the_target_alone_and_the_report_draws_the_whole_matrix(micro, micro_cfg):
    """A target's similarity file holds its row (N - 1 comparisons, not the N^2 / 2 of the matrix); the
    whole matrix the report draws, from the cached embeddings, is symmetric with a unit diagonal and that row
    first."""
    from common.report import _whole

    sim = json.loads((micro[1] / f"similarity/{NAME}.json").read_text())
    assert "matrix" not in sim and sim["row"][0] == 1.0 and len(sim["row"]) == len(sim["names"])
    m = _whole(micro_cfg, sim)["matrix"]
    assert all(m[i][i] == 1 for i in range(len(m))) and m[0] == sim["row"]
    assert all(abs(m[i][j] - m[j][i]) < 1e-12 for i in range(len(m)) for j in range(len(m)))
    csv = (micro[1] / f"similarity/{NAME}.csv").read_text().splitlines()
    assert csv[0] == "task," + ",".join(sim["names"]) and len(csv) == 2


def test_second_make_does_no_work_and_a_deleted_expert_reruns_only_what_depends_on_it(micro_copy):
    runs, rd = micro_copy
    again = make("all", runs_dir=runs)
    assert ".py" not in again.stdout.replace("pipeline.mk", ""), again.stdout
    shutil.rmtree((rd / "experts/shape").resolve())  # the artifact, not just its readable name
    redo = make("all", runs_dir=runs).stdout
    assert "train_expert.py --task shape" in redo
    assert "--pretrain" not in redo and "--task nli" not in redo and "--shots" not in redo
    assert "embed_tasks.py" in redo and "interpolate.py" in redo and "evaluate.py" in redo
    # retraining is deterministic: the same bytes again, so its cached Fisher still applies
    assert "(0 Fisher computed, 3 cached)" in redo, redo


def test_fisher_is_recomputed_only_for_a_changed_expert(micro_copy):
    from safetensors.torch import load_file, save_file

    runs = micro_copy[0]
    f = runs / "micro/experts/nli/adapter_model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(str(f)).items()}, str(f))
    out = inproc(
        "embed_tasks.py", "--target", "snli-ve", "--config", "configs/micro.yaml", f"runs_dir={runs}"
    ).stdout
    assert "(1 Fisher computed, 2 cached)" in out


def test_fisher_passes_repeat_the_few_shots_with_dropout_and_are_reproducible(micro_copy):
    from safetensors.torch import load_file

    runs = micro_copy[0]
    fd = runs / "micro/fisher"
    conf = runs / "micro/backbone/config.json"  # micro's backbone has no dropout; mini's and Florence-2's do
    c = json.loads(conf.read_text())
    c["text_config"]["dropout"] = 0.1
    conf.write_text(json.dumps(c))
    cmd = (
        "python",
        "embed_tasks.py",
        "--target",
        "snli-ve",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={runs}",
        "embed.samples=16",
        "embed.passes=4",
    )  # the 8-shot target: 2 passes; the pool: one pass over 16
    assert "(3 Fisher computed, 0 cached)" in inproc(*cmd).stdout
    sim = json.loads((runs / f"micro/similarity/{NAME}.json").read_text())
    assert sim["embed"]["passes"] == 4
    first = {n: load_file(str(cached(fd, n, ".passes4"))) for n in (NAME, "nli")}
    for n in first:
        cached(fd, n, ".passes4").unlink()
    assert "(2 Fisher computed, 1 cached)" in inproc(*cmd).stdout
    for n, fisher in first.items():  # the same dropout whichever process computes it
        assert all(torch.equal(v, load_file(str(cached(fd, n, ".passes4")))[k]) for k, v in fisher.items())
    inproc(*cmd[:-1])  # one pass, dropout off: a different estimate, cached beside it
    one = load_file(str(cached(fd, NAME)))
    assert not all(torch.allclose(v, one[k]) for k, v in first[NAME].items())


def test_fisher_at_a_common_point_and_with_the_models_answers(micro_copy):
    """embed.at: pool-mean takes every task's Fisher at the mean pool expert: none depends on the target's
    expert (changing it recomputes nothing), a changed pool expert moves the point (all recomputed), and they
    differ from those at each expert's own weights. embed.answers: model draws the answers from the model,
    the same ones whichever process does."""
    from safetensors.torch import load_file, save_file

    runs = micro_copy[0]
    fd = runs / "micro/fisher"
    cmd = ("embed_tasks.py", "--target", "snli-ve", "--config", "configs/micro.yaml", f"runs_dir={runs}")
    out = inproc(*cmd, "--embedding", "fisher-common,fisher-model").stdout
    assert "(3 Fisher computed, 0 cached)" in out
    common = {n: load_file(str(cached(fd, n, ".at-pool-mean"))) for n in (NAME, "nli")}
    own = load_file(str(cached(fd, "nli")))
    assert not all(torch.allclose(v, own[k]) for k, v in common["nli"].items())
    drawn = load_file(str(cached(fd, "nli", ".model-answers")))
    assert not all(torch.allclose(v, own[k]) for k, v in drawn.items())
    cached(fd, "nli", ".model-answers").unlink()
    f = runs / f"micro/experts/{NAME}/adapter_model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(str(f)).items()}, str(f))
    assert "(0 Fisher computed, 3 cached)" in inproc(*cmd, "embed.at=pool-mean").stdout
    f = runs / "micro/experts/shape/adapter_model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(str(f)).items()}, str(f))
    assert "(3 Fisher computed, 0 cached)" in inproc(*cmd, "embed.at=pool-mean").stdout
    assert not all(
        torch.equal(v, load_file(str(cached(fd, "nli", ".at-pool-mean")))[k])
        for k, v in common["nli"].items()
    )
    inproc(*cmd, "embed.answers=model")
    assert all(
        torch.equal(v, load_file(str(cached(fd, "nli", ".model-answers")))[k]) for k, v in drawn.items()
    )


def test_weight_embedding_needs_no_fisher_and_no_backbone_pass(micro_copy):
    runs = micro_copy[0]
    shutil.rmtree(runs / "micro/fisher")
    (runs / "micro/backbone/config.json").write_text("not a model config")  # a backbone pass would fail on it
    out = inproc(
        "embed_tasks.py",
        "--target",
        "snli-ve",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={runs}",
        "embed.embedding=weights",
    ).stdout
    assert "(weight updates)" in out and not (runs / "micro/fisher").exists()
    sim = json.loads((runs / f"micro/similarity/{NAME}.json").read_text())
    assert sim["embed"] == {"embedding": "weights"} and len(sim["top_k"]) == 2
    row = sim["row"]
    assert row[0] == 1.0 and all(-1 <= v <= 1 for v in row)
    # from the LoRA factors, B·A never formed: the same as the cosine of the formed products, the same top-k
    from common.config import load_config
    from common.experts import expert_dir, load_expert_weights
    from common.methods import top_k_similar
    from common.similarity import expert_update, similarity_matrix, update_similarity

    cfg = load_config("configs/micro.yaml", [f"runs_dir={runs}"])
    dense = [expert_update(load_expert_weights(expert_dir(cfg, n)), "lora") for n in sim["names"]]
    formed = similarity_matrix(dense, update_similarity)
    assert all(abs(a - b) < 1e-6 for a, b in zip(row, formed[0]))
    assert top_k_similar(sim["names"], formed[0], 2) == sim["top_k"]


def test_a_new_embedding_is_one_entry_in_each_registry(micro_copy, monkeypatch):
    """An embedding added to common/embeddings.py (its name) and common/similarity.py (how it is computed) is
    a config choice, retrieval's embedding and one of --embedding's alternatives;
    its similarity file says which."""
    from safetensors.torch import load_file

    from common.embeddings import EMBEDDINGS, Embedding
    from common.experts import WEIGHTS, expert_dir
    from common.similarity import COMPUTE, Computed

    def norms(cfg, names):  # each expert as the norms of its saved tensors
        weights = [load_file(str(expert_dir(cfg, n) / WEIGHTS)) for n in names]
        return [torch.stack([w[k].norm() for k in sorted(w)]) for w in weights], "tensor norms"

    monkeypatch.setitem(EMBEDDINGS, "norms", Embedding("norms", "norms of the expert's tensors"))
    monkeypatch.setitem(
        COMPUTE, "norms", Computed(norms, lambda a, b: torch.cosine_similarity(a, b, dim=0).item())
    )
    runs = micro_copy[0]
    args = ("embed_tasks.py", "--target", "snli-ve", "--config", "configs/micro.yaml", f"runs_dir={runs}")
    assert "(tensor norms)" in inproc(*args, "embed.embedding=norms").stdout
    sim = json.loads((runs / f"micro/similarity/{NAME}.json").read_text())
    assert sim["embed"] == {"embedding": "norms"} and len(sim["top_k"]) == 2 and 0 < sim["row"][1] < 1
    inproc(*args, "--embedding", "norms,weights")
    beside = json.loads((runs / f"micro/similarity/{NAME}.norms.json").read_text())
    assert beside["row"] == sim["row"]
    monkeypatch.delitem(EMBEDDINGS, "norms")
    code, _, err = stage(*args, "embed.embedding=norms")
    assert code == 2 and "field 'embed.embedding' is 'norms'; use one of fisher, weights" in err


def test_exported_merge_reproduces_the_interpolated_model(micro_cfg, tmp_path):
    """The exact LoRA merge exported at rank k*r reloads with plain peft and gives the same logits."""
    from peft import PeftModel
    from torch.func import functional_call

    from common import data
    from common.backbone import load_backbone
    from common.expert_types import EXPERT_TYPES
    from common.experts import attach, group_of, load_pool, set_weights
    from common.merge import ExpertStack

    experts = [NAME, "nli", "shape"]
    lora = EXPERT_TYPES["lora"]
    stack = ExpertStack(
        load_pool(micro_cfg, experts), group_of("site", lora), merge="lowrank", trainable=True
    )
    logits = torch.randn(len(stack.group_names), 3, generator=torch.Generator().manual_seed(0))
    model, processor = load_backbone(micro_cfg)
    peft_model = attach(model, micro_cfg.expert, rank_multiplier=3).eval()
    batch = data.Encoder(processor).batch(data.examples("snli-ve", "test", micro_cfg.world, 6))
    merged = {lora.live(k, "default"): v for k, v in stack(logits).items()}
    with torch.no_grad():
        live = functional_call(peft_model, merged, args=(), kwargs=batch).logits
        set_weights(peft_model, {k: v.contiguous() for k, v in stack(logits).items()})
        peft_model.save_pretrained(tmp_path)
        base, _ = load_backbone(micro_cfg)
        reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()(**batch).logits
        plain, _ = load_backbone(micro_cfg)
        untouched = plain(**batch).logits
    assert torch.allclose(live, reloaded, atol=1e-5)
    assert not torch.allclose(live, untouched, atol=1e-3)  # the merge does change the model


def test_the_transfer_rows_control_adds_nothing_and_stays_out_of_the_row(micro_copy, micro_cfg):
    """pair-null pairs the target's expert with one whose update is zero: trained as every pair run is, its
    half of the exported rank-2r LoRA is still exactly zero, so the run is the target's expert as the
    interpolation leaves it; evaluate.py --transfer reports it as the row's control, not as a pool expert."""
    from common.config import load_config
    from common.errors import UserError
    from common.experts import load_expert_weights
    from common.methods import PAIR

    runs, rd = micro_copy
    args = ("--config", "configs/micro.yaml", f"runs_dir={runs}")
    inproc("interpolate.py", "--target", "snli-ve", "--variant", "pair-null", *args)
    out = rd / f"interpolated/{NAME}.pair-null"
    assert json.loads((out / "weights.json").read_text())["experts"] == [NAME, "null"]
    r = micro_cfg.expert.r
    weights = load_expert_weights(out)
    a = {k: v for k, v in weights.items() if "lora_A" in k}
    assert a and all(v.shape[0] == 2 * r for v in a.values())
    for k, v in a.items():
        b = weights[k.replace("lora_A", "lora_B")]
        assert v[:r].abs().sum() > 0 and b[:, :r].abs().sum() > 0  # the target's half trained
        # the null half: still zero after training, in every site
        assert not v[r:].any() and not b[:, r:].any(), k
    p = inproc("evaluate.py", "--target", "snli-ve", "--transfer", *args)
    row = json.loads((rd / f"results/{NAME}.transfer.json").read_text())
    assert "null" not in row["transfer"] and "null" not in row["val_transfer"]
    assert row["control"] == pytest.approx(
        row["scores"]["pair-null"] - row["scores"]["target-only"], abs=1e-4
    )
    assert "control (pair-null)" in p.stdout
    prompt = load_config("configs/micro.yaml", ["expert.method=prompt"])  # a soft token is never nothing
    with pytest.raises(UserError, match="expert.method=prompt has no expert that changes nothing"):
        PAIR.pick(prompt, NAME, "pair-null", ["nli"], None)


def test_stacking_learns_the_mix_on_held_out_examples_and_exports_the_full_expert_under_it(micro_copy):
    """interpolate.holdout=0.5: make refits the target's expert without a seeded half of its 8 examples (the
    fold expert), the mix learns on that half, and the artifact holds the target's expert fitted on all 8
    under the learned weights (experts frozen here, so exactly): the fold expert is in no artifact. Without
    the fold expert, interpolate.py stops in one line saying how to make it."""
    from common import data
    from common.config import load_config
    from common.experts import load_expert_weights

    runs, rd = micro_copy
    extra = "interpolate.holdout=0.5 interpolate.train_experts=false"
    out = make("all", runs_dir=runs, extra=extra).stdout
    # the rest kept
    assert "--variant fold" in out and "--task nli" not in out and "--shots 8 --config" not in out
    cfg = load_config("configs/micro.yaml", [f"runs_dir={runs}", *extra.split()])
    train = data.train_split(cfg, "snli-ve", 8, 0)
    rest, held = data.fold_split(cfg, train, 0)

    def key(e):
        return e.prompt, e.answer, e.image.tobytes()

    assert len(rest) == len(held) == 4 and sorted(map(key, rest + held)) == sorted(map(key, train))
    fold = json.loads((rd / f"experts/{NAME}.fold/meta.json").read_text())
    meta = json.loads((rd / f"interpolated/{NAME}/meta.json").read_text())
    assert (
        fold["train_size"] == 4
        and fold["holdout"] == 0.5
        and (meta["mix_size"], meta["train_size"]) == (4, 8)
    )
    full, refit = (
        load_expert_weights(rd / f"experts/{NAME}"),
        load_expert_weights(rd / f"experts/{NAME}.fold"),
    )
    merged, r = load_expert_weights(rd / f"interpolated/{NAME}"), cfg.expert.r
    a_keys = [k for k in merged if "lora_A" in k]
    assert a_keys and all(not torch.equal(full[k], refit[k]) for k in a_keys)
    for k in a_keys:  # the exact merge's A_cat is [A_target; A_1; A_2], unweighted
        assert torch.equal(merged[k][:r], full[k]), k

    again = make("all", runs_dir=runs, extra=extra.replace("0.5", "0.25")).stdout  # another split: refitted
    fold = json.loads((rd / f"experts/{NAME}.fold/meta.json").read_text())
    assert "--variant fold" in again and fold["holdout"] == 0.25 and fold["train_size"] == 6
    for made in (rd / "experts").glob(f"{NAME}.fold@*"):  # both holdouts' fold experts, kept side by side
        shutil.rmtree(made)
    code, _, err = stage(
        "interpolate.py",
        "--target",
        "snli-ve",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={runs}",
        *extra.split(),
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--variant fold" in err and "holdout" in err
    code, _, err = stage(
        "train_expert.py",
        "--task",
        "snli-ve",
        "--shots",
        "8",
        "--variant",
        "fold",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={runs}",
    )
    assert code == 2 and "field 'interpolate.holdout' is 0" in err


def test_pi_tuning_artifact_loads_with_plain_peft(micro, micro_cfg):
    from peft import PeftConfig

    cfg = PeftConfig.from_pretrained(str(micro[1] / f"interpolated/{NAME}"))
    assert cfg.r == 3 * micro_cfg.expert.r  # one ordinary LoRA of rank k*r


@pytest.mark.parametrize(
    "args, message",
    [
        (["train_expert.py", "--task", "snli"], "unknown task 'snli' in --task"),
        (
            ["train_expert.py", "--config", "configs/nope.yaml", "--task", "nli"],
            "configs/nope.yaml: config file not found",
        ),
        (["train_expert.py", "--task", "nli", "expert.rank=3"], "unknown field 'expert.rank'"),
        (
            ["interpolate.py", "--target", "nli"],
            "missing similarity; run `.venv/bin/python embed_tasks.py --target nli",
        ),
        (["evaluate.py", "--target", "shape"], "missing interpolated expert"),
        (
            ["interpolate.py", "--target", "snli-ve", "interpolate.experts=[vqa]"],
            "interpolate.experts names 'vqa'",
        ),
        (
            ["interpolate.py", "--target", "snli-ve", "--variant", "pi,randmo"],
            "--variant 'randmo': use pi, random",
        ),
        (
            ["train_expert.py", "--task", "snli-ve", "--shots", "8", "--variant", "2x,ft"],
            "--variant '2x,ft': use 2x",
        ),
        (["train_expert.py", "--task", "nli", "--variant", "2x"], "with --shots"),
        (
            ["embed_tasks.py", "--target", "snli-ve", "--embedding", "fisher,weight"],
            "--embedding 'fisher,weight'",
        ),
        (
            ["embed_tasks.py", "--target", "snli-ve", "embed.passes=0"],
            "field 'embed.passes' is 0; use a value 1 or more",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(micro, args, message):
    config = [] if "--config" in args else ["--config", "configs/micro.yaml"]
    code, _, err = stage(*args, *config, f"runs_dir={micro[0]}")
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_and_corrupt_experts_are_named(micro, micro_copy):
    runs, rd = micro_copy
    (rd / "experts/nli/adapter_model.safetensors").write_bytes(b"not a safetensors file")
    p = inproc(
        "interpolate.py",
        "--target",
        "snli-ve",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={runs}",
        check=False,
    )
    assert p.returncode == 2 and re.search(
        r"experts/nli@\w+/adapter_model.safetensors: corrupt expert weights", p.stderr
    )
    shutil.copy(
        micro[1] / "experts/nli/adapter_model.safetensors", rd / "experts/nli/adapter_model.safetensors"
    )
    shutil.rmtree((rd / "experts/shape").resolve())
    p = inproc(
        "embed_tasks.py",
        "--target",
        "snli-ve",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={runs}",
        check=False,
    )
    assert p.returncode == 2 and re.search(r"experts/shape@\w+/meta.json: missing expert", p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1


def test_every_stage_has_help():
    for script in ("train_expert.py", "embed_tasks.py", "interpolate.py", "evaluate.py"):
        code, out, _ = stage(script, "--help")
        assert code == 0 and "--config" in out
