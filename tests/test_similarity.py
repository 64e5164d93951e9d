"""Task similarity: the formula of PI_TUNING.md, symmetric, 1 on the diagonal; top-k retrieval."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.methods import top_k_similar
from common.similarity import (
    expert_update,
    normalized,
    similarity_matrix,
    task_similarity,
    update_similarity,
)


def direct(fa, fb, eps=1e-6):
    """The formula written out element by element, in plain Python."""
    sims = []
    for n in fa:
        a, b = fa[n].flatten().tolist(), fb[n].flatten().tolist()
        ap = [x / (x + y + eps) for x, y in zip(a, b)]
        bp = [y / (x + y + eps) for x, y in zip(a, b)]
        dot = sum(x * y for x, y in zip(ap, bp))
        sims.append(dot / math.sqrt(sum(x * x for x in ap) * sum(y * y for y in bp)))
    return sum(sims) / len(sims)


def fishers(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"a.lora_A": torch.rand(4, 6, generator=g) ** 3, "a.lora_B": torch.rand(6, 4, generator=g) ** 3}
        for _ in range(n)
    ]


def test_similarity_matches_the_formula_and_is_symmetric():
    fs = fishers(4)
    m = similarity_matrix(fs)
    for i in range(4):
        assert m[i][i] == 1.0
        for j in range(4):
            assert abs(m[i][j] - m[j][i]) < 1e-12
            if i != j:
                assert abs(m[i][j] - direct(fs[i], fs[j])) < 1e-9
    assert abs(task_similarity(fs[0], fs[0]) - 1.0) < 1e-9


def test_similarity_is_bitwise_the_same_whatever_order_the_tensors_come_in():
    """A Fisher computed now lists its tensors in module order, one read back from the cache sorted: the
    similarity must not depend on which (two runs of one study differed in the last bit)."""
    g = torch.Generator().manual_seed(1)
    names = [f"layer{i}.lora_{ab}" for i in range(50) for ab in "BA"]
    fa, fb = ({n: torch.rand(8, generator=g) ** 3 for n in names} for _ in range(2))
    backwards = {n: fb[n] for n in reversed(names)}
    assert task_similarity(fa, fb) == task_similarity(dict(sorted(fa.items())), backwards)
    assert similarity_matrix([fa, fb])[0][1] == similarity_matrix([fa, backwards])[1][0]


def test_normalisation_makes_similarity_independent_of_fisher_scale():
    fs = fishers(2)
    tiny = [{k: v * 1e-10 for k, v in f.items()} for f in fs]
    # raw values this small fall under the epsilon: the formula degrades to the plain cosine of Fa, Fb
    plain = sum(
        torch.nn.functional.cosine_similarity(fs[0][k].flatten(), fs[1][k].flatten(), dim=0).item()
        for k in fs[0]
    ) / len(fs[0])
    assert abs(task_similarity(*tiny) - plain) < 1e-3
    assert abs(task_similarity(*tiny) - direct(*fs)) > 0.05
    # normalised per tensor, the scale no longer matters and the formula means what it says
    assert (
        abs(
            task_similarity(*[normalized(f, "mean") for f in tiny])
            - direct(*[normalized(f, "mean") for f in fs])
        )
        < 1e-6
    )


def test_top_k_excludes_the_target_and_orders_by_similarity():
    names = ["t", "a", "b", "c"]
    m = [[1, 0.2, 0.9, 0.5], [0.2, 1, 0, 0], [0.9, 0, 1, 0], [0.5, 0, 0, 1]]
    assert top_k_similar(names, m[0], 2) == ["b", "c"]


def test_weight_embedding_compares_what_lora_experts_changed_not_their_factors():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g)
    # the same update BA, factored differently
    R = torch.diag(torch.tensor([2.0, 0.5, 3.0, 1.0]))[[1, 2, 3, 0]]
    e1 = {"q.lora_A.weight": A, "q.lora_B.weight": B}
    e2 = {"q.lora_A.weight": torch.linalg.solve(R, A), "q.lora_B.weight": B @ R}
    e3 = {"q.lora_A.weight": A, "q.lora_B.weight": -B}
    u1, u2, u3 = (expert_update(e, "lora") for e in (e1, e2, e3))
    assert torch.allclose(u1["q"], B @ A)
    assert abs(update_similarity(u1, u2) - 1) < 1e-6  # A and B compared apart would say otherwise
    assert F.cosine_similarity(A.flatten(), e2["q.lora_A.weight"].flatten(), dim=0) < 0.5
    assert abs(update_similarity(u1, u3) + 1) < 1e-6


def test_lora_update_cosine_from_the_factors_equals_the_dense_one():
    """<B1 A1, B2 A2> by r x r work, the d x d products never formed: the same cosine as on the products."""
    from common.similarity import LowRank

    g = torch.Generator().manual_seed(0)
    experts = [
        {s: (torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g)) for s in ("q", "v")}
        for _ in range(3)
    ]
    factored = [{s: LowRank(b, a) for s, (b, a) in e.items()} for e in experts]
    dense = [{s: b @ a for s, (b, a) in e.items()} for e in experts]
    for i in range(3):
        for j in range(3):
            assert update_similarity(factored[i], factored[j]) == pytest.approx(
                update_similarity(dense[i], dense[j]), abs=1e-6
            )
    zero = {s: LowRank(torch.zeros(64, 4), a) for s, (_, a) in experts[0].items()}  # an expert still at B = 0
    assert update_similarity(zero, factored[1]) == 0.0


def test_weight_embedding_of_ia3_and_prefix_experts():
    a = {"k.ia3_l": torch.tensor([1.5, 1.0, 1.0]), "v.ia3_l": torch.tensor([1.0, 2.0, 1.0])}
    b = {"k.ia3_l": torch.tensor([3.0, 1.0, 1.0]), "v.ia3_l": torch.tensor([1.0, 1.0, 0.0])}
    ua, ub = expert_update(a, "ia3"), expert_update(b, "ia3")
    assert ua["k"].tolist() == [0.5, 0.0, 0.0]  # the change from the scale IA3 starts at
    assert abs(update_similarity(ua, ub) - 0.5) < 1e-9  # k: same direction (1), v: orthogonal (0)
    table = torch.arange(24.0).view(2, 12)  # 2 tokens, 3 decoder layers of 4 values each
    u = expert_update({"prompt_embeddings": table}, "prefix", layers=3)
    assert list(u) == ["layer0", "layer1", "layer2"] and u["layer1"].tolist() == [10.0, 11.0, 12.0, 13.0]


def test_every_embedding_named_is_computed():
    """common/embeddings.py names the embeddings (what config accepts), common/similarity.py computes them:
    one entry each, in the same order."""
    from common.embeddings import EMBEDDINGS
    from common.similarity import COMPUTE

    assert list(COMPUTE) == list(EMBEDDINGS)


def test_make_report_computes_every_embedding_but_those_asked_for_and_make_study_every_one(capsys):
    """The rules make runs come from the registry (common.provenance --rules): make report's alternatives are
    its variants but the three asked for by name, make study's (EMBED_AS=all) every one."""
    from common.embeddings import ASKED_FOR, variants
    from common.provenance import main

    def embedded(*asked):
        main(["configs/micro.yaml", "--rules", "snli-ve", "0", "--study", "report", "--transfer-row", *asked])
        line = next(r for r in capsys.readouterr().out.split("%%NL%%") if "--embedding" in r)
        return line.split("--embedding ")[1].split()[0].split(",")

    assert embedded() == [v for v in variants() if v not in ASKED_FOR]
    assert embedded("--embed-as", "all") == list(variants())


