"""Parameter-efficient experts (LoRA via peft): create, name, save, load, and group their tensors."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.artifacts import read_json
from common.backbone import backbone_dir, fingerprint
from common.config import UserError

WEIGHTS = "adapter_model.safetensors"


def expert_name(task: str, shots: int = 0, seed: int = 0) -> str:
    """Pool experts are named by task; a target's low-shot expert also by its shots and seed."""
    return task if not shots else f"{task}-{shots}shot-s{seed}"


def expert_dir(cfg, name: str) -> Path:
    return cfg.run_dir / "experts" / name


def lora_config(ecfg, rank_multiplier: int = 1):
    """peft LoraConfig for the configured expert; a k-expert merge is the same LoRA at rank k*r."""
    from peft import LoraConfig

    # the same alpha/r scaling at rank k*r keeps sum_i p_i B_i A_i exact
    return LoraConfig(r=ecfg.r * rank_multiplier, lora_alpha=ecfg.alpha * rank_multiplier,
                      lora_dropout=ecfg.dropout, target_modules=ecfg.target_modules, bias="none")


def attach(model, ecfg, rank_multiplier: int = 1):
    """Wrap the frozen backbone in a fresh peft LoRA (only the LoRA tensors train)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(ecfg, rank_multiplier))


def load_expert_weights(path: Path) -> dict[str, torch.Tensor]:
    """An expert's tensors as saved by peft (keys without the adapter name)."""
    f = Path(path) / WEIGHTS
    if not f.is_file():
        raise UserError(f"{path}: missing expert weights {WEIGHTS}; train it with `python train_expert.py "
                        f"--task TASK [--shots N]` or `make experts`")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise UserError(f"{f}: corrupt expert weights ({str(e)[:80]}); delete {path} and retrain it")


def read_expert_meta(path: Path) -> dict:
    return read_json(Path(path) / "meta.json", "expert", "train it with `python train_expert.py --task TASK "
                     "[--shots N]` or `make experts`")


def set_weights(peft_model, weights: dict[str, torch.Tensor]) -> None:
    """Load saved expert tensors into a peft model of the same shape."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"expert has tensors this backbone/config does not: {result.unexpected_keys[:2]}")


def param_name(key: str, adapter: str = "default") -> str:
    """Saved key (`...q_proj.lora_A.weight`) -> the live parameter name (`...q_proj.lora_A.default.weight`)."""
    return re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{adapter}.weight", key)


def group_of(mode: str):
    """Which interpolation group a tensor belongs to: one softmax over experts per group."""
    def site(key):  # one LoRA module = one site (A and B of it share the weights)
        return key.rsplit(".lora_", 1)[0]

    def layer(key):
        m = re.search(r"(vision_tower|encoder|decoder)\.(?:layers|blocks)\.(\d+)", key)
        return f"{m.group(1)}.{m.group(2)}" if m else "other"

    return {"global": lambda key: "all", "layer": layer, "site": site,
            # for LoRA the exact merge weights whole sites, so per-tensor is per-site
            "tensor": site}[mode]


def load_pool(cfg, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """The experts' tensors, checked to belong to this backbone and to share one shape."""
    fp = fingerprint(backbone_dir(cfg))
    weights = []
    for name in names:
        meta = read_expert_meta(expert_dir(cfg, name))
        if meta["backbone"] != fp:
            raise UserError(f"{expert_dir(cfg, name)}: trained on another backbone ({meta['backbone']} != {fp}); "
                            f"retrain it with `python train_expert.py --task {meta['task']}`")
        w = load_expert_weights(expert_dir(cfg, name))
        if weights and {k: v.shape for k, v in w.items()} != {k: v.shape for k, v in weights[0].items()}:
            raise UserError(f"{expert_dir(cfg, name)}: its tensors differ from {names[0]}'s; all experts must share "
                            f"expert.method, r and target_modules")
        weights.append(w)
    return weights
