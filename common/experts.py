"""Parameter-efficient experts (each type one object in common/expert_types.py: LoRA, DoRA, IA3, prompt,
prefix via peft; adapters from common.adapters): create, name, save, load, group their tensors, and run K
of them merged as one."""

from __future__ import annotations

import dataclasses
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file
from torch.func import functional_call

from common.adapters import WEIGHTS, AdapterModel
from common.artifacts import read_json
from common.backbone import backbone_dir, fingerprint
from common.errors import UserError
from common.expert_types import EXPERT_TYPES
from common.imported import CONFIG as IMPORTED_CONFIG, files_hash, folder_hash, sources
from common.merge import ExpertStack

# expert_name: the stages import it here
from common.provenance import artifact, expert_name, made_from, parse_run  # noqa: F401


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


def attach(model, ecfg, rank_multiplier: int = 1, recipe: LoraRecipe | None = None):
    """Wrap the frozen backbone in a fresh expert of the configured type (only the expert's tensors train).

    rank_multiplier: a k-expert LoRA merge is one LoRA of rank k*r
    (the same alpha/r keeps sum_i p_i B_i A_i exact). recipe: a pool of mixed LoRA recipes merges into one
    LoRA on all their sites, of their largest rank, with biases if any has them, at the configured alpha/r."""
    dims, m = text_dims(model), ecfg.method
    targets = target_modules(ecfg, dims)
    if recipe:
        targets = "^(" + "|".join(re.escape(s) for s in recipe.sites) + ")$"
        ecfg = dataclasses.replace(ecfg, r=recipe.rank, alpha=ecfg.alpha / ecfg.r * recipe.rank)
    built = EXPERT_TYPES[m].build(model, ecfg, dims, targets, rank_multiplier)
    if recipe and recipe.bias:
        built.lora_bias = True
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


