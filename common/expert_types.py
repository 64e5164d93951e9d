"""Every expert type, one object each (as peft keeps one config class per method): how it attaches to a frozen
backbone, the modules and learning rate it takes by default, how K of its experts interpolate, what it adds
for the `weights` embedding. Config validation, the stages and the tests read EXPERT_TYPES; a new type is one
entry here. Light to import, as config imports it: torch, peft and common.adapters are imported where an
expert is built (at the top, peft would add 3 s to the 0.15 s of `python -m common.provenance`,
run by make per pipeline)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

# the language model only (a bare `q_proj|fc2` would also match Florence-2's vision tower); T5 names its
# modules q/k/v/o, wi/wo
_BART = r".*(language_model|model)\.(encoder|decoder)\..*\."
ATTENTION = {
    "bart": _BART + r"(q_proj|k_proj|v_proj|out_proj)$",
    "t5": r".*\.(SelfAttention|EncDecAttention)\.(q|k|v|o)$",
}


@dataclass(frozen=True)
class ExpertType:
    """One kind of expert. build(model, ecfg, dims, targets, rank_multiplier) returns a peft config, or the
    model with the expert (adapters); update(weights, layers) gives {site: what the expert adds there}."""

    name: str
    lr: float  # expert.lr 0 takes this (measured: IA3, prompts and prefixes need far larger steps)
    targets: dict  # backbone family (bart | t5) -> target_modules regex; {} = acts through extra inputs
    build: Callable
    update: Callable
    factors: Callable | None = None  # weights -> {site: (B, A)} where the update is their product B @ A
    merge: str = (
        "sum"  # sum: the weighted sum of each tensor | lowrank: the exact sum_i p_i B_i A_i (rank K*r)
    )
    peft_merges: bool = False  # peft's add_weighted_adapter baselines (linear-merge, ties-merge) apply
    scaled: bool = False  # B carries alpha/r: rescaled to the configured scale before a merge
    layered: bool = False  # one table for all decoder layers, interpolated per layer (prefix)
    # a saved tensor's key -> its site (the module it changes: a LoRA's A and B, an adapter's four tensors
    # share one), and -> the live parameter's name under a peft adapter's name
    site: Callable = field(default=lambda key: key)
    live: Callable = field(default=lambda key, adapter: key)
    per_tensor_is_site: bool = False  # interpolate.groups=tensor weighs its sites whole (A and B together)
    # a tensor's decoder layer where its key names none (interpolate.groups=layer): prefix's per-layer tables
    layer_of: Callable | None = None
    # how a loaded expert of the type runs outside peft's forward (common.metrics): the encoder's inputs with
    # its soft tokens (model, peft_config, inputs) -> inputs, and the decoder's cache for n rows (model, n)
    encoder_inputs: Callable | None = None
    decoder_cache: Callable | None = None
    doc: str = ""
    saved_as: tuple = field(default=("peft_type", ""))  # adapter_config.json's key and value for this type
    null: Callable | None = (
        None  # weights -> the expert of this shape that changes nothing (the transfer row's
    )
    #                               control); None: the type has none (a soft token,
    # a magnitude, is never nothing)

    def per_layer(self, weights: dict, layers: int) -> dict:
        """A layered type's (prefix's) one table as one tensor per decoder layer (its own group); others as
        they are."""
        return _per_layer(weights, layers) if self.layered else weights

    def whole(self, weights: dict) -> dict:
        """Inverse of per_layer."""
        return _whole(weights) if self.layered else weights


def _parts(weights: dict, names: str) -> dict[str, dict]:
    """{site: {part: tensor}} for the tensors whose name ends in one of `names` (a regex alternation)."""
    parts: dict[str, dict] = defaultdict(dict)
    for k, v in weights.items():
        m = re.match(rf"(.*)\.({names})(?:\.weight)?$", k)
        if m:
            parts[m.group(1)][m.group(2)] = v.float()
    return parts


def _lora_update(weights, layers=1):  # B starts at zero, so B.A is the whole update (DoRA: its direction)
    return {site: p["lora_B"] @ p["lora_A"] for site, p in _parts(weights, "lora_A|lora_B").items()}


def _lora_factors(weights):
    return {site: (p["lora_B"], p["lora_A"]) for site, p in _parts(weights, "lora_A|lora_B").items()}


def _adapter_factors(weights):
    return {
        site: (p["adapter.up"], p["adapter.down"])
        for site, p in _parts(weights, r"adapter\.down|adapter\.up").items()
    }


def _zeros(weights):  # LoRA (B = A = 0), an adapter (x + up(relu(down x)) = x)
    return {k: v.new_zeros(v.shape) for k, v in weights.items()}


def _ones(weights):  # IA3: every scale 1
    return {k: v.new_ones(v.shape) for k, v in weights.items()}


def _ia3_update(weights, layers=1):  # the scales start at 1
    return {site: p["ia3_l"] - 1 for site, p in _parts(weights, "ia3_l").items()}


def _adapter_update(weights, layers=1):  # no neutral start: the bottleneck's map stands for it
    return {
        site: p["adapter.up"] @ p["adapter.down"]
        for site, p in _parts(weights, r"adapter\.down|adapter\.up").items()
    }


def _prompt_update(weights, layers=1):  # the mean soft token
    return {k: t.float().mean(0) for k, t in weights.items()}


def _prefix_update(weights, layers=1):  # the mean prefix token of each decoder layer
    return {k.rsplit(".", 1)[-1]: t.float().mean(0) for k, t in _per_layer(weights, layers).items()}


def _per_layer(weights: dict, layers: int) -> dict:
    """A prefix's [tokens, layers*2*d] table as one [tokens, 2*d] tensor per decoder layer (its own group)."""
    t = weights["prompt_embeddings"]
    return {
        f"prompt_embeddings.layer{i}": p.contiguous()
        for i, p in enumerate(t.view(t.shape[0], layers, -1).unbind(1))
    }


