"""Parameter-efficient experts (each type one object in common/expert_types.py: LoRA, DoRA, IA3, prompt,
prefix via peft; adapters from common.adapters): create, name, save, load, group their tensors, and run K
of them merged as one."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch.func import functional_call

from common.adapters import WEIGHTS, AdapterModel
from common.artifacts import read_json
from common.backbone import backbone_dir, fingerprint
from common.errors import UserError
from common.expert_types import EXPERT_TYPES
from common.merge import ExpertStack

# expert_name: the stages import it here
from common.provenance import artifact, expert_name, parse_run  # noqa: F401


def expert_dir(cfg, name: str) -> Path:
    """Where this config's expert of that name lives (common.provenance: experts/<name>@<digest>)."""
    return artifact(cfg, "expert", name)


def text_dims(model) -> dict:
    """The language model's family, width, heads and layers (Florence-2 keeps them in text_config)."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if c.model_type == "t5" or hasattr(c, "num_decoder_layers"):
        return {
            "family": "t5",
            "d_model": c.d_model,
            "heads": c.num_heads,
            "encoder_layers": c.num_layers,
            "decoder_layers": c.num_decoder_layers,
        }
    return {
        "family": "bart",
        "d_model": c.d_model,
        "heads": c.encoder_attention_heads,
        "encoder_layers": c.encoder_layers,
        "decoder_layers": c.decoder_layers,
    }


def learning_rate(ecfg) -> float:
    return ecfg.lr or EXPERT_TYPES[ecfg.method].lr


def target_modules(ecfg, dims: dict) -> str:
    return ecfg.target_modules or EXPERT_TYPES[ecfg.method].targets.get(dims["family"], "")


def attach(model, ecfg, rank_multiplier: int = 1):
    """Wrap the frozen backbone in a fresh expert of the configured type (only the expert's tensors train).

    rank_multiplier: a k-expert LoRA merge is one LoRA of rank k*r
    (the same alpha/r keeps sum_i p_i B_i A_i exact)."""
    dims, m = text_dims(model), ecfg.method
    built = EXPERT_TYPES[m].build(model, ecfg, dims, target_modules(ecfg, dims), rank_multiplier)
    if isinstance(built, torch.nn.Module):  # an expert of our own (adapters): the model already holds it
        return built
    try:
        return get_peft_model(model, built)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise UserError(
            f'expert.target_modules: {str(e).splitlines()[0][:160]}; fix the regex or leave it "" '
            f"for the {m} default"
        ) from None


def is_prompt_learning(model) -> bool:
    """Prompt/prefix experts act through extra inputs, not through the backbone's modules."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def load_expert_weights(path: Path) -> dict[str, torch.Tensor]:
    """An expert's tensors as saved by peft (keys without the adapter name)."""
    f = Path(path) / WEIGHTS
    if not f.is_file():
        raise UserError(
            f"{path}: missing expert weights {WEIGHTS}; train it with `python train_expert.py "
            f"--task TASK [--shots N]` or `make experts`"
        )
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise UserError(
            f"{f}: corrupt expert weights ({str(e)[:80]}); delete {path} and retrain it"
        ) from None


def read_expert_meta(path: Path, fix: str = "train it with `make experts`") -> dict:
    return read_json(Path(path) / "meta.json", "expert", fix)


def train_command(cfg, name: str) -> str:
    """The command that trains expert `name` under cfg, as typed."""
    run = parse_run(name)
    if run is None:
        return cfg.command("train_expert.py", "--task", name)
    shots = run["shots"] or "0"
    return cfg.command(
        "train_expert.py",
        "--task",
        run["task"],
        "--shots",
        shots,
        *(("--variant", run["variant"]) if run["variant"] else ()),
    )


def current_expert(cfg, name: str) -> dict:
    """This config's expert `name` (its meta), checked to be there and made on this backbone's weights (a real
    checkpoint's files can change under one hub id); else a UserError naming the command that makes it."""
    path = expert_dir(cfg, name)
    fix = f"run `{train_command(cfg, name)}` (make makes it)"
    meta = read_expert_meta(path, fix)
    fp = fingerprint(backbone_dir(cfg))
    if meta["backbone"] != fp:
        raise UserError(
            f"{path}: trained on another backbone's weights ({meta['backbone']} != {fp}); delete it and {fix}"
        )
    return meta


def set_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Load saved expert tensors into an expert model of the same shape."""
    try:
        if isinstance(model, AdapterModel):
            return model.load_adapter_weights(weights)
        result = set_peft_model_state_dict(model, weights)
    except (KeyError, RuntimeError) as e:
        raise UserError(
            f"expert tensors do not fit this backbone/config ({str(e).splitlines()[0][:120]})"
        ) from None
    # peft loads a prompt table itself and still lists it as unexpected
    unexpected = [k for k in getattr(result, "unexpected_keys", None) or [] if k != "prompt_embeddings"]
    if unexpected:
        raise UserError(f"expert has tensors this backbone/config does not: {unexpected[:2]}")


def load_expert(model, path: Path):
    """The backbone with a saved expert of any method, loaded the way its library loads it."""
    config = read_json(Path(path) / "adapter_config.json", "expert config", "retrain it (see `make help`)")
    if config.get("expert_type") == "houlsby_adapter":
        return AdapterModel.from_pretrained(model, path).eval()
    return PeftModel.from_pretrained(model, str(path)).eval()


def unload_expert(model):
    """The backbone without the expert, restored in place (so one loaded backbone serves many experts)."""
    if is_prompt_learning(model):  # soft tokens never touched the backbone
        return model.get_base_model()
    return model.unload()


@contextmanager
def folded(model):
    """The model with its expert's update added into the backbone's weights while inside (peft's
    merge_adapter: LoRA, DoRA, IA3), for scoring: the same function without the expert's extra products, which
    are a quarter of a mini LoRA scoring pass. The backbone's tensors are restored bit for bit on the way out
    (an unmerge alone would leave rounding in them). An expert that does not fold (adapters, prompts,
    prefixes), or a backbone held in 16 bits
    (the sum would round most of the update away), scores as it is."""
    layers = (
        [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if isinstance(model, PeftModel) and not is_prompt_learning(model)
        else []
    )
    saved = [(p, p.detach().clone()) for m in layers for p in m.get_base_layer().parameters()]
    if not saved or any(p.dtype != torch.float32 for p, _ in saved):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for p, before in saved:
                p.copy_(before)


def group_of(mode: str, etype):
    """Which interpolation group a tensor of an expert of type etype belongs to: one softmax over experts per
    group.

    site: one module the type changes (etype.site: a LoRA's A and B, an adapter's four tensors share it), one
    prefix layer, or the prompt; layer: every site of one transformer layer; tensor: as site where the type
    weighs its sites whole (LoRA: the exact merge), else each tensor; global: one softmax for everything."""

    def layer(key):
        m = re.search(r"(vision_tower|encoder|decoder)\.(?:layers|blocks|block)\.(\d+)", key)
        if m:
            return f"{m.group(1)}.{m.group(2)}"
        return (etype.layer_of(key) if etype.layer_of else None) or "other"

    tensor = etype.site if etype.per_tensor_is_site else (lambda key: key)
    return {"global": lambda key: "all", "layer": layer, "site": etype.site, "tensor": tensor}[mode]


class MergedExpert:
    """K experts of one method mixed with per-group softmax weights, run as ONE expert of that method.

    A type whose merge is "lowrank": the exact update sum_i p_i B_i A_i as one LoRA of rank K*r; every other:
    the weighted sum of each tensor (IA3 vectors, prompt / prefix tables, adapter weights and biases, DoRA's
    A, B and magnitudes)."""

    def __init__(
        self,
        model,
        ecfg,
        experts: list[dict[str, torch.Tensor]],
        groups: str,
        trainable: bool,
        frozen: tuple[int, ...] = (),
    ):
        self.type, k = EXPERT_TYPES[ecfg.method], len(experts)
        merge = self.type.merge
        self.model = attach(model, ecfg, rank_multiplier=k if merge == "lowrank" else 1)
        self.layers = text_dims(model)["decoder_layers"]
        self.stack = ExpertStack(
            [self.type.per_layer(e, self.layers) for e in experts],
            group_of(groups, self.type),
            merge=merge,
            trainable=trainable,
            frozen=frozen,
        )
        self.stack.to(next(model.parameters()).device)  # the merge runs where the model is (Triton on CUDA)
        self.group_names = self.stack.group_names

    def merged(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """{saved key: merged tensor}, differentiable in the logits (and the experts when trainable)."""
        return self.type.whole(self.stack(logits))

    def __call__(self, logits: torch.Tensor, **inputs):
        """The model's forward with the merged expert in place (functional:
        nothing is copied into the model)."""
        merged = {self.type.live(k, "default"): v for k, v in self.merged(logits).items()}
        return functional_call(self.model, merged, args=(), kwargs=inputs)

    @torch.no_grad()
    def export(self, logits: torch.Tensor):
        """The model with the merged expert written into it: save_pretrained gives one ordinary expert."""
        set_weights(self.model, {k: v.detach().contiguous() for k, v in self.merged(logits).items()})
        return self.model


def at_config_scale(weights: dict[str, torch.Tensor], path: Path, ecfg) -> dict[str, torch.Tensor]:
    """A LoRA's tensors with B rescaled from its own saved alpha/r to the configured one, so that the merge
    (attached at the configured scale) adds exactly the update the expert was trained to add."""
    saved = read_json(Path(path) / "adapter_config.json", "expert config", "retrain it")
    own = saved["lora_alpha"] / saved["r"]
    if own == ecfg.alpha / ecfg.r:
        return weights
    return {k: v * (own / (ecfg.alpha / ecfg.r)) if ".lora_B." in k else v for k, v in weights.items()}


def load_pool(cfg, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """The experts' tensors, checked to belong to this backbone and to share one shape."""
    weights = []
    for name in names:
        current_expert(cfg, name)
        w = load_expert_weights(expert_dir(cfg, name))
        if EXPERT_TYPES[cfg.expert.method].scaled:
            w = at_config_scale(w, expert_dir(cfg, name), cfg.expert)
        if weights and {k: v.shape for k, v in w.items()} != {k: v.shape for k, v in weights[0].items()}:
            raise UserError(
                f"{expert_dir(cfg, name)}: its tensors differ from {names[0]}'s; all experts must share "
                f"expert.method, r and target_modules"
            )
        weights.append(w)
    return weights
