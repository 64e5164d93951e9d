"""The frozen backbone: a real Florence-2 from a hub id / local dir, or the embedded tiny one built here."""

from __future__ import annotations

import hashlib
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
from tokenizers import Tokenizer, models, pre_tokenizers

from common.config import BackboneConfig
from common.errors import UserError
from common.provenance import artifact

# transformers' model, processor and output classes are imported where used: at the top they would add 1.5 s
# to the 1.8 s of `python -m common.checks`, which every make target runs first

# one concise line per stage: no per-tensor loading bars, no deprecation chatter from peft <-> transformers
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<image>"]
PUNCT = '?".,:'


def backbone_dir(cfg) -> Path:
    """Where the stages load the backbone from: the embedded build (runs/<profile>/backbone@<digest>), or the
    configured hub id / directory."""
    return artifact(cfg, "backbone") if cfg.backbone.source == "embedded" else Path(cfg.backbone.source)


def looks_like_path(source: str) -> bool:
    """Is backbone.source meant as a local directory (a hub id is owner/name or name, never absolute, never
    starting with ./ or ~, never more than one slash)?"""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or Path(source).exists()


def check_source(cfg) -> None:
    """A local backbone.source that is missing, empty or not a checkpoint stops in one line,
    before any stage."""
    source = cfg.backbone.source
    if source == "embedded" or not looks_like_path(source):
        return
    path = Path(source).expanduser()
    fix = "point backbone.source at a checkpoint directory (config.json and weights) or a hub id"
    where = cfg.where("backbone.source")
    if not path.exists():
        raise UserError(f"{where}: backbone.source '{source}' is a path that does not exist; {fix}")
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(f"{where}: backbone.source '{source}' is an empty directory; {fix}")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{where}: backbone.source '{source}' is not a checkpoint (no config.json in it); {fix}"
        )


def fingerprint(path: Path) -> str:
    """A short hash of the backbone's weights, so experts can tell which backbone they belong to.

    A hub id is hashed through its cached snapshot (the files it loaded from), else by name."""
    path = Path(path)
    if not path.is_dir():
        try:
            path = Path(snapshot_download(str(path), local_files_only=True))
        except Exception:  # not cached: the id itself is all there is
            return hashlib.sha256(str(path).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:  # the header and the first MiB are enough to tell checkpoints apart
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def build_vocab(texts: list[str]) -> list[str]:
    """Word-level vocabulary: specials, then every word of the world, sorted (deterministic)."""
    words = set()
    for t in texts:
        for ch in PUNCT:
            t = t.replace(ch, f" {ch} ")
        words.update(t.split())
    return SPECIALS + sorted(words - set(SPECIALS))


def word_splitter():
    """How the embedded backbone's tokenizer splits a text into its words: at spaces, every punctuation mark a
    word of its own."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def florence_tokenizer(tk: Tokenizer):
    """A `tokenizers` tokenizer as a transformers fast one with Florence-2's special tokens (the embedded
    backbone's and the rehearsal checkpoint's)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(vocab: list[str], image_size: int, image_tokens: int):
    """An offline Florence2Processor: word-level fast tokenizer + CLIP-style image processor."""
    from transformers import CLIPImageProcessor, Florence2Processor

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = word_splitter()
    tok = florence_tokenizer(tk)
    ip = CLIPImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    ip.image_seq_length = image_tokens
    return Florence2Processor(image_processor=ip, tokenizer=tok)


