"""Device and precision: bf16 end to end on the CPU, accelerate's accumulation, activation checkpointing, the
refusals (a CUDA device that is not there, fp16 on the CPU),
and the same pipeline on CUDA when there is one."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, backbone_only, stage, stages

CUDA = torch.cuda.is_available()


def micro_config(*overrides: str):
    from common.config import load_config

    return load_config(str(REPO / "configs/micro.yaml"), list(overrides))


def tiny_florence(seed: int = 0):
    """A freshly initialised micro-size Florence-2, its encoder and a batch of 4 SNLI-VE examples."""
    from common import data
    from common.backbone import build_model, build_processor, build_vocab

    cfg = micro_config()
    torch.manual_seed(seed)
    vocab = build_vocab(
        [
            t
            for n in data.TASKS
            for e in data.examples(n, "train", cfg.world, 20)
            for t in (e.prompt, e.answer)
        ]
    )
    model, n = build_model(cfg.backbone, len(vocab), cfg.world.image_size)
    enc = data.Encoder(build_processor(vocab, cfg.world.image_size, n))
    return cfg, model.requires_grad_(False), enc, enc.batch(data.examples("snli-ve", "train", cfg.world, 4))


@pytest.mark.pipeline
def test_a_backbone_built_by_hand_then_make_all_in_bf16_runs_through(tmp_path):
    """(4) The backbone stage by hand, then make all OVERRIDES=precision=bf16: a bf16 run is made from its own
    backbone (precision is part of what a backbone is made from), so make builds it and runs every stage, and
    the experts keep fp32 master weights."""
    from safetensors.torch import load_file

    from conftest import inproc, make

    inproc("train_expert.py", "--pretrain", "--config", "configs/micro.yaml", f"runs_dir={tmp_path}")
    p = make("all", runs_dir=tmp_path, extra="precision=bf16")
    assert "train_expert.py --pretrain" in p.stdout and "| pi-tuning |" in p.stdout
    assert len(list((tmp_path / "micro").glob("backbone@*"))) == 2  # the fp32 one, by hand, kept beside it
    result = json.loads((tmp_path / "micro/results/snli-ve-8shot-s0.json").read_text())
    assert result["config"]["precision"] == "bf16" and "pi-tuning" in result["scores"]
    for d in ("experts/nli", "experts/snli-ve-8shot-s0", "interpolated/snli-ve-8shot-s0"):
        weights = load_file(str(tmp_path / "micro" / d / "adapter_model.safetensors"))
        # fp32 masters
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values()), d


def test_bf16_runs_the_forward_in_bf16_and_the_fisher_in_fp32():
    from common import data
    from common.device import accelerator
    from common.experts import attach
    from common.similarity import fisher_diagonal

    cfg, model, enc, _ = tiny_florence()
    accel = accelerator(micro_config("device=cpu", "precision=bf16"))
    lora = attach(model, cfg.expert)
    seen = []
    hook = model.model.language_model.encoder.layers[0].fc2.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype)
    )
    exs = data.examples("snli-ve", "train", cfg.world, 6)
    in_bf16 = fisher_diagonal(lora, enc, exs, autocast=accel.autocast)
    assert seen and set(seen) == {torch.bfloat16}
    hook.remove()
    in_fp32 = fisher_diagonal(lora, enc, exs)
    assert in_bf16.keys() == in_fp32.keys() and all(f.dtype == torch.float32 for f in in_bf16.values())
    a, b = (torch.cat([f[k].flatten() for k in sorted(f)]) for f in (in_bf16, in_fp32))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95  # the same Fisher, up to bf16 rounding


def test_grad_accum_of_two_halves_is_one_step_on_the_whole_batch():
    from common.training import train_steps

    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.randn(8, 1)

    def fit(batch_size: int, grad_accum: int):
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 1)
        halves = iter(
            [
                (x[i : i + batch_size], y[i : i + batch_size])
                for _ in range(3)
                for i in range(0, 8, batch_size)
            ]
        )
        loss = train_steps(
            lambda b: torch.nn.functional.mse_loss(lin(b[0]), b[1]),
            [{"params": list(lin.parameters()), "lr": 0.1}],
            halves,
            steps=3,
            grad_clip=0.5,
            grad_accum=grad_accum,
        )
        return lin.weight.detach().clone(), loss

    (whole, loss_whole), (accumulated, loss_acc) = fit(8, 1), fit(4, 2)
    assert torch.allclose(whole, accumulated, atol=1e-6) and loss_whole == pytest.approx(loss_acc, abs=1e-6)
    assert not torch.allclose(whole, fit(4, 1)[0], atol=1e-4)  # twice the steps on halves is another fit


def test_activation_checkpointing_recomputes_each_layer_and_keeps_the_gradients():
    from common.experts import attach
    from common.training import checkpointing

    cfg, model, _, batch = tiny_florence()
    lora = attach(model, cfg.expert)
    lora.train()
    calls = []
    model.model.language_model.encoder.layers[0].fc2.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        calls.clear()
        lora.zero_grad()
        lora(**batch).loss.backward()
        return len(calls), [p.grad.clone() for p in lora.parameters() if p.requires_grad]

    (plain_calls, plain), _ = grads(), checkpointing(model, True)
    checked_calls, checked = grads()
    assert (plain_calls, checked_calls) == (1, 2)  # the layer runs again in backward
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checked))


@pytest.mark.parametrize(
    "override,says",
    [
        ("precision=fp16", "field 'precision' is 'fp16', which needs a CUDA device"),
        ("device=gpu", "field 'device' is 'gpu'; use auto, cpu, cuda or cuda:N"),
        ("device=cuda:99", "field 'device' is 'cuda:99'"),
    ]
    + ([] if CUDA else [("device=cuda", "sees no CUDA device here; use device=auto")]),
)
def test_a_device_or_precision_this_machine_lacks_is_one_line(micro, tmp_path, override, says):
    args = ("--config", "configs/micro.yaml", f"runs_dir={tmp_path}", "device=cpu", override)
    backbone_only(micro, tmp_path)  # a refusal is then the device's, not a missing backbone's
    code, out, err = stage("train_expert.py", "--task", "nli", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "micro/experts/nli").exists()


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_the_micro_pipeline_runs_on_cuda_in_bf16_and_merges_with_triton(tmp_path):
    from common.merge import _use_triton

    out = stages(tmp_path, "device=cuda", "precision=bf16", backbone=True)
    result = json.loads((tmp_path / "micro/results/snli-ve-8shot-s0.json").read_text())
    assert "pi-tuning" in result["scores"], out
    assert _use_triton(torch.zeros(1, device="cuda"))  # the interpolation's merge ran the Triton kernels