def test_prototype_is_the_top_singular_direction_of_the_update_without_forming_it():
    from common.similarity import prototype_similarity, top_direction

    torch.manual_seed(0)
    b, a = torch.randn(48, 4), torch.randn(4, 32)
    v = top_direction(b, a)
    dense = torch.linalg.svd((b @ a).double())[2][0]
    assert v.shape == (32,) and abs(float(v @ dense)) == pytest.approx(1.0, abs=1e-9)
    # the same expert rescaled or with its sign flipped has the same prototype; another one does not
    same = {"s": top_direction(-3 * b, a)}
    other = {"s": top_direction(torch.randn(48, 4), torch.randn(4, 32))}
    assert prototype_similarity({"s": v}, same) == pytest.approx(1.0)
    assert prototype_similarity({"s": v}, other) < 0.9


def test_prototypes_are_computed_once_per_expert_file(micro, tmp_path, monkeypatch):
    """Each expert's prototypes are cached by the hash of its weights: read back while the file is the same,
    computed again once it changes (or the cache is cut short)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from common import similarity
    from common.config import load_config
    from conftest import REPO

    cfg = load_config(str(REPO / "configs/micro.yaml"), [f"runs_dir={tmp_path}"])
    nli = similarity.expert_dir(cfg, "nli")  # the artifact's own folder, name@digest
    shutil.copytree(micro[1] / "experts" / nli.name, nli)
    real, calls = similarity.prototypes, []

    def counted(embedding):
        calls.append(1)
        return real(embedding)

    monkeypatch.setattr(similarity, "prototypes", counted)
    first = similarity.prototype_embedding(cfg, "nli")
    again = similarity.prototype_embedding(cfg, "nli")
    assert (
        len(calls) == 1
        and again.keys() == first.keys()
        and all(torch.equal(again[k], first[k]) for k in first)
    )
    weights = nli / similarity.WEIGHTS
    tensors = load_file(str(weights))
    name = next(k for k in tensors if "lora_A" in k)
    tensors[name] = torch.randn_like(tensors[name])
    save_file(tensors, str(weights))
    changed = similarity.prototype_embedding(cfg, "nli")
    assert len(calls) == 2 and not all(torch.equal(changed[k], first[k]) for k in first)
    cache = tmp_path / "micro" / "embeddings" / f"{nli.name}.prototypes.safetensors"
    cache.write_bytes(cache.read_bytes()[:100])  # cut short: computed again, no error
    similarity.prototype_embedding(cfg, "nli")
    assert len(calls) == 3
