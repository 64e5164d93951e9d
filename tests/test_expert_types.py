"""Every expert type of common/expert_types.py (LoRA, DoRA, IA3, prompt, prefix, Houlsby adapter) through all
four stages on a tiny Florence-2: a type added there is tested here with nothing else to write."""

from __future__ import annotations

import json
import re

import pytest
import torch

from common.expert_types import EXPERT_TYPES
from conftest import REPO, backbone_only, built_once, shared_dir, stages

NAME = "snli-ve-8shot-s0"
METHODS = list(EXPERT_TYPES)


class MethodRuns(dict):
    """method -> (runs_dir, output): the four stages for a method when a test first asks for it, once for all
    workers; the session's micro run (`make all`) is LoRA's, and its backbone is copied in for the others, so
    only their experts train."""

    def __init__(self, micro, tmp_path_factory):
        super().__init__(lora=(micro[0], micro[2]))
        self.micro, self.factory = micro, tmp_path_factory

    def __missing__(self, method):
        def build(root):
            backbone_only(self.micro, root)
            return stages(root, f"expert.method={method}")

        self[method] = built_once(shared_dir(self.factory), method, build)
        return self[method]


@pytest.fixture(scope="session")
def runs(micro, tmp_path_factory):
    return MethodRuns(micro, tmp_path_factory)


def config(root, method):
    from common.config import load_config

    return load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={root}", f"expert.method={method}"])


@pytest.mark.parametrize("method", METHODS)
def test_every_stage_runs_and_exports_one_expert_of_its_type(runs, method):
    root, log = runs[method]
    result = json.loads((root / f"micro/results/{NAME}.json").read_text())
    peft_merges = {"linear-merge", "ties-merge"} if EXPERT_TYPES[method].peft_merges else set()  # LoRA's only
    assert set(result["scores"]) == {"zero-shot", "target-only", "uniform-merge", "pi-tuning"} | peft_merges
    key, value = EXPERT_TYPES[method].saved_as
    for d in (f"experts/{NAME}", "experts/nli", f"interpolated/{NAME}"):
        assert json.loads((root / "micro" / d / "adapter_config.json").read_text())[key] == value
    meta = json.loads((root / f"micro/interpolated/{NAME}/meta.json").read_text())
    assert meta["method"] == method and meta["experts"][0] == NAME


