"""Your own expert library (tasks.imported): LoRAs trained by a plain peft script, of other ranks, alphas,
rsLoRA, target modules and biases, join a pool beside the harness's experts; make all runs; the exported
LoRA is the interpolated model, and the exact weighted sum of the experts' updates; bad imports stop in one
line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, backbone_only, make, make_output, stage

pytestmark = pytest.mark.pipeline

LM_ATTENTION = r".*language_model\.(encoder|decoder)\..*\.(q_proj|k_proj|v_proj|out_proj)$"


def peft_lora(backbone: Path, out: Path, seed: int, **lora) -> Path:
    """A LoRA trained the way a researcher would outside this harness: transformers + peft, a few AdamW steps
    on a made-up batch, save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    torch.manual_seed(seed)
    model = get_peft_model(Florence2ForConditionalGeneration.from_pretrained(backbone), LoraConfig(**lora))
    processor = AutoProcessor.from_pretrained(backbone)
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green", "white")]
    batch = processor(text=["is there a red circle ?"] * 4, images=images, return_tensors="pt", padding=True)
    labels = processor.tokenizer(["yes", "no", "no", "no"], return_tensors="pt").input_ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        opt.step(), opt.zero_grad()
    model.save_pretrained(out)
    return out


def lora_scale(config: dict, r: int) -> float:  # peft's: lora_alpha / r, or / sqrt(r) with use_rslora
    return config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)


