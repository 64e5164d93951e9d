"""Scoring: accuracy by candidate answers (sum of answer-token log-probs, argmax), token accuracy, and the
real-data metrics (VQA accuracy, Acc@IoU with location tokens, BLEU-4,
CIDEr-D) as pure functions on strings."""

from __future__ import annotations

import copy
import math
import re
from collections import Counter

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from common import dist
from common.data import Encoder, Example, Task, batches, by_length, candidates_for
from common.expert_types import of_peft_config
from common.readers import PUNCTUATION, tokens_to_box


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, forced: int = 0) -> torch.Tensor:
    """Sum over the answer's tokens of log p(token); label -100 marks padding, and the first `forced` tokens
    (a BART checkpoint's <s>, which generation forces) are no choice of the model's: not counted."""
    logp = F.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = labels != -100
    keep[:, :forced] = False
    return (tok * keep).sum(-1)


def answer_logprobs(model, enc: Encoder, exs: list[Example], answers: list[str]) -> torch.Tensor:
    """Sum of log p(answer tokens + </s> | image, prompt) for each (example, answer) pair, the decoder fed as
    the checkpoint was trained (its decoder start, then the forced tokens)."""
    labels = enc.labels(answers)
    return sequence_logprob(model(**enc.inputs(exs), labels=labels).logits, labels, len(enc.forced))


@torch.no_grad()
def candidate_accuracy(model, enc: Encoder, task: Task, exs: list[Example], batch_size: int = 64) -> float:
    """Fraction of examples whose best-scoring candidate answer is the right one."""
    return sum(candidate_hits(model, enc, task, exs, batch_size)) / len(exs)


