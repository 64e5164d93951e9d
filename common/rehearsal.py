"""The dress rehearsal of the paper's profile, offline: a Florence-2 checkpoint shaped like Florence-2-base
but small, with a tokenizer and a generation config that follow Florence-2-base's published conventions, and
data files in the paper catalogue's own layouts (configs/paper_tasks.yaml),
at sizes that leave ragged last batches.

    python -m common.rehearsal runs/rehearsal-assets     # (make does, for PROFILE=rehearsal)

Writes OUT/florence-2-rehearsal/ (a local checkpoint: config.json, model.safetensors, generation_config.json,
the processor and its tokenizer), loaded by exactly the code that loads florence-community/Florence-2-base,
and OUT/data/: OFA's TSVs (base64 images) for SNLI-VE, VQA (its `conf|!+answer` references), captioning and
RefCOCO (boxes in pixels), GLUE RTE (OFA's TSV) and CoOp's Oxford Pets (split JSON + image folder).

Kept from Florence-2-base: the DaViT vision tower's four stages (patch 7/3/3/3, stride 4/2/2/2, windows of 12)
at 768 x 768 pixels, so 577 image tokens before the text; a BART language model; byte-level BPE with <s> = 0,
<pad> = 1, </s> = 2, <unk> = 3, the 1,000 <loc_*> tokens and the task tokens; decoding from </s> with <s>
forced first, 3 beams, no repeated 3-grams. Cut: depths, widths, layers and the vocabulary (trained here on
the generated text); dropout is off (Florence-2-base's is 0.1): each process of a torchrun draws its own
dropout masks, and the rehearsal holds a two-process run to the single-process one."""

from __future__ import annotations

import base64
import io
import json
import random
import sys
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    CLIPImageProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    GenerationConfig,
)

from common import world as W
from common.artifacts import atomic_dir
from common.backbone import florence_tokenizer

# 21 = 5 x 4 + 1: a batch of 4 leaves one example, fewer than 2 ranks
SIZES = {"train": 21, "val": 9, "test": 11}
TASK_TOKENS = (
    "<od>",
    "</od>",
    "<ocr>",
    "</ocr>",
    "<cap>",
    "</cap>",
    "<dcap>",
    "</dcap>",
    "<ncap>",
    "</ncap>",
    "<poly>",
    "</poly>",
    "<sep>",
    "<seg>",
    "</seg>",
    "<region_cap>",
    "</region_cap>",
)
# SNLI-VE's, by the mini world's answers
LABELS = {"yes": "entailment", "no": "contradiction", "maybe": "neutral"}