def _whole(weights: dict) -> dict:
    """Inverse of _per_layer."""
    import torch

    return {
        "prompt_embeddings": torch.stack(
            [weights[f"prompt_embeddings.layer{i}"] for i in range(len(weights))], 1
        ).flatten(1)
    }


def _lora_site(key):  # x.lora_A.weight, x.lora_B.weight (and DoRA's x.lora_magnitude_vector) -> x
    m = re.match(r"(.*)\.(lora_[AB]\.|lora_magnitude_vector$)", key)
    return m.group(1) if m else key


def _lora_live(key, adapter):  # (and a LoRA bias, peft's lora_bias: x.lora_B.bias)
    return re.sub(r"\.(lora_[AB])\.(weight|bias)$", rf".\1.{adapter}.\2", key)


def _dora_live(key, adapter):
    return re.sub(
        r"\.lora_magnitude_vector$", f".lora_magnitude_vector.{adapter}.weight", _lora_live(key, adapter)
    )


def _adapter_site(key):  # x.adapter.down.weight, ... -> x
    m = re.match(r"(.*)\.adapter\.", key)
    return m.group(1) if m else key


def _table_live(key, adapter):  # prompt / prefix: the prompt encoder's embedding table
    return f"prompt_encoder.{adapter}.embedding.weight"


def _prefix_layer(key):  # prompt_embeddings.layer<l>: decoder layer l
    m = re.match(r"prompt_embeddings\.layer(\d+)$", key)
    return f"decoder.{m.group(1)}" if m else None


def _prompt_inputs(model, peft_config, enc_in: dict) -> dict:
    """The soft tokens prepended to the encoder's input, as peft's forward does."""
    import torch

    n, v = enc_in["inputs_embeds"].shape[0], peft_config.num_virtual_tokens
    prompts = model.get_prompt(batch_size=n)[:, :v].to(enc_in["inputs_embeds"].dtype)
    mask = enc_in["attention_mask"]
    return {
        "inputs_embeds": torch.cat([prompts, enc_in["inputs_embeds"]], 1),
        "attention_mask": torch.cat([mask.new_ones(n, v), mask], 1),
    }


def _prefix_cache(model, n: int) -> dict:  # a fresh cache per call: the decoder appends to it
    return {"past_key_values": model.get_prompt(batch_size=n)}


def of_peft_config(peft_config) -> ExpertType | None:
    """The type of a loaded peft expert by its config (None: none loaded, or not a peft type)."""
    if peft_config is None:
        return None
    # the types told apart by a flag (DoRA: use_dora) before those told by peft_type alone
    for t in sorted(EXPERT_TYPES.values(), key=lambda t: t.saved_as[0] == "peft_type"):
        key, value = t.saved_as
        got = getattr(peft_config, key, None)
        if getattr(got, "value", got) == value:
            return t
    return None


def _lora(model, ecfg, dims, targets, k, dora=False):
    from peft import LoraConfig

    return LoraConfig(
        r=ecfg.r * k,
        lora_alpha=ecfg.alpha * k,
        lora_dropout=ecfg.dropout,
        target_modules=targets,
        bias="none",
        use_dora=dora,
    )