def test_peft_loras_of_mixed_recipes_join_a_pool_and_export_as_one_exact_lora(micro_copy, tmp_path):
    from peft import PeftModel

    from common import data
    from common.backbone import load_backbone
    from common.config import load_config
    from common.experts import MergedExpert, load_pool

    runs, run = micro_copy
    backbone = next(run.glob("backbone@*"))
    lib = {
        "lib-a": peft_lora(
            backbone, tmp_path / "a", 1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]
        ),
        "lib-b": peft_lora(
            backbone, tmp_path / "b", 2, r=6, lora_alpha=3, use_rslora=True, target_modules=LM_ATTENTION
        ),
        "lib-c": peft_lora(
            backbone, tmp_path / "c", 3, r=3, lora_alpha=8, lora_bias=True, target_modules=["fc2"]
        ),
        # with data (vqa is a task) and the configured recipe: ranked by the Fisher like the harness's experts
        "vqa": peft_lora(backbone, tmp_path / "vqa", 4, r=4, lora_alpha=8, target_modules=LM_ATTENTION),
    }
    overrides = [
        "tasks.pool=[snli-ve,nli,shape,lib-a,lib-b,lib-c,vqa]",
        *(f"tasks.imported.{n}={p}" for n, p in lib.items()),
        "interpolate.top_k=6",
        "interpolate.train_experts=false",  # the mix's weights are all it learns: the export is the merge
    ]
    out = make_output(make("all", runs_dir=runs, extra=" ".join(overrides)))
    assert "imported lib-b from" in out and "train_expert.py --task nli " not in out  # harness experts reused

    cfg = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={runs}", *overrides])
    sim = json.loads((run / "similarity" / "snli-ve-8shot-s0.json").read_text())
    assert sim["ranked_by"] == {
        **dict.fromkeys(["snli-ve-8shot-s0", "nli", "shape", "vqa"], "fisher"),
        **dict.fromkeys(["lib-a", "lib-b", "lib-c"], "weights"),  # no data: the data-free embedding
    }
    table = (run / "results" / "snli-ve.md").read_text()  # the table make all writes says it too
    assert "ranked by another embedding than embed.embedding" in table and "lib-b by `weights`" in table
    exported = run / "interpolated" / "snli-ve-8shot-s0"
    mix = json.loads((exported / "weights.json").read_text())
    experts, groups = mix["experts"], mix["groups"]
    assert set(experts) == {"snli-ve-8shot-s0", "nli", "shape", *lib}

    # (1) the exported LoRA, loaded by peft on the plain backbone, is the interpolated model
    model, processor = load_backbone(cfg)
    merge = MergedExpert(model, cfg.expert, load_pool(cfg, experts), cfg.interpolate.groups, trainable=False)
    logits = torch.log(torch.tensor([[groups[g][e] for e in experts] for g in merge.group_names]))
    enc = data.Encoder(processor, "cpu", generation=model.generation_config)
    inputs = enc.batch(data.split(cfg, "snli-ve", "val", 6))
    with torch.no_grad():
        interpolated = merge(logits, **inputs).logits
        loaded = PeftModel.from_pretrained(load_backbone(cfg)[0], str(exported)).eval()(**inputs).logits
    assert (loaded - interpolated).abs().max() < 1e-5

    # (2) with the weights fixed, it adds the exact sum_i w_i s_i B_i A_i (and sum_i w_i s_i b_i) everywhere
    saved = json.loads((exported / "adapter_config.json").read_text())
    assert saved["lora_bias"] and not saved["use_rslora"]
    merged = load_file(str(exported / "adapter_model.safetensors"))
    folders = {e: lib.get(e, next((run / "experts").glob(f"{e}@*"))) for e in experts}
    own = {
        e: (
            json.loads((f / "adapter_config.json").read_text()),
            load_file(str(f / "adapter_model.safetensors")),
        )
        for e, f in folders.items()
    }
    sites = {k.rsplit(".lora_A.", 1)[0] for k in merged if ".lora_A." in k}
    assert {k.rsplit(".lora_A.", 1)[0] for _, w in own.values() for k in w if ".lora_A." in k} == sites
    for site in sites:
        delta = (
            lora_scale(saved, saved["r"]) * merged[f"{site}.lora_B.weight"] @ merged[f"{site}.lora_A.weight"]
        )
        bias = lora_scale(saved, saved["r"]) * merged[f"{site}.lora_B.bias"]
        want, want_bias = torch.zeros_like(delta), torch.zeros_like(bias)
        for e, (config, w) in own.items():
            if f"{site}.lora_A.weight" in w:
                a, b = w[f"{site}.lora_A.weight"], w[f"{site}.lora_B.weight"]
                want += groups[site][e] * lora_scale(config, a.shape[0]) * b @ a
                if f"{site}.lora_B.bias" in w:
                    want_bias += groups[site][e] * lora_scale(config, a.shape[0]) * w[f"{site}.lora_B.bias"]
        assert torch.allclose(delta, want, atol=1e-6, rtol=1e-5), site
        assert torch.allclose(bias, want_bias, atol=1e-6, rtol=1e-5), site

    # (3) the model card: the experts, where they come from, their weights, the command
    card = (exported / "README.md").read_text()
    assert (
        "library_name: peft" in card
        and f"`{lib['lib-b']}`" in card
        and "interpolate.py --target snli-ve" in card
    )

    # (4) an adapter that changes is imported again, and what depends on it is remade; nothing else
    peft_lora(backbone, lib["lib-a"], 9, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    dry = make_output(make("-n", "all", runs_dir=runs, extra=" ".join(overrides)))
    assert "--task lib-a " in dry and "embed_tasks.py" in dry and "interpolate.py" in dry
    assert "--task lib-b " not in dry and "--task nli " not in dry


def _another_base(backbone: Path, tmp: Path) -> Path:
    """A LoRA made for another checkpoint of the same architecture (its weights changed)."""
    from transformers import Florence2ForConditionalGeneration

    other = Florence2ForConditionalGeneration.from_pretrained(backbone)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(tmp / "other-base")
    for f in backbone.glob("*.json"):
        shutil.copy(f, tmp / "other-base" / f.name) if not (tmp / "other-base" / f.name).exists() else None
    return peft_lora(tmp / "other-base", tmp / "bad", 0, r=2, lora_alpha=4, target_modules=["q_proj"])


def _wrong_shape(backbone: Path, tmp: Path) -> Path:
    out = peft_lora(backbone, tmp / "bad", 0, r=2, lora_alpha=4, target_modules=["q_proj"])
    w = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in w if k.endswith("lora_A.weight"))
    w[key] = torch.zeros(2, w[key].shape[1] + 1)
    save_file(w, str(out / "adapter_model.safetensors"))
    return out


def _corrupt(backbone: Path, tmp: Path) -> Path:
    out = peft_lora(backbone, tmp / "bad", 0, r=2, lora_alpha=4, target_modules=["q_proj"])
    f = out / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return out