def tensor_shapes(path: Path) -> dict[str, tuple]:
    """{key: shape} of an expert's saved tensors, read from the file's header (no tensor is loaded)."""
    try:
        with safe_open(str(Path(path) / WEIGHTS), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise UserError(
            f"{path}: corrupt expert weights ({str(e)[:80]}); delete {path} and make it again"
        ) from None


def one_shape(cfg, names: list[str]) -> bool:
    """Do these experts' tensors share one set of names and shapes (one recipe)?"""
    first = tensor_shapes(expert_dir(cfg, names[0]))
    return all(tensor_shapes(expert_dir(cfg, n)) == first for n in names[1:])


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
        recipe = getattr(experts, "recipe", None)
        self.model = attach(model, ecfg, rank_multiplier=k if merge == "lowrank" else 1, recipe=recipe)
        self.layers = text_dims(model)["decoder_layers"]
        self.stack = ExpertStack(
            [self.type.per_layer(e, self.layers) for e in experts],
            group_of(groups, self.type),
            merge=merge,
            trainable=trainable,
            frozen=frozen,
            keep=getattr(experts, "keep", None),
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


PEFT_PREFIX = "base_model.model."  # how peft names a module's tensors in a saved adapter


@dataclass(frozen=True)
class LoraRecipe:
    """The one LoRA a pool of mixed recipes merges into: every site any expert adapts (full module names), the
    largest rank, and whether any expert has LoRA biases (peft's lora_bias)."""

    sites: tuple
    rank: int
    bias: bool


class Pool(list):
    """The pool's state dicts, one shape for all (list order = the experts'); `recipe` is the LoRA the merge
    attaches where the experts' recipes differ (None: the configured expert's), `keep` per expert a mask of
    its LoRA biases (0 where padded in: they stay zero while experts train)."""

    recipe: LoraRecipe | None = None
    keep: list | None = None


def lora_scales(config: dict, weights: dict, etype) -> dict[str, float]:
    """{site: the scale peft applies to B @ A there}: lora_alpha / r, or / sqrt(r) with use_rslora, alpha from
    alpha_pattern where it names the site (peft's own matching), r the site's own rank."""
    patterns = config.get("alpha_pattern") or {}
    out = {}
    for site, (_, a) in etype.factors(weights).items():
        module = site.removeprefix(PEFT_PREFIX)
        alpha = patterns.get(get_pattern_key(patterns.keys(), module), config.get("lora_alpha", 8))  # peft's
        out[site] = alpha / math.sqrt(a.shape[0]) if config.get("use_rslora") else alpha / a.shape[0]
    return out


def at_config_scale(weights: dict[str, torch.Tensor], path: Path, ecfg) -> dict[str, torch.Tensor]:
    """A LoRA's tensors with B (and its bias) rescaled from the expert's own scale at each site to the
    configured alpha/r, so that the merge (attached at the configured scale) adds exactly the update the
    expert adds: lora_alpha / r, rsLoRA's / sqrt(r), alpha_pattern's, as its adapter_config.json says."""
    saved, etype = (
        read_json(Path(path) / "adapter_config.json", "expert config", "retrain it"),
        EXPERT_TYPES[ecfg.method],
    )
    scales, ref = lora_scales(saved, weights, etype), ecfg.alpha / ecfg.r
    return {
        k: v * (scales[site] / ref)
        if (site := etype.site(k)) in scales and ".lora_B." in k and scales[site] != ref
        else v
        for k, v in weights.items()
    }


def to_recipe(pool: list[dict[str, torch.Tensor]], etype) -> tuple[list[dict], LoraRecipe, list[dict]]:
    """LoRAs of different ranks, sites and biases (each at the configured scale, fp32) as one shape: every
    site any of them adapts, each padded to the largest rank with zero rows of A and zero columns of B (a
    site an expert lacks: all zeros; its bias, where others have one: zeros). B @ A and the bias are
    unchanged. The padded A and B get no gradient (each multiplies the other's zeros), and the padded biases
    are masked (the third value: per expert, 1 for its own bias entries, 0 for padding), so the merge stays
    exact while the experts train."""
    parts = [etype.factors(w) for w in pool]
    sites = list(dict.fromkeys(site for p in parts for site in p))
    shape = {}  # site -> (d_out, d_in), from any expert that has it
    for p in parts:
        shape |= {site: (b.shape[0], a.shape[1]) for site, (b, a) in p.items()}
    rank = max(a.shape[0] for p in parts for _, a in p.values())
    bias = any(k.endswith(".lora_B.bias") for w in pool for k in w)
    out, keep = [], []
    for w, p in zip(pool, parts):
        one, kept = {}, {}
        for site in sites:
            d_out, d_in = shape[site]
            a, b = torch.zeros(rank, d_in), torch.zeros(d_out, rank)
            if site in p:
                r = p[site][1].shape[0]
                a[:r], b[:, :r] = w[f"{site}.lora_A.weight"], w[f"{site}.lora_B.weight"]
            one[f"{site}.lora_A.weight"], one[f"{site}.lora_B.weight"] = a, b
            if bias:
                key = f"{site}.lora_B.bias"
                one[key] = w[key] if key in w else torch.zeros(d_out)
                kept[key] = torch.full((d_out,), float(key in w))
        out.append(one)
        keep.append(kept)
    modules = tuple(site.removeprefix(PEFT_PREFIX) for site in sites)
    return out, LoraRecipe(modules, rank, bias), keep


def load_pool(cfg, names: list[str]) -> Pool:
    """The experts' tensors, checked to belong to this backbone, at the configured scale; LoRAs of different
    recipes (imported ones) brought to one shape (to_recipe), others checked to share one."""
    weights, etype = Pool(), EXPERT_TYPES[cfg.expert.method]
    for name in names:
        current_expert(cfg, name)
        w = load_expert_weights(expert_dir(cfg, name))
        if name in cfg.tasks.imported:  # fp32 like the harness's own (one from elsewhere may be bf16)
            w = {k: v.float() for k, v in w.items()}
        if etype.scaled:
            w = at_config_scale(w, expert_dir(cfg, name), cfg.expert)
        weights.append(w)
    shapes = [{k: v.shape for k, v in w.items()} for w in weights]
    if any(s != shapes[0] for s in shapes) and etype.merge == "lowrank":
        weights[:], weights.recipe, weights.keep = to_recipe(weights, etype)
    elif any(s != shapes[0] for s in shapes):
        odd = next(i for i, s in enumerate(shapes) if s != shapes[0])
        raise UserError(
            f"{expert_dir(cfg, names[odd])}: its tensors differ from {names[0]}'s; all experts must share "
            f"expert.method, r and target_modules"
        )
    return weights


def _same_base(base: str, cfg) -> bool:
    """Was an adapter made for this backbone: its base_model_name_or_path is backbone.source, or a folder
    holding these very weights?"""
    ours = backbone_dir(cfg)
    if base in (cfg.backbone.source, str(ours)):
        return True
    path = Path(base).expanduser()
    return path.is_dir() and (path.resolve() == ours.resolve() or fingerprint(path) == fingerprint(ours))


def _not_merged(config: dict) -> str | None:
    """Why the exact merge cannot take an adapter (None: it can): its update must be s B A added to the
    backbone's own weights at every input."""
    kind, init = config.get("peft_type"), str(config.get("init_lora_weights", "")).lower()
    if kind != "LORA":
        return (
            f"a {kind} adapter: its update is not a low-rank B A"
            if kind
            else "not a peft adapter (no peft_type)"
        )
    if config.get("use_dora"):
        return (
            "a DoRA adapter (use_dora): its magnitude rescales each output of W0 + B A, so a sum of DoRA "
            "updates is not the update of their sum"
        )
    if init.startswith("loftq"):
        return "a LoftQ LoRA (init_lora_weights): it belongs to a quantized copy of the base weights"
    if init.startswith(("pissa", "olora", "corda", "lora_ga")):
        return (
            f"a LoRA initialised by {init} (init_lora_weights), which changed the base weights too: "
            "convert it to a plain LoRA with peft first (its path_initial_model_for_weight_conversion)"
        )
    for field, what in (
        (
            "fan_in_fan_out",
            "a LoRA of Conv1D weights (fan_in_fan_out): its B A is transposed against this "
            "backbone's linear layers",
        ),
        (
            "alora_invocation_tokens",
            "an activated LoRA (alora_invocation_tokens): it acts after its invocation tokens only",
        ),
        ("layer_replication", "a LoRA with layer_replication: it adds layers the backbone has not"),
    ):
        if config.get(field):
            return what
    return None


def import_expert(cfg, name: str, model, folder: Path) -> dict:
    """Check an imported adapter (tasks.imported), as copied to `folder`, against the loaded backbone: a peft
    LoRA (no DoRA) of linear modules this backbone has, of their shapes, made for this backbone; returns what
    its meta.json records (train_expert.py writes the copy as the pool expert `name`)."""
    where = f"{cfg.where('tasks.imported')}: tasks.imported.{name} ({sources(cfg)[name]})"
    fix = f"replace the adapter, or drop {name} from tasks.pool and tasks.imported"
    config = read_json(folder / IMPORTED_CONFIG, "peft adapter config", fix)
    if not isinstance(config, dict):
        raise UserError(f"{where}: its {IMPORTED_CONFIG} is not a peft adapter config; {fix}")
    if why := _not_merged(config):
        raise UserError(f"{where}: {why}; the pool merges LoRA updates exactly, so import LoRA adapters only")
    base = config.get("base_model_name_or_path") or ""
    if base and not _same_base(base, cfg):
        raise UserError(
            f"{where}: made for base model '{base}', not this backbone ({backbone_dir(cfg)}); import it into "
            f"a profile whose backbone.source is that model, or, if it was trained on these very weights, "
            f'set base_model_name_or_path in its {IMPORTED_CONFIG} to "{backbone_dir(cfg)}"'
        )
    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise UserError(f"{where}: corrupt adapter weights ({str(e)[:80]}); {fix}") from None
    if not weights:
        raise UserError(f"{where}: the adapter holds no tensors; {fix}")
    modules = dict(model.named_modules())
    for key, t in weights.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.(weight|bias)", key)
        a = weights.get(f"{PEFT_PREFIX}{m[1]}.lora_A.weight") if m else None
        b = weights.get(f"{PEFT_PREFIX}{m[1]}.lora_B.weight") if m else None
        if a is None or b is None or (m[2], m[3]) == ("A", "bias"):
            raise UserError(
                f"{where}: tensor {key} is not a factor of a whole LoRA of a linear module (its lora_A and "
                f"lora_B; not modules_to_save, not an embedding's LoRA), which the exact merge needs; {fix}"
            )
        module = modules.get(m[1])
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"{where}: it adapts {m[1]}, which is not a linear layer of this backbone; {fix}")
        d_out, d_in = module.out_features, module.in_features
        want = (d_out,) if m[3] == "bias" else (a.shape[0], d_in) if m[2] == "A" else (d_out, a.shape[0])
        if tuple(t.shape) != want:
            raise UserError(
                f"{where}: module {m[1]} is {d_out}x{d_in} in this backbone, but the adapter's "
                f"lora_{m[2]}.{m[3]} is {tuple(t.shape)}, not {want}; {fix}"
            )
    scales = lora_scales(config, weights, EXPERT_TYPES[cfg.expert.method])
    copied = files_hash(cfg, name)  # the source's as the stage found it, which the artifact's digest hashes
    if folder_hash(folder, cfg.run_dir / ".hashes.json") != copied:
        raise UserError(
            f"{where}: its files changed while it was imported; leave them as they are and run it again"
        )
    return {
        "name": name,
        "method": cfg.expert.method,
        "shots": None,
        "seed": 0,
        "imported": {"source": sources(cfg)[name], "files": copied},
        "recipe": {
            "r": sorted({w.shape[0] for k, w in weights.items() if k.endswith("lora_A.weight")}),
            "lora_alpha": config.get("lora_alpha"),
            "use_rslora": bool(config.get("use_rslora")),
            "scales": sorted(set(round(s, 6) for s in scales.values())),
            "sites": len(scales),
            "bias": any(k.endswith(".bias") for k in weights),
        },
        "trainable_params": sum(t.numel() for t in weights.values()),
        "backbone": fingerprint(backbone_dir(cfg)),
        "config": cfg.to_dict(),
        "made_from": made_from(cfg, "expert", name),
    }
