"""Task embeddings (diagonal Fisher of an expert's own parameters) and the similarity between tasks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.data import Encoder, Example, batches
from common.metrics import answer_logprobs

EPS = 1e-6


def fisher_diagonal(model, enc: Encoder, exs: list[Example], estimator: str = "per_sample",
                    batch_size: int = 16, desc: str = "fisher") -> dict[str, torch.Tensor]:
    """E[(d log p(y|x) / d phi)^2] over exs for every trainable tensor phi, at the current weights.

    per_sample: the squared gradient of each example's log-likelihood (the diagonal empirical Fisher).
    batch: the squared gradient of each mini-batch's summed log-likelihood, divided by the number of
    examples (what the original code computed). No optimizer step is ever taken; fp32 accumulation."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    step = 1 if estimator == "per_sample" else batch_size
    for chunk in tqdm(list(batches(exs, step)), desc=desc, leave=False, dynamic_ncols=True, disable=None):
        logp = answer_logprobs(model, enc, chunk, [e.answer for e in chunk]).sum()
        grads = torch.autograd.grad(logp, list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            fisher[n] += g.float() ** 2
    return {n: f / len(exs) for n, f in fisher.items()}


def normalized(fisher: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """Scale each tensor to mean 1: raw values (~1e-8..1e-13 here) would drown in the 1e-6 epsilon."""
    if mode == "none":
        return fisher
    return {n: f / f.mean().clamp_min(1e-30) for n, f in fisher.items()}


def task_similarity(fa: dict[str, torch.Tensor], fb: dict[str, torch.Tensor]) -> float:
    """Symmetric normalised cosine per tensor: a'=Fa/(Fa+Fb+eps), b'=Fb/(Fa+Fb+eps), s=cos(a',b'); mean over tensors."""
    if fa.keys() != fb.keys():
        raise ValueError("experts have different tensors; embed experts of one type and one backbone")
    sims = []
    for n in fa:
        a, b = fa[n].flatten().double(), fb[n].flatten().double()
        denom = a + b + EPS
        sims.append(F.cosine_similarity(a / denom, b / denom, dim=0).item())
    return sum(sims) / len(sims)


def similarity_matrix(fishers: list[dict[str, torch.Tensor]]) -> list[list[float]]:
    n = len(fishers)
    m = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            m[i][j] = m[j][i] = task_similarity(fishers[i], fishers[j])
    return m


def top_k_similar(names: list[str], matrix: list[list[float]], target: str, k: int) -> list[str]:
    """The k tasks most similar to the target (itself excluded), best first."""
    i = names.index(target)
    order = sorted((j for j in range(len(names)) if j != i), key=lambda j: -matrix[i][j])
    return [names[j] for j in order[:k]]
