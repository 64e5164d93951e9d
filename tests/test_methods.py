"""The methods the tables compare (common/methods.py): one object each, read by the stages, provenance, make
and the report; a new baseline is one Method, added here in the test alone."""

import ast
import json
from pathlib import Path

import pytest

from conftest import inproc, stage

NAME = "snli-ve-8shot-s0"
ROOT = Path(__file__).resolve().parent.parent
# the code that runs the methods: the stages, provenance (make's rules) and the report (config.py names
# interpolate.retrieval's values, fixed and select: a setting of π-Tuning, not a method)
DISPATCHERS = ["train_expert.py", "embed_tasks.py", "interpolate.py", "evaluate.py"] + [
    f"common/{m}.py"
    for m in ("provenance", "report", "experts", "similarity", "metrics", "merge", "data", "stage", "checks")
]


def test_a_new_baseline_is_one_method_in_the_registry(micro_copy, monkeypatch):
    """A baseline added to METHODS alone (here: π-Tuning with the k least similar experts) is an
    interpolate.py --variant, an artifact of its own made from the similarity it picks by, a row of the
    results table scored on test and, being on_val, on validation, and a plan of make report's study."""
    from common import methods
    from common.config import load_config
    from common.methods import METHODS, Method, top_k_similar
    from common.provenance import _pipeline, made_from

    def least(cfg, run, variant, pool, read):  # the k least similar pool experts
        sim, _ = read(("similarity", run))
        flipped = [-x for x in sim["row"]]
        return top_k_similar(sim["names"], flipped, cfg.interpolate.top_k), "the least similar"

    m = Method(
        "pi-least",
        "π-Tuning with the k least similar experts",
        "interpolate.py --variant least",
        on_val=True,
        variant="least",
        pick=least,
        studies=("report",),
    )
    monkeypatch.setitem(METHODS, m.name, m)
    runs = micro_copy[0]
    args = ("--target", "snli-ve", "--config", "configs/micro.yaml", f"runs_dir={runs}")
    out = inproc("interpolate.py", *args, "--variant", "least").stdout
    assert "(lora, the least similar)" in out
    cfg = load_config("configs/micro.yaml", [f"runs_dir={runs}"])
    made = next((cfg.run_dir / "interpolated").glob(f"{NAME}.least@*"))
    meta = json.loads((made / "meta.json").read_text())
    sim = json.loads((cfg.run_dir / f"similarity/{NAME}.json").read_text())
    assert meta["experts"][1:] == sorted(sim["names"][1:], key=lambda n: sim["row"][sim["names"].index(n)])
    inputs = made_from(cfg, "interpolated", NAME, "least")["inputs"]
    assert [(i["kind"], i["name"], i["variant"]) for i in inputs] == [("similarity", NAME, "")]

    inproc("evaluate.py", *args)
    result = json.loads(next((cfg.run_dir / "results").glob(f"{NAME}@*.json")).read_text())
    assert "pi-least" in result["scores"] and "pi-least" in result["val_scores"]
    table = (cfg.run_dir / "results" / "snli-ve.md").read_text()
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")]
    assert rows.index("pi-least") > rows.index("pi-tuning")  # after the listed methods, in its place

    rules, _ = _pipeline(cfg, "snli-ve", 0, "report", False, [])
    assert any("--variant pi,random,frozen,least" in r for r in rules)  # one process, one backbone load
    assert "least" in methods.interpolations()
    monkeypatch.delitem(METHODS, m.name)
    code, _, err = stage("interpolate.py", *args, "--variant", "least")
    assert code == 2 and "--variant 'least': use pi, random, frozen, paper, select, oracle" in err


def _literals(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module's code that it compares, uses as keys or passes as an argument
    (docstrings, help texts and messages left out: not f-strings or constants inside them)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
        elif isinstance(node, ast.Subscript):
            parts = [node.slice]
        elif isinstance(node, (ast.Tuple, ast.Set, ast.List)) and isinstance(
            getattr(node, "ctx", None), ast.Load
        ):
            parts = list(node.elts)
        elif isinstance(node, ast.Dict):
            parts = [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Call):  # f(x, "random"), name.startswith("pi-random")
            parts = [*node.args, *(k.value for k in node.keywords)]
            parts = [p for p in parts if isinstance(p, ast.Constant)]
        else:
            continue
        for p in parts:
            for c in ast.walk(p):
                if isinstance(c, ast.Constant) and isinstance(c.value, str):
                    found.append((c.lineno, c.value))
    return found


@pytest.mark.parametrize("module", DISPATCHERS)
def test_no_stage_provenance_or_report_dispatches_on_a_methods_or_an_expert_types_name(module):
    """Which methods and expert types exist and what each does is their registries' (common/methods.py,
    common/expert_types.py): the code that runs them compares no string with a method's name, variant or
    trained baseline, or an expert type's name (as in `if name == "random"`, `if method == "prefix"`)."""
    from common.expert_types import EXPERT_TYPES
    from common.methods import METHODS

    names = {m.name for m in METHODS.values()} | set(EXPERT_TYPES)
    names |= {m.variant for m in METHODS.values() if m.variant} | {
        m.trained for m in METHODS.values() if m.trained
    }
    hits = [f"{module}:{line}: {v!r}" for line, v in _literals(ROOT / module) if v in names]
    assert not hits, hits


def test_each_method_says_how_it_is_made_and_loaded():
    """Every method is made by a stage and loaded by evaluate.py in one of its ways; an interpolation picks
    its experts or is chosen on validation; every --variant names its method and row."""
    from common.config import load_config
    from common.methods import METHODS, PAIR, by_variant, interpolations, row_name

    cfg = load_config("configs/micro.yaml")
    for m in METHODS.values():
        assert m.loads in ("base", "expert", "full", "uniform", "peft-linear", "peft-ties"), m.name
        assert m.variant is not None or m.trained is not None or m.loads != "expert", (
            f"{m.name}: made by none"
        )
        assert m.variant is None or m.pick is not None or m.chosen(cfg), f"{m.name}: picks no experts"
    for v in interpolations():
        assert by_variant(v).variant == v and row_name(v) == by_variant(v).name
    assert by_variant("pair-nli") is PAIR and row_name("pair-nli") == "pair-nli"