def _dora(backbone: Path, tmp: Path) -> Path:
    return peft_lora(backbone, tmp / "bad", 0, r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"])


@pytest.mark.parametrize(
    "make_bad, says",
    [
        (_another_base, "made for base model"),
        (_wrong_shape, "in this backbone, but the adapter's lora_A.weight is (2, 33)"),
        (_corrupt, "corrupt adapter weights"),
        (_dora, "a DoRA adapter (use_dora)"),
    ],
    ids=["another-base-model", "module-shape", "corrupt", "dora"],
)
def test_a_bad_import_stops_in_one_line_and_writes_nothing(micro, tmp_path, make_bad, says):
    runs = backbone_only(micro, tmp_path / "runs")
    bad = make_bad(next((runs / "micro").glob("backbone@*")), tmp_path)
    code, out, err = stage(
        "train_expert.py", "--task", "bad", "--config", "configs/micro.yaml", f"runs_dir={runs}",
        "tasks.pool=[snli-ve,nli,bad]", f"tasks.imported.bad={bad}",
    )  # fmt: skip
    assert code == 2 and says in err and ": tasks.imported.bad (" in err and err.count("\n") == 1
    assert not list((runs / "micro").glob("experts/*bad*")) and not list((runs / "micro").glob("experts/.*"))


def test_an_imported_hub_adapter_offline_stops_in_one_line_and_only_the_checks_may_fetch_it(
    monkeypatch, micro_cfg
):
    import dataclasses

    import huggingface_hub

    from common.errors import UserError
    from common.imported import adapter_dir

    asked = []

    def offline(*args, **kwargs):
        asked.append(kwargs["local_files_only"])
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    tasks = dataclasses.replace(
        micro_cfg.tasks, pool=[*micro_cfg.tasks.pool, "x"], imported={"x": "org/lora"}
    )
    cfg = dataclasses.replace(micro_cfg, tasks=tasks)
    with pytest.raises(
        UserError, match=r"hub adapter 'org/lora' is not in the hub cache yet .*`hf download org/lora"
    ):
        adapter_dir(cfg, "x")  # make's queries (make -n too): the cache only
    with pytest.raises(
        UserError, match=r"hub adapter 'org/lora' could not be fetched .*`hf download org/lora"
    ):
        adapter_dir(cfg, "x", download=True)  # make's checks, the import stage
    assert asked == [True, False]


def test_padded_biases_stay_zero_while_experts_train_and_a_bf16_adapter_joins(micro_copy, tmp_path):
    from conftest import stages

    runs, run = micro_copy
    backbone = next(run.glob("backbone@*"))
    biased = peft_lora(
        backbone, tmp_path / "biased", 5, r=3, lora_alpha=6, lora_bias=True, target_modules=["q_proj"]
    )
    w = load_file(str(biased / "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(biased / "adapter_model.safetensors"))
    stages(
        runs,
        "tasks.pool=[snli-ve,nli,shape,biased]",
        f"tasks.imported.biased={biased}",
        "interpolate.top_k=3",
        "interpolate.train_experts=true",
    )
    merged = load_file(str(run / "interpolated" / "snli-ve-8shot-s0" / "adapter_model.safetensors"))
    biases = {k.removesuffix(".lora_B.bias"): v for k, v in merged.items() if k.endswith(".lora_B.bias")}
    own = {k.removesuffix(".lora_B.bias") for k in w if k.endswith(".lora_B.bias")}
    assert own and own < set(biases)  # the biased expert's q_proj sites, and the others' sites padded
    assert all(biases[s].abs().sum() > 0 for s in own)
    assert all(torch.equal(v, torch.zeros_like(v)) for s, v in biases.items() if s not in own)


def test_an_unreachable_import_stops_prune_and_loto_targets_leave_data_free_imports_out(micro_cfg, tmp_path):
    import dataclasses

    from common.checks import targets
    from common.errors import UserError
    from common.provenance import prune

    tasks = dataclasses.replace(
        micro_cfg.tasks, pool=[*micro_cfg.tasks.pool, "mine"], imported={"mine": str(tmp_path / "gone")}
    )
    cfg = dataclasses.replace(micro_cfg, tasks=tasks)
    with pytest.raises(UserError, match="tasks.imported.mine .*gone' does not exist"):
        prune(cfg, dry_run=True)  # not "nothing is current": the whole run folder would go
    assert targets(cfg) == list(micro_cfg.tasks.pool)  # make loto's: not mine, which has no data


def test_an_imported_name_outside_the_pool_is_refused(micro):
    code, _, err = stage(
        "train_expert.py", "--task", "nli", "--config", "configs/micro.yaml", f"runs_dir={micro[0]}",
        "tasks.imported.typo=/tmp",
    )  # fmt: skip
    assert (
        code == 2
        and "tasks.imported names 'typo', which is not in tasks.pool" in err
        and err.count("\n") == 1
    )


def test_the_reports_rank_statistics_leave_out_experts_another_embedding_ranked():
    from common.report import _precision, _rhos

    runs = [{"run": "r", "transfer": {"a": 0.1, "b": 0.2, "imp": 0.3}}]  # imp: ranked by weights, not here
    sims = {"r": {"a": 0.5, "b": 0.9}}
    assert _rhos(sims, runs, "transfer") == [pytest.approx(1.0)] and _precision(sims, runs, 1) == [1.0]