def build_model(bcfg: BackboneConfig, vocab_size: int, image_size: int):
    """A tiny Florence-2: a 3-stage DaViT vision tower and a small BART, sized by the config."""
    from transformers import (
        BartConfig,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2VisionConfig,
    )

    dims, heads = list(bcfg.vision_dims), list(bcfg.vision_heads)
    n = len(dims)
    if len(heads) != n:
        raise UserError("backbone.vision_heads must have as many entries as backbone.vision_dims")
    vc = Florence2VisionConfig(
        depths=[1] * n,
        patch_size=[7] + [3] * (n - 1),
        patch_stride=[4] + [2] * (n - 1),
        patch_padding=[3] + [1] * (n - 1),
        patch_prenorm=[False] + [True] * (n - 1),
        embed_dim=dims,
        num_heads=heads,
        num_groups=heads,
        window_size=4,
        projection_dim=bcfg.d_model,
        drop_path_rate=0.0,
    )
    tc = BartConfig(
        vocab_size=vocab_size,
        d_model=bcfg.d_model,
        encoder_layers=bcfg.encoder_layers,
        decoder_layers=bcfg.decoder_layers,
        encoder_attention_heads=bcfg.heads,
        decoder_attention_heads=bcfg.heads,
        encoder_ffn_dim=bcfg.ffn_dim,
        decoder_ffn_dim=bcfg.ffn_dim,
        max_position_embeddings=256,
        dropout=bcfg.dropout,
        init_std=bcfg.d_model**-0.5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    model = Florence2ForConditionalGeneration(
        Florence2Config(vision_config=vc, text_config=tc, image_token_id=SPECIALS.index("<image>"))
    )
    # transformers' fixed N(0, 0.02) init suits d_model 768; at this size attention starts uniform and the
    # model never learns to look at the image. Scale-aware init: BART std d_model^-0.5 (init_std above),
    # PyTorch's fan-in init for the vision tower and projector.
    for m in list(model.model.vision_tower.modules()) + list(model.model.multi_modal_projector.modules()):
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.reset_parameters()
    side = image_size // (4 * 2 ** (n - 1))
    return model, side * side + 1  # image tokens: spatial grid + one temporal token


def load_backbone(cfg, device=None):
    """(model, processor) frozen, in eval mode and on `device` (None: where it loads): a Florence-2
    (image+text) or any seq2seq LM (text only: T5, BART).

    The embedded backbone loads exactly as a real checkpoint would. A text-only model's "processor"
    is its tokenizer."""
    from transformers import (
        AutoConfig,
        AutoModelForSeq2SeqLM,
        AutoProcessor,
        AutoTokenizer,
        Florence2ForConditionalGeneration,
    )

    path, source = backbone_dir(cfg), cfg.backbone.source
    if source == "embedded" and not (path / "meta.json").is_file():
        raise UserError(
            f"{path}: no backbone built under this config; run "
            f"`{cfg.command('train_expert.py', '--pretrain')}` or `make backbone`"
        )
    check_source(cfg)
    if source != "embedded" and not path.exists() and not _cached(source) and not _hub_reachable():
        raise UserError(
            f"{cfg.path}: backbone.source '{source}' is a hub id, not in the local cache, and the hub is "
            f"unreachable; download it where there is network (`hf download {source} --local-dir DIR`) "
            f"and set backbone.source=DIR"
        )
    try:
        if AutoConfig.from_pretrained(str(path)).model_type == "florence2":
            model = Florence2ForConditionalGeneration.from_pretrained(str(path))
            processor = AutoProcessor.from_pretrained(str(path))
        else:
            model = AutoModelForSeq2SeqLM.from_pretrained(str(path))
            processor = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:  # offline, a typo in the id, a directory without a checkpoint
        where = "a local directory" if Path(source).exists() else "a hub id"
        raise UserError(
            f"{cfg.path}: backbone.source '{source}' ({where}) could not be loaded "
            f"({str(e).splitlines()[0][:140]}); download it where there is network "
            f"(`hf download {source} --local-dir DIR`) and set backbone.source=DIR"
        ) from None
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    if model.config.model_type == "florence2" and cfg.feature_cache_mb > 0:
        ImageFeatureCache(model, cfg.feature_cache_mb)
    return model, processor


class ImageFeatureCache:
    """Florence-2's vision tower + projector memoised per image (pixel bytes -> projected features).

    The tower is frozen for every expert that adapts the language model, yet each training step, Fisher pass
    and evaluation re-encodes the same few images: a third of a mini training step on CPU. Installed in place
    of model.model.get_image_features; it steps aside (computes as before) whenever the tower could differ:
    a trainable tower or projector (full fine-tuning), an expert inside them, stochastic layers in training
    mode, extra arguments, a non-CPU device (on a GPU each key would cost a copy of the image back to the
    host, and the tower is cheap there). Caches until budget_mb is full, then computes the rest. Keys are
    pixels and the autocast dtype, not weights: code that rewrites a frozen tower's weights in place must
    load a fresh backbone."""

    def __init__(self, model, budget_mb: int):
        self.inner = model.model
        self.compute = self.inner.get_image_features
        self.parts = (self.inner.vision_tower, self.inner.multi_modal_projector)
        self.names = self._param_names()
        self.stochastic = any(
            getattr(m, "drop_prob", 0) or (isinstance(m, torch.nn.Dropout) and m.p)
            for part in self.parts
            for m in part.modules()
        )
        self.room = budget_mb << 20
        self.features: dict[bytes, torch.Tensor] = {}
        self.inner.get_image_features = self

    def _param_names(self) -> list[str]:
        return [n for part in self.parts for n, _ in part.named_parameters()]

    def usable(self, pixel_values: torch.Tensor, kwargs: dict) -> bool:
        if kwargs or pixel_values.device.type != "cpu" or (self.stochastic and self.parts[0].training):
            return False
        return (
            not any(p.requires_grad for part in self.parts for p in part.parameters())
            and self._param_names() == self.names
        )

    def __call__(self, pixel_values: torch.Tensor, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if not self.usable(pixel_values, kwargs):
            return self.compute(pixel_values, **kwargs)
        rows = pixel_values.detach().contiguous()
        amp = str(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else "fp32"
        keys = [
            hashlib.blake2b(
                row.view(-1).view(torch.uint8).numpy(),
                digest_size=16,  # bytes: bf16 too
                person=f"{row.dtype}{amp}".encode()[-16:],
            ).digest()
            for row in rows
        ]
        missing = [i for i, k in enumerate(keys) if k not in self.features]
        fresh = {}
        if missing:
            with torch.no_grad():
                fresh = dict(zip(missing, self.compute(rows[missing]).pooler_output))
            for i, f in fresh.items():
                size = f.numel() * f.element_size()
                if size <= self.room and keys[i] not in self.features:
                    self.features[keys[i]], self.room = f.clone(), self.room - size
        return BaseModelOutputWithPooling(
            pooler_output=torch.stack(
                [fresh[i] if i in fresh else self.features[k] for i, k in enumerate(keys)]
            )
        )


def _cached(repo_id: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the hub,
    so an offline machine fails at once instead of after minutes of retries."""
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---- pre-training of the embedded backbone ----------------------------------------------------


def init_unseen_embeddings(model, seen: torch.Tensor, seed: int = 0) -> int:
    """Give tokens never produced in pre-training an embedding at the typical norm of trained ones.

    Untrained tied embeddings keep their tiny init norm and cap those words' logits (yes/no/maybe sit
    at chance otherwise); this is the usual new-label-token initialisation."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        seen = seen.to(emb.device)
        norm = emb[seen].norm(dim=1).mean()
        unseen = (~seen).nonzero().flatten()
        unseen = unseen[unseen >= len(SPECIALS)]
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(len(unseen), emb.shape[1], generator=g).to(emb.device)
        emb[unseen] = direction / direction.norm(dim=1, keepdim=True) * norm
    return len(unseen)