@torch.no_grad()
def candidate_hits(model, enc: Encoder, task: Task, exs: list[Example], batch_size: int = 64) -> list[bool]:
    """For each example: is its best-scoring candidate answer the right one? (Scored in batches of alike
    prompt lengths, returned in the examples' order.)"""
    hits, order = [], by_length(exs)
    for chunk in batches(exs, max(1, batch_size // len(candidates_for(task, exs[0]))), order=order):
        pairs = [(e, c) for e in chunk for c in candidates_for(task, e)]
        index = torch.tensor(
            [i for i, e in enumerate(chunk) for _ in candidates_for(task, e)], device=enc.device
        )
        scores = candidate_logprobs(
            model, enc.inputs(chunk), index, enc.labels([c for _, c in pairs]), len(enc.forced)
        ).tolist()
        k = 0
        for e in chunk:
            cands = candidates_for(task, e)
            best = max(range(len(cands)), key=lambda j: scores[k + j])
            hits.append(cands[best] == e.answer)
            k += len(cands)
    out = [False] * len(exs)
    for i, hit in zip(order, hits):
        out[i] = hit
    return out


@torch.no_grad()
def sampled_answers(
    model, enc: Encoder, task: Task, exs: list[Example], generator: torch.Generator
) -> list[str]:
    """An answer per example drawn from the model's own distribution: over the candidates for a closed task
    (their sequence probabilities, renormalised), token by token for an open one."""
    if candidates_for(task, exs[0]) is None:
        return generate_answers(model, enc, exs, len(exs), sample=generator)
    pairs = [(i, c) for i, e in enumerate(exs) for c in candidates_for(task, e)]
    index = torch.tensor([i for i, _ in pairs], device=enc.device)
    scores = (
        candidate_logprobs(model, enc.inputs(exs), index, enc.labels([c for _, c in pairs]), len(enc.forced))
        .float()
        .cpu()
    )
    out = []
    for i, e in enumerate(exs):
        cands = candidates_for(task, e)
        mine = scores[index.cpu() == i]
        out.append(cands[torch.multinomial(mine.softmax(0), 1, generator=generator).item()])
    return out


def candidate_logprobs(
    model, inputs: dict, index: torch.Tensor, labels: torch.Tensor, forced: int = 0
) -> torch.Tensor:
    """log p(labels[j] | example index[j]) with the encoder run once per example, not once per candidate (the
    first `forced` label tokens not counted: sequence_logprob)."""
    base, states, mask, decoder_kwargs = _encode(model, inputs)
    logits = base(
        encoder_outputs=BaseModelOutput(last_hidden_state=states[index]),
        attention_mask=mask[index],
        labels=labels,
        **decoder_kwargs(len(index)),
    ).logits
    return sequence_logprob(logits, labels, forced)


@torch.no_grad()
def generate_answers(
    model,
    enc: Encoder,
    exs: list[Example],
    batch_size: int = 64,
    max_new_tokens: int = 32,
    sample: torch.Generator | None = None,
) -> list[str]:
    """The model's answers (open-ended tasks: VQA, captions, boxes), the encoder run once per example: through
    `generate` with the checkpoint's generation config (its decoder start, forced tokens, beams, no-repeat
    n-grams); a prefix expert (keys and values in the decoder's cache, which generate cannot take) and
    `sample` (each token drawn from the model's distribution by that generator) by a greedy loop of their own
    on the same start and forced tokens."""
    etype = of_peft_config(getattr(model, "active_peft_config", None))
    own_loop = sample is not None or (etype is not None and etype.decoder_cache is not None)
    markers = {t for t in (enc.tok.pad_token, enc.tok.eos_token, enc.tok.bos_token) if t}
    out = []
    for chunk in batches(exs, batch_size):
        base, states, mask, decoder_kwargs = _encode(model, enc.inputs(chunk))
        encoded = BaseModelOutput(last_hidden_state=states)
        if own_loop:
            ids = _greedy(base, enc, encoded, mask, decoder_kwargs, len(chunk), max_new_tokens, sample)
        else:
            settings = copy.deepcopy(enc.generation or base.generation_config)
            # an answer's cap, not the checkpoint's max_length (the decoder starts from one token)
            settings.max_length, settings.max_new_tokens = max_new_tokens + 1, None
            ids = base.generate(encoder_outputs=encoded, attention_mask=mask, generation_config=settings)
        # keep added special tokens such as <loc_123>; drop the sequence markers
        for row in ids[:, 1:].tolist():
            toks = [t for t in enc.tok.convert_ids_to_tokens(row) if t not in markers]
            out.append(enc.tok.convert_tokens_to_string(toks).strip())
    return out


def _greedy(
    base,
    enc: Encoder,
    encoded,
    mask,
    decoder_kwargs,
    n: int,
    max_new_tokens: int,
    sample: torch.Generator | None,
) -> torch.Tensor:
    """Greedy (or, with `sample`, sampled) decoding without a KV cache, from the checkpoint's decoder start
    and forced tokens (what generate does first)."""
    c = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    start = getattr(enc.generation, "decoder_start_token_id", None)
    start = c.decoder_start_token_id if start is None else start
    device = encoded.last_hidden_state.device
    ids = torch.tensor([[start, *enc.forced]] * n, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = max_new_tokens - len(enc.forced)  # the forced tokens are new tokens too, as generate counts them
    # the last one, where the cap is reached
    forced_eos = getattr(enc.generation, "forced_eos_token_id", None)
    for step in range(steps):
        logits = base(
            encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=ids, **decoder_kwargs(n)
        ).logits[:, -1]
        nxt = (
            logits.argmax(-1)
            if sample is None
            else torch.multinomial(logits.float().softmax(-1).cpu(), 1, generator=sample)[:, 0].to(
                logits.device
            )
        )
        if step == steps - 1 and forced_eos is not None:
            nxt = torch.full_like(nxt, forced_eos if isinstance(forced_eos, int) else forced_eos[0])
        nxt = nxt.masked_fill(done, enc.tok.pad_token_id)
        ids = torch.cat([ids, nxt[:, None]], 1)
        done |= nxt == enc.eos
        if done.all():
            break
    return ids


def _encode(model, inputs: dict):
    """(backbone, encoder states, attention mask, decoder kwargs for n rows) for any expert type.

    The decoder is called on the backbone itself (LoRA / IA3 / adapters live inside it); a prompt expert's
    soft tokens are prepended to the encoder input and a prefix expert's keys/values passed as the cache,
    which is what peft's forward does (its generate() path breaks on Florence-2)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enc_in = _encoder_inputs(model, inputs)
    peft_config = getattr(model, "active_peft_config", None)
    etype = of_peft_config(peft_config)
    if etype is not None and etype.encoder_inputs is not None:  # a prompt expert's soft tokens
        enc_in = etype.encoder_inputs(model, peft_config, enc_in)
    states = base.get_encoder()(**enc_in)[0]

    def decoder_kwargs(n: int) -> dict:  # a prefix expert's keys and values, fresh per call
        return etype.decoder_cache(model, n) if etype is not None and etype.decoder_cache else {}

    return base, states, enc_in["attention_mask"], decoder_kwargs


def _encoder_inputs(model, inputs: dict) -> dict:
    """Embed the prompt and splice in the image features, as Florence-2's forward does before its encoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    if "pixel_values" in inputs:
        feats = base.get_image_features(inputs["pixel_values"]).pooler_output.to(embeds.dtype)
        mask = base.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds, image_features=feats)
        embeds = embeds.masked_scatter(mask, feats)
    return {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}


@torch.no_grad()
def token_accuracy(model, enc: Encoder, exs: list[Example], batch_size: int = 64) -> float:
    """Teacher-forced next-token accuracy over answer tokens (for open-ended tasks such as captions)."""
    right, total = token_hits(model, enc, exs, batch_size)
    return right / max(total, 1)


def token_hits(model, enc: Encoder, exs: list[Example], batch_size: int = 64) -> tuple[int, int]:
    """(answer tokens predicted right, answer tokens), teacher-forced."""
    right, total = token_hits_each(model, enc, exs, batch_size)
    return sum(right), sum(total)


@torch.no_grad()
def token_hits_each(
    model, enc: Encoder, exs: list[Example], batch_size: int = 64
) -> tuple[list[int], list[int]]:
    """Per example: (answer tokens predicted right, answer tokens), teacher-forced."""
    right, total = [], []
    for chunk in batches(exs, batch_size):
        b = enc.batch(chunk)
        pred = model(**b).logits.argmax(-1)
        mask = b["labels"] != -100
        right += ((pred == b["labels"]) & mask).sum(-1).tolist()
        total += mask.sum(-1).tolist()
    return right, total


def task_metric(model, enc: Encoder, task, exs: list[Example], batch_size: int = 64) -> tuple[str, float]:
    """The task's headline metric: candidate accuracy where answers are closed, token accuracy for the mini
    world's open answers, or the real task's own metric (VQA accuracy, Acc@IoU>=0.5,
    CIDEr-D) on greedy answers."""
    return task_scores(model, enc, task, exs, batch_size)[:2]


def task_scores(
    model, enc: Encoder, task, exs: list[Example], batch_size: int = 64
) -> tuple[str, float, list | None]:
    """task_metric, and each example's score, whose mean is the metric (what a paired bootstrap over the
    examples resamples): a hit or a miss for accuracy and Acc@IoU, VQA accuracy, exact match, each image's
    CIDEr-D (the document frequencies from every reference of the split, as coco-caption averages its
    per-image scores), and for token accuracy, which weighs an example by its answer's length, the example's
    right tokens over the mean answer length (a bootstrap then holds the denominator fixed: the ratio's
    first-order term). Under torchrun each rank scores its share of the examples; the per-example results are
    gathered, so every rank returns the whole set's."""
    closed = task.candidates is not None or exs[0].candidates is not None
    metric = getattr(task, "metric", None) or ("accuracy" if closed else "token_accuracy")
    mine = dist.shard(exs)
    if metric == "accuracy":
        each = [float(h) for h in dist.gather(candidate_hits(model, enc, task, mine, batch_size), len(exs))]
        return metric, sum(each) / len(exs), each
    if metric == "token_accuracy":
        pairs = dist.gather(list(zip(*token_hits_each(model, enc, mine, batch_size))), len(exs))
        right, total = sum(r for r, _ in pairs), sum(t for _, t in pairs)
        return metric, right / max(total, 1), [r * len(pairs) / max(total, 1) for r, _ in pairs]
    preds = dist.gather(generate_answers(model, enc, mine, batch_size), len(exs))
    exs = exs.texts() if hasattr(exs, "texts") else exs  # the references: no image decoded again
    refs = [e.refs or (e.answer,) for e in exs]
    if metric == "cider":
        each = cider_each(preds, refs)
        return metric, sum(each) / len(each), each
    if metric == "vqa_accuracy":
        each = [vqa_accuracy(p, r) for p, r in zip(preds, refs)]
    elif metric == "acc_iou":
        each = [float(h) for h in iou_hits(preds, [e.answer for e in exs])]
    else:
        each = [exact_match(p, r) for p, r in zip(preds, refs)]
    return metric, sum(each) / len(exs), each


def exact_match(pred: str, refs) -> float:
    """1 when the answer equals one of the references, up to case, spacing and a space before punctuation."""

    def norm(text):
        return re.sub(r"\s+([?.!,;:])", r"\1", " ".join(text.lower().split()))

    return float(norm(pred) in {norm(r) for r in refs})


# ---- Real-data metrics: pure functions on strings, no model (VQA accuracy, Acc@IoU, BLEU-4, CIDEr-D) ----
# VQA accuracy as the official evaluation computes it (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/
# vqaEval.py): the answer goes through processPunctuation and processDigitArticle; the ten human answers
# through processPunctuation alone, and only where they are not all the same; then the mean over the ten
# leave-one-out subsets of min(1, matches / 3)
_VQA_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: '(?!<=' is the official pattern (a lookahead)
_VQA_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = ("a", "an", "the")
# the official map of contractions written without their apostrophe (its quirks kept: somebody'd -> somebodyd)
_VQA_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've
whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've
wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
youll=you'll youre=you're youve=you've""".split()
)


def vqa_punctuation(text: str) -> str:
    """processPunctuation: a mark glued to a word goes, one standing free becomes a space (every mark goes
    where the text has a comma between digits); then periods not beside a digit go."""
    out = text
    for p in _VQA_PUNCT:  # the test is on the original text, for every mark
        glued = p + " " in text or " " + p in text or _VQA_COMMA.search(text) is not None
        out = out.replace(p, "" if glued else " ")
    return _VQA_PERIOD.sub("", out, count=32)  # the official passes re.UNICODE (32) where sub takes its count


def vqa_digits_articles(text: str) -> str:
    """processDigitArticle: lower case, number words as digits, no articles,
    contractions given their apostrophe."""
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_normalize(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    return vqa_digits_articles(vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(pred: str, refs) -> float:
    """The official VQA accuracy of one answer against the human answers: the answer normalised
    (vqa_normalize), the human answers stripped of punctuation where they differ, and the mean over the
    leave-one-out subsets of the answers of min(1, matches / 3). One reference: min(1, matches / 3) (the
    official subsets of one are empty). An empty answer scores 0
    (OFA's rebuilt references pad the ten with "")."""
    p, refs = vqa_normalize(pred), list(refs)
    if not p or not refs:
        return 0.0
    if len(set(refs)) > 1:
        refs = [vqa_punctuation(r) for r in refs]
    n, m = len(refs), sum(r == p for r in refs)
    if n == 1:
        return min(m / 3, 1.0)
    # leaving out one of the m matching answers leaves m - 1 matches; leaving out any other leaves m
    return (m * min((m - 1) / 3, 1.0) + (n - m) * min(m / 3, 1.0)) / n


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def acc_at_iou(pred_texts, gold_texts, threshold: float = 0.5) -> float:
    """Fraction of predictions whose location-token box has IoU >= threshold with the gold one
    (unparseable = miss)."""
    return sum(iou_hits(pred_texts, gold_texts, threshold)) / max(len(gold_texts), 1)


def iou_hits(pred_texts, gold_texts, threshold: float = 0.5) -> list[bool]:
    """Per prediction: does its location-token box have IoU >= threshold with the gold one
    (unparseable: no)?"""
    boxes = [(tokens_to_box(p), tokens_to_box(g)) for p, g in zip(pred_texts, gold_texts, strict=True)]
    return [p is not None and g is not None and box_iou(p, g) >= threshold for p, g in boxes]


def caption_tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation: a stand-in for coco-caption's PTB tokenizer (Java)."""
    return PUNCTUATION.sub(" ", text.lower()).split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu4(preds, refs_lists) -> float:
    """Corpus BLEU-4 as coco-caption computes it: clipped n-gram precisions,
    closest-reference brevity penalty."""
    correct, guess, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for pred, refs in zip(preds, refs_lists, strict=True):
        h, rs = caption_tokens(pred), [caption_tokens(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]  # closest length, the shorter on ties
        for n in range(1, 5):
            most = Counter()
            for r in rs:
                most |= _ngrams(r, n)  # an n-gram counts at most as often as in any one reference
            correct[n - 1] += sum(min(c, most[g]) for g, c in _ngrams(h, n).items())
            guess[n - 1] += max(len(h) - n + 1, 0)
    tiny, small = 1e-15, 1e-9  # coco-caption's guards against empty counts
    log_p = sum(math.log((c + tiny) / (g + small)) for c, g in zip(correct, guess)) / 4
    ratio = (hyp_len + tiny) / (ref_len + small)
    return math.exp(log_p) * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


def cider(preds, refs_lists, sigma: float = 6.0) -> float:
    """CIDEr-D as coco-caption: tf-idf n-grams (n=1..4, df from the references), clipping,
    length penalty, x10."""
    scores = cider_each(preds, refs_lists, sigma)
    return sum(scores) / len(scores) if scores else 0.0


def cider_each(preds, refs_lists, sigma: float = 6.0) -> list[float]:
    """Each image's CIDEr-D (the document frequencies from every image's references): cider is their mean."""
    hyps = [caption_tokens(p) for p in preds]
    refs = [[caption_tokens(r) for r in rs] for rs in refs_lists]
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} predictions for {len(refs)} reference sets")
    df = Counter()  # in how many images' references each n-gram occurs
    for rs in refs:
        df.update({g for r in rs for n in range(1, 5) for g in _ngrams(r, n)})
    log_docs = math.log(len(refs))

    def vectors(words):
        out = []
        for n in range(1, 5):
            v = {g: c * (log_docs - math.log(max(1.0, df[g]))) for g, c in _ngrams(words, n).items()}
            out.append((v, math.sqrt(sum(x * x for x in v.values()))))
        return out

    scores = []
    for h, rs in zip(hyps, refs):
        hv, total = vectors(h), 0.0
        for r in rs:
            # coco-caption's length is the bigram count: the same difference whenever both have a word
            penalty = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma**2))
            for (vh, nh), (vr, nr) in zip(hv, vectors(r)):
                dot = sum(min(x, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, x in vh.items())  # clipped tf-idf
                total += (dot / (nh * nr) if nh and nr else dot) * penalty
        scores.append(10.0 * total / 4 / len(rs))
    return scores