@pytest.mark.parametrize("method", [m for m in METHODS if EXPERT_TYPES[m].null])
def test_the_null_expert_changes_nothing_and_a_summed_one_stays_put_while_the_target_trains(runs, method):
    """The transfer row's control for each type that has one: merged alone it leaves the backbone's outputs as
    they are; mixed with the target's expert and trained, a summed type's null row is held bit for bit."""
    from common import data
    from common.backbone import load_backbone
    from common.experts import MergedExpert, load_pool

    cfg = config(runs[method][0], method)
    etype = EXPERT_TYPES[method]
    target = load_pool(cfg, [NAME])[0]
    null = etype.null(target)
    model, processor = load_backbone(cfg)
    batch = data.Encoder(processor).batch(data.examples("snli-ve", "test", cfg.world, 6))
    with torch.no_grad():
        untouched = model(**batch).logits
        alone = MergedExpert(model, cfg.expert, [null], "site", trainable=False)
        merge_logits = torch.zeros(len(alone.group_names), 1)
        assert torch.allclose(alone(merge_logits, **batch).logits, untouched, atol=1e-6)
    if etype.merge != "sum":
        return  # LoRA: B = A = 0 get no gradient (test_pipeline checks the exported run)
    model = load_backbone(cfg)[0]
    merge = MergedExpert(model, cfg.expert, [target, null], "site", trainable=True, frozen=(1,))
    before = merge.stack.stack.detach().clone()
    opt = torch.optim.AdamW(merge.stack.parameters(), lr=1e-2, weight_decay=0.0)
    merge.model.train()
    for _ in range(2):
        merge(torch.zeros(len(merge.group_names), 2), **batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = merge.stack.stack.detach()
    assert torch.equal(after[1], before[1]) and not torch.equal(after[0], before[0])


@pytest.mark.parametrize("method", METHODS)
def test_exported_merge_reloads_and_reproduces_the_interpolated_model(runs, method, tmp_path):
    from common import data
    from common.backbone import load_backbone
    from common.experts import MergedExpert, load_expert, load_pool

    cfg = config(runs[method][0], method)
    experts = [NAME, "nli", "shape"]
    model, processor = load_backbone(cfg)
    merge = MergedExpert(model, cfg.expert, load_pool(cfg, experts), "layer", trainable=True)
    logits = torch.randn(len(merge.group_names), 3, generator=torch.Generator().manual_seed(0))
    batch = data.Encoder(processor).batch(data.examples("snli-ve", "test", cfg.world, 6))
    merge.model.eval()
    with torch.no_grad():
        live = merge(logits, **batch).logits
        merge.export(logits).save_pretrained(tmp_path)
        reloaded = load_expert(load_backbone(cfg)[0], tmp_path)(**batch).logits
        untouched = load_backbone(cfg)[0](**batch).logits
    assert torch.allclose(live, reloaded, atol=1e-5)
    assert not torch.allclose(live, untouched, atol=1e-3)  # the merged expert does change the model


@pytest.mark.parametrize("method", METHODS)
def test_candidate_scoring_runs_the_encoder_once_and_agrees_with_the_full_forward(runs, method):
    """Scoring shares one encoder pass between an example's candidates;
    the scores must equal a plain forward."""
    from common import data
    from common.backbone import load_backbone
    from common.experts import expert_dir, load_expert
    from common.metrics import answer_logprobs, candidate_logprobs

    cfg = config(runs[method][0], method)
    model, processor = load_backbone(cfg)
    model = load_expert(model, expert_dir(cfg, NAME))
    enc = data.Encoder(processor)
    for task in ("snli-ve", "nli"):  # with an image and text-only
        exs = data.examples(task, "test", cfg.world, 3)
        answers = ["yes", "no", "maybe"]
        pairs = [(e, a) for e in exs for a in answers]
        index = torch.tensor([i for i in range(len(exs)) for _ in answers])
        with torch.no_grad():
            once = candidate_logprobs(model, enc.inputs(exs), index, enc.labels(answers * len(exs)))
            full = answer_logprobs(model, enc, [e for e, _ in pairs], [a for _, a in pairs])
        assert torch.allclose(once, full, atol=1e-4), (task, once, full)


def test_a_pool_expert_of_another_method_is_refused_in_one_line(runs):
    from conftest import inproc

    root = runs["ia3"][0]
    p = inproc(
        "interpolate.py",
        "--target",
        "snli-ve",
        "--config",
        "configs/micro.yaml",
        f"runs_dir={root}",
        "expert.method=adapter",
        check=False,
    )
    # the adapter run's artifacts are not the ia3 run's (another digest): none is there,
    # and none is taken for it
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "missing similarity; run `.venv/bin/python embed_tasks.py --target snli-ve" in p.stderr
    assert "expert.method=adapter" in p.stderr


@pytest.mark.parametrize("method", METHODS)
def test_one_loaded_backbone_serves_expert_after_expert(runs, method):
    """evaluate.py loads the backbone once: an expert unloaded leaves the backbone exactly as it was."""
    from common import data
    from common.backbone import load_backbone
    from common.experts import expert_dir, load_expert, unload_expert

    cfg = config(runs[method][0], method)
    base, processor = load_backbone(cfg)
    batch = data.Encoder(processor).batch(data.examples("snli-ve", "test", cfg.world, 4))
    with torch.no_grad():
        plain = base(**batch).logits
        first = load_expert(base, expert_dir(cfg, NAME))
        with_expert = first(**batch).logits
        base = unload_expert(first)
        assert torch.equal(base(**batch).logits, plain)
        again = load_expert(base, expert_dir(cfg, "nli"))
        other = again(**batch).logits
        fresh = load_expert(load_backbone(cfg)[0], expert_dir(cfg, "nli"))(**batch).logits
    assert not torch.allclose(with_expert, plain, atol=1e-4)
    assert torch.allclose(other, fresh, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_scoring_with_the_update_folded_in_is_the_same_function_and_restores_the_backbone(runs, method):
    """evaluate.py scores LoRA, DoRA and IA3 experts with their update added into the weights (folded): the
    same log-probabilities, and after it the backbone's tensors are bit for bit what they were (an unload
    then gives the plain backbone). The other types score as they are."""
    from common import data
    from common.backbone import load_backbone
    from common.experts import expert_dir, folded, load_expert, unload_expert

    cfg = config(runs[method][0], method)
    base, processor = load_backbone(cfg)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    batch = data.Encoder(processor).batch(data.examples("snli-ve", "test", cfg.world, 4))
    model = load_expert(base, expert_dir(cfg, NAME))
    layers = [m for m in model.modules() if hasattr(m, "merged")]
    with torch.no_grad():
        plain = model(**batch).logits
        with folded(model):
            assert (bool(layers) and all(m.merged for m in layers)) == (method in ("lora", "dora", "ia3"))
            inside = model(**batch).logits
        after = model(**batch).logits
    assert torch.allclose(inside, plain, atol=1e-5) and torch.equal(after, plain)
    assert not any(getattr(m, "merged", False) for m in layers)
    base = unload_expert(model)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def tower_counter(model) -> list[int]:
    """How many images the vision tower has encoded so far (one entry per call)."""
    seen = []
    model.model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("method", ["lora", "prompt", "adapter"])
def test_the_frozen_vision_tower_encodes_each_image_once_and_changes_nothing(runs, method):
    """feature_cache_mb: training steps over the same few images reuse their features; loss and gradients
    are those of the uncached model."""
    from common import data
    from common.backbone import load_backbone
    from common.experts import attach

    cfg = config(runs[method][0], method)
    exs = data.examples("snli-ve", "train", cfg.world, 6)
    steps = [exs[:4], exs[2:], exs[:4]]  # overlapping batches, as shuffled epochs give
    results = {}
    for mb in (0, 64):
        cfg.feature_cache_mb = mb
        base, processor = load_backbone(cfg)
        enc, seen = data.Encoder(processor), tower_counter(base)
        torch.manual_seed(0)
        model = attach(base, cfg.expert).train()
        grads = []
        for batch in steps:
            loss = model(**enc.batch(batch)).loss
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        results[mb] = (grads, sum(seen))
    assert results[0][1] == 12 and results[64][1] == 6  # every image of every step, or each image once
    for plain, cached in zip(results[0][0], results[64][0]):
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(plain, cached))


def test_the_feature_cache_steps_aside_when_the_tower_can_change(runs):
    """An expert inside the vision tower, or full fine-tuning: every image is encoded at every step and the
    tower's weights get gradients."""
    import dataclasses

    from common import data
    from common.backbone import load_backbone
    from common.experts import attach

    cfg = config(runs["lora"][0], "lora")
    batch_exs = data.examples("snli-ve", "train", cfg.world, 3)
    ecfg = dataclasses.replace(cfg.expert, target_modules=r".*vision_tower\..*\.ffn\.fc2")
    for name in ("vision lora", "full-ft"):
        base, processor = load_backbone(cfg)
        enc, seen = data.Encoder(processor), tower_counter(base)
        model = attach(base, ecfg).train() if name == "vision lora" else base.requires_grad_(True).train()
        for _ in range(2):
            model(**enc.batch(batch_exs)).loss.backward()
        assert sum(seen) == 6, name
        tower = [p for n, p in model.named_parameters() if "vision_tower" in n and p.requires_grad]
        assert tower and all(p.grad is not None for p in tower), name


def test_a_new_expert_type_is_one_entry_in_the_registry(micro, tmp_path, monkeypatch):
    """A type added to EXPERT_TYPES alone (here: LoRA on the feed-forward layers instead of the attention) is
    a config choice; its experts attach where its targets say, and every stage runs with it: its sites are
    its groups and its keys its live parameters, from the type."""
    import dataclasses

    from common.expert_types import _BART

    lora = EXPERT_TYPES["lora"]
    ffn = dataclasses.replace(lora, name="lora-ffn", targets={"bart": _BART + r"(fc1|fc2)$"})
    monkeypatch.setitem(EXPERT_TYPES, "lora-ffn", ffn)
    backbone_only(micro, tmp_path)
    stages(tmp_path, "expert.method=lora-ffn")
    cfg = config(tmp_path, "lora-ffn")
    adapter = json.loads((cfg.run_dir / f"interpolated/{NAME}/adapter_config.json").read_text())
    assert adapter["target_modules"] == ffn.targets["bart"]
    sites = list(json.loads((cfg.run_dir / f"interpolated/{NAME}/weights.json").read_text())["groups"])
    assert sites and all(re.search(r"\.fc[12]$", s) for s in sites), sites[:3]
    result = json.loads((cfg.run_dir / f"results/{NAME}.json").read_text())
    assert "pi-tuning" in result["scores"]
