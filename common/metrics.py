"""Scoring: accuracy by candidate answers (sum of answer-token log-probs, argmax), token accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from common.data import Encoder, Example, Task, batches, candidates_for


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the answer's tokens of log p(token); label -100 marks padding."""
    logp = F.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * (labels != -100)).sum(-1)


def answer_logprobs(model, enc: Encoder, exs: list[Example], answers: list[str]) -> torch.Tensor:
    """Sum of log p(answer tokens + </s> | image, prompt) for each (example, answer) pair."""
    labels = enc.labels(answers)
    return sequence_logprob(model(**enc.inputs(exs), labels=labels).logits, labels)


@torch.no_grad()
def candidate_accuracy(model, enc: Encoder, task: Task, exs: list[Example], batch_size: int = 64) -> float:
    """Fraction of examples whose best-scoring candidate answer is the right one."""
    correct = 0
    for chunk in batches(exs, max(1, batch_size // len(candidates_for(task, exs[0])))):
        pairs = [(e, c) for e in chunk for c in candidates_for(task, e)]
        # the encoder runs once per example; the candidates share its output
        inputs = enc.inputs(chunk)
        enc_out = model.get_encoder()(**_encoder_inputs(model, inputs))
        index = torch.tensor([i for i, e in enumerate(chunk) for _ in candidates_for(task, e)])
        labels = enc.labels([c for _, c in pairs])
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc_out[0][index]), attention_mask=inputs["attention_mask"][index],
                       labels=labels).logits
        scores = sequence_logprob(logits, labels).tolist()
        k = 0
        for e in chunk:
            cands = candidates_for(task, e)
            best = max(range(len(cands)), key=lambda j: scores[k + j])
            correct += cands[best] == e.answer
            k += len(cands)
    return correct / len(exs)


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
    right = total = 0
    for chunk in batches(exs, batch_size):
        b = enc.batch(chunk)
        pred = model(**b).logits.argmax(-1)
        mask = b["labels"] != -100
        right += ((pred == b["labels"]) & mask).sum().item()
        total += mask.sum().item()
    return right / max(total, 1)


def task_metric(model, enc: Encoder, task: Task, exs: list[Example], batch_size: int = 64) -> tuple[str, float]:
    """The task's headline metric: candidate accuracy where answers are closed, else token accuracy."""
    if task.candidates is not None or exs[0].candidates is not None:
        return "accuracy", candidate_accuracy(model, enc, task, exs, batch_size)
    return "token_accuracy", token_accuracy(model, enc, exs, batch_size)