def _png(scene, rng, size: int = 64, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(W.render(scene, size, rng)).save(buf, format=fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()  # OFA decodes with urlsafe_b64decode


def _box(obj, jitter, size: int = 64) -> str:
    """The object's box in pixels, 'x0,y0,x1,y1' (RefCOCO's region)."""
    cell = size / 3
    cx, cy = (obj.pos % 3 + 0.5) * cell + jitter[0], (obj.pos // 3 + 0.5) * cell + jitter[1]
    r = cell * (0.46 if obj.size == "large" else 0.3)
    return ",".join(
        f"{v:.1f}" for v in (max(cx - r, 0), max(cy - r, 0), min(cx + r, size), min(cy + r, size))
    )


def write_data(root: Path, seed: int = 0) -> list[str]:
    """The rehearsal's data files under root, in the catalogue's layouts; returns every text written (the
    tokenizer's corpus). Image ids differ across splits but for two of RefCOCO's training images, which are
    VQA's test images (COCO's ids, shared): the overlap guard leaves those two training rows out."""
    rng, texts = random.Random(seed), []

    def tsv(path: Path, rows: list[tuple]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
        texts.extend(str(v) for r in rows for v in r if len(str(v)) < 200)

    files = {"train": "train", "val": "dev", "test": "test"}
    for split, n in SIZES.items():  # SNLI-VE: uniq-id, image-id, image, hypothesis, caption, label
        rows = []
        for i in range(n):
            scene = W.random_scene(rng)
            hyp, label = W.hypothesis(scene, rng)
            rows.append(
                (
                    f"{split}{i}",
                    f"{1000 * (1 + len(files)) + 100 * list(SIZES).index(split) + i}",
                    _b64(_png(scene, rng)),
                    hyp,
                    W.describe(scene),
                    LABELS[label],
                )
            )
        tsv(root / f"snli_ve_data/snli_ve_{files[split]}.tsv", rows)
    vqa_test_ids = []
    # VQA: question-id, image-id, question,
    for split, n in (("train", SIZES["train"]), ("val", SIZES["test"])):
        rows = []  # conf|!+answer&&..., objects, image
        for i in range(n):
            scene = W.random_scene(rng)
            q, a = W.question(scene, rng)
            other = rng.choice([x for x in ("yes", "no", "two", "red", "circle") if x != a])
            image_id = 500000 + 100 * (split == "val") + i
            vqa_test_ids += [image_id] if split == "val" else []
            rows.append((i, image_id, q, f"1.0|!+{a}&&0.3|!+{other}", "objects", _b64(_png(scene, rng))))
        tsv(root / f"vqa_data/vqa_{split}.tsv", rows)
    # captions: uniq-id, image-id, caption (val/test: every one, &&), objects, image
    for split, n in SIZES.items():
        rows = []
        for i in range(n):
            scene = W.random_scene(rng)
            caption = (
                W.short_caption(scene)
                if split == "train"
                else f"{W.short_caption(scene)}&&{W.describe(scene, rng)}"
            )
            rows.append(
                (i, 600000 + 100 * list(SIZES).index(split) + i, caption, "objects", _b64(_png(scene, rng)))
            )
        name = {"train": "caption_stage1_train", "val": "caption_val", "test": "caption_test"}[split]
        tsv(root / f"caption_data/{name}.tsv", rows)
    for split, n in SIZES.items():  # RefCOCO: uniq-id, image-id, text, region 'x0,y0,x1,y1', image
        rows = []
        for i in range(n):
            scene = W.random_scene(rng)
            expr, _ = W.referring_expression(scene, rng)
            o = (
                next(x for x in scene.objects if all(w in x.phrase().split() for w in expr.split()[1:]))
                if expr.split()[1:]
                else scene.objects[0]
            )
            jitter = scene.jitter[scene.objects.index(o)]
            image_id = (
                vqa_test_ids[i] if split == "train" and i < 2 else 700000 + 100 * list(SIZES).index(split) + i
            )
            rows.append((f"{i}_1", image_id, expr, _box(o, jitter), _b64(_png(scene, rng))))
        tsv(
            root / f"refcoco_data/refcoco_{ {'train': 'train', 'val': 'val', 'test': 'testA'}[split] }.tsv",
            rows,
        )
    # RTE: idx, s1, s2, label
    for split, n in (("train", SIZES["train"] + SIZES["val"]), ("dev", SIZES["test"])):
        rows = []
        for i in range(n):
            scene = W.random_scene(rng)
            hyp, label = W.hypothesis(scene, rng)
            rows.append((i, W.describe(scene), hyp, "entailment" if label == "yes" else "not_entailment"))
        tsv(root / f"glue_data/rte_{split}.tsv", rows)
    pets, split_file = root / "oxford_pets", {}
    (pets / "images").mkdir(parents=True, exist_ok=True)
    classes = ("great_pyrenees", "abyssinian", "pug")
    for split, n in SIZES.items():  # CoOp: [image path under image_root, label, class name]
        split_file[split] = []
        for i in range(n):
            label = rng.randrange(3) if split == "train" else i % 3
            scene = W.random_scene(rng, 1)
            (pets / "images" / f"{split}{i}.jpg").write_bytes(_png(scene, rng, fmt="JPEG"))
            split_file[split].append([f"{split}{i}.jpg", label, classes[label]])
    (pets / "split_zhou_OxfordPets.json").write_text(json.dumps(split_file))
    texts += [c.replace("_", " ") for c in classes]
    return texts


def build_tokenizer(texts: list[str]):
    """Byte-level BPE trained on the rehearsal's text, laid out as Florence-2-base's: <s> = 0, <pad> = 1,
    </s> = 2, <unk> = 3, the learned merges, <mask>, the 1,000 location tokens, the task tokens and <image>; a
    text is encoded as <s> text </s> (BART's template)."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    prompts = [
        ' does the image describe " " ?',
        " what does the image describe?",
        ' which region does the text " " describe?',
        ' can text1 " " imply text2 " "?',
    ]
    tk.train_from_iterator(
        texts + prompts,
        trainers.BpeTrainer(
            vocab_size=700,
            min_frequency=1,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = florence_tokenizer(tk)
    tok.add_tokens([f"<loc_{i}>" for i in range(1000)] + list(TASK_TOKENS), special_tokens=True)
    return tok


def build_checkpoint(out: Path, texts: list[str], seed: int = 0) -> Path:
    """The rehearsal checkpoint, random weights (seeded), saved as a hub checkpoint is."""
    tok = build_tokenizer(texts)
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[8, 16, 16, 32],
        num_heads=[1, 1, 1, 2],
        num_groups=[1, 1, 1, 2],
        mlp_ratio=1.0,
        patch_size=[7, 3, 3, 3],
        patch_stride=[4, 2, 2, 2],
        patch_padding=[3, 1, 1, 1],
        patch_prenorm=[False, True, True, True],
        window_size=12,
        projection_dim=32,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=1024,
        dropout=0.0,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(
        Florence2Config(
            vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>")
        )
    )
    model.generation_config = GenerationConfig(
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        num_beams=3,
        no_repeat_ngram_size=3,
        early_stopping=True,
        max_length=1025,
    )
    images = CLIPImageProcessor(
        do_resize=True,
        size={"height": 768, "width": 768},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    images.image_seq_length = (768 // 32) ** 2 + 1  # 24 x 24 patches after four stages, and one token more
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    Florence2Processor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return out


def build(root: Path) -> Path:
    """Both, under root (the data first: its text trains the tokenizer); returns the checkpoint's folder."""
    root = Path(root)
    with atomic_dir(root) as tmp:
        texts = write_data(tmp / "data")
        build_checkpoint(tmp / "florence-2-rehearsal", texts)
    return root / "florence-2-rehearsal"


if __name__ == "__main__":
    print(f"rehearsal checkpoint and data: {build(Path(sys.argv[1]))}")
