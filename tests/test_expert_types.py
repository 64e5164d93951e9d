"""Every expert type (LoRA, IA3, prompt, prefix, Houlsby adapter) through all four stages on a tiny Florence-2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REPO, make

NAME = "snli-ve-8shot-s0"
METHODS = ["lora", "ia3", "prompt", "prefix", "adapter"]
SAVED_AS = {"lora": ("peft_type", "LORA"), "ia3": ("peft_type", "IA3"), "prompt": ("peft_type", "PROMPT_TUNING"),
            "prefix": ("peft_type", "PREFIX_TUNING"), "adapter": ("expert_type", "houlsby_adapter")}


@pytest.fixture(scope="module")
def runs(micro, tmp_path_factory):
    """`make all` once per method; the session's micro backbone is copied in, so only the experts train."""
    out = {"lora": (micro[0], micro[2])}
    for method in METHODS[1:]:
        root = tmp_path_factory.mktemp(f"runs-{method}")
        shutil.copytree(micro[1] / "backbone", root / "micro/backbone")
        p = make("all", runs_dir=root, extra=f"expert.method={method}")
        out[method] = (root, p.stdout + p.stderr)
    return out


def config(root, method):
    from common.config import load_config

    return load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={root}", f"expert.method={method}"])


@pytest.mark.parametrize("method", METHODS)
def test_every_stage_runs_and_exports_one_expert_of_its_type(runs, method):
    root, log = runs[method]
    result = json.loads((root / f"micro/results/{NAME}.json").read_text())
    peft_merges = {"linear-merge", "ties-merge"} if method == "lora" else set()  # peft merges LoRA only
    assert set(result["accuracy"]) == {"zero-shot", "target-only", "uniform-merge", "pi-tuning"} | peft_merges
    key, value = SAVED_AS[method]
    for d in (f"experts/{NAME}", "experts/nli", f"interpolated/{NAME}"):
        assert json.loads((root / "micro" / d / "adapter_config.json").read_text())[key] == value
    meta = json.loads((root / f"micro/interpolated/{NAME}/meta.json").read_text())
    assert meta["method"] == method and meta["experts"][0] == NAME


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
    """Scoring shares one encoder pass between an example's candidates; the scores must equal a plain forward."""
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
    from conftest import run

    root = runs["ia3"][0]
    p = run("python", "interpolate.py", "--target", "snli-ve", "--config", "configs/micro.yaml", f"runs_dir={root}",
            "expert.method=adapter", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "trained with expert.method=ia3, config has adapter" in p.stderr


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