def _dora(model, ecfg, dims, targets, k):  # merged per tensor, so always rank r
    return _lora(model, ecfg, dims, targets, 1, dora=True)


def _ia3(model, ecfg, dims, targets, k):
    from peft import IA3Config

    # scales their inputs
    feedforward = {"bart": r".*\.fc2$", "t5": r".*\.DenseReluDense\.wo$"}[dims["family"]]
    return IA3Config(target_modules=targets, feedforward_modules=feedforward)


# soft tokens before the encoder input; Florence-2 needs the dims spelled out
def _prompt(model, ecfg, dims, targets, k):
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=ecfg.virtual_tokens,
        token_dim=dims["d_model"],
        num_attention_heads=dims["heads"],
        num_layers=dims["encoder_layers"],
        num_transformer_submodules=1,
        prompt_tuning_init="SAMPLE_VOCAB",
    )


# keys/values prepended in every decoder self-attention (peft's seq2seq prefix)
def _prefix(model, ecfg, dims, targets, k):
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=ecfg.virtual_tokens,
        token_dim=dims["d_model"],
        num_attention_heads=dims["heads"],
        num_layers=dims["decoder_layers"],
        num_transformer_submodules=2,
    )


def _adapter(model, ecfg, dims, targets, k):
    from common.adapters import AdapterModel

    return AdapterModel(model, targets, ecfg.adapter_dim, ecfg.dropout)


EXPERT_TYPES: dict[str, ExpertType] = {
    t.name: t
    for t in [
        ExpertType(
            "lora",
            1e-3,
            ATTENTION,
            _lora,
            _lora_update,
            _lora_factors,
            merge="lowrank",
            peft_merges=True,
            scaled=True,
            saved_as=("peft_type", "LORA"),
            null=_zeros,
            site=_lora_site,
            live=_lora_live,
            per_tensor_is_site=True,
            doc="LoRA on q, k, v, out of every attention (the original's), merged exactly",
        ),
        # DoRA's update m * (W0 + BA) / ||W0 + BA|| is not linear in B.A, so there is no exact delta merge:
        # its experts interpolate in parameter space (A,
        # B and the magnitude each a weighted sum), as adapters do
        ExpertType(
            "dora",
            1e-3,
            ATTENTION,
            _dora,
            _lora_update,
            _lora_factors,
            scaled=True,
            saved_as=("use_dora", True),
            site=_lora_site,
            live=_dora_live,
            per_tensor_is_site=True,
            doc="DoRA (peft use_dora): LoRA with a learned magnitude per output; interpolated per tensor",
        ),
        ExpertType(
            "ia3",
            1e-2,
            {
                "bart": _BART + r"(k_proj|v_proj|fc2)$",
                "t5": r".*\.((SelfAttention|EncDecAttention)\.(k|v)|DenseReluDense\.wo)$",
            },
            _ia3,
            _ia3_update,
            saved_as=("peft_type", "IA3"),
            null=_ones,
            live=lambda key, adapter: re.sub(r"\.ia3_l$", f".ia3_l.{adapter}", key),
            doc="IA3: learned scales of keys, values and the FFN's inner activations",
        ),
        ExpertType(
            "prompt",
            3e-2,
            {},
            _prompt,
            _prompt_update,
            saved_as=("peft_type", "PROMPT_TUNING"),
            live=_table_live,
            encoder_inputs=_prompt_inputs,
            doc="soft prompt tokens before the encoder's input",
        ),
        ExpertType(
            "prefix",
            1e-2,
            {},
            _prefix,
            _prefix_update,
            layered=True,
            saved_as=("peft_type", "PREFIX_TUNING"),
            live=_table_live,
            layer_of=_prefix_layer,
            decoder_cache=_prefix_cache,
            doc="prefix keys / values in every decoder self-attention",
        ),
        ExpertType(
            "adapter",
            1e-3,
            {
                "bart": _BART + r"(self_attn\.out_proj|fc2)$",
                "t5": r".*\.(SelfAttention\.o|"
                r"DenseReluDense\.wo)$",
            },
            _adapter,
            _adapter_update,
            _adapter_factors,
            saved_as=("expert_type", "houlsby_adapter"),
            null=_zeros,
            site=_adapter_site,
            doc="Houlsby bottleneck adapters after each self-attention and FFN (the paper's headline)",
        ),
    ]
}
