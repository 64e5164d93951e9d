"""The study report of one target: accuracy per method over shots and seeds, win counts, retrieval quality
(Spearman between predicted similarity and measured transfer) and plots, from the results on disk."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import glob
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from common.artifacts import write_json, write_text
from common.config import load_config, split_overrides
from common.embeddings import EMBEDDINGS, described, heading, settings_of, variants
from common.errors import UserError
from common.methods import (
    METHODS,
    PI,
    RANDOM_K,
    SELECT,
    TARGET_ONLY,
    ZERO_SHOT,
    ordered,
    ranked_otherwise,
    select_from,
)
from common.provenance import artifact, config_id, differs, link, readable

# imported where used, kept off `python -m common.report --tables` (0.2 s; make all's last step), which draws
# nothing: common.similarity (torch, the experts: +2.9 s) and matplotlib (+0.4 s;
# the Agg backend chosen before pyplot)


FAMILY_COLOURS = {"vision-language": "tab:purple", "vision": "tab:blue", "language": "tab:green"}


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (average ranks for ties); nan when either side is constant."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    if not sx or not sy:
        return math.nan
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)


def mean_sd(vals: list[float], signed: bool = False) -> str:
    """'mean ± std' over seeds, or the value alone from one seed (which has no spread); signed: a gain, a
    transfer or a correlation, with its sign either way."""
    if not vals:
        return "-"
    mean = f"{statistics.mean(vals):{'+' if signed else ''}.3f}"
    return f"{mean} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else mean


def shots_label(s: int) -> str:
    return f"{s}-shot" if s else "full data"


def seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


def scores_of(result: dict) -> dict:
    """method -> its score in the result's metric (results files before 2026-12 kept them as "accuracy",
    whatever the metric)."""
    return result["scores"] if "scores" in result else result["accuracy"]


def pack(scores: list[float]) -> str | list[float]:
    """Per-example scores as a results file keeps them: a string of 0s and 1s where each is a hit or a miss
    (accuracy: 4,000 examples in 4 KB), else the numbers rounded to 1e-4."""
    if all(s in (0.0, 1.0) for s in scores):
        return "".join("1" if s else "0" for s in scores)
    return [round(s, 4) for s in scores]


def unpack(stored: str | list) -> list[float]:
    return [float(c) for c in stored] if isinstance(stored, str) else [float(s) for s in stored]


def paired_ci(
    runs: list[dict], a: str, b: str, split: str = "test", draws: int = 2000, level: float = 0.95
) -> tuple[float, float] | None:
    """The confidence interval of the mean paired gain a - b over runs (seeds): hierarchical_interval on each
    example's difference, seeds x examples (every seed scores the same test examples). None with fewer than
    two seeds (one seed's variance is unknown), where a run lacks either method's per-example scores (results
    made before they were kept for token accuracy and CIDEr), or where the runs scored different numbers of
    examples. Seeded: the same results give the same interval."""
    diffs = []
    for r in runs:
        each = r.get("per_example", {}).get(split, {})
        if a not in each or b not in each:
            return None
        diffs.append(np.asarray(unpack(each[a])) - np.asarray(unpack(each[b])))
    if len(diffs) < 2 or len({len(d) for d in diffs}) > 1:
        return None
    return hierarchical_interval(np.stack(diffs), draws, level)


def hierarchical_interval(d, draws: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A hierarchical paired bootstrap interval of the mean of d (seeds x examples of paired differences), for
    a design where every seed scores the same examples:
    the central `level` quantiles of hierarchical_draws."""
    q = (1 + level) / 2
    lo, hi = np.quantile(hierarchical_draws(d, draws, level, seed), [1 - q, q])
    return float(lo), float(hi)


def hierarchical_draws(d, draws: int = 2000, level: float = 0.95, seed: int = 0):
    """The bootstrap draws of the mean of d (seeds x examples): each draw resamples ONE set of example
    indices, shared by every seed (and both methods: d is their difference), and resamples the seeds. It
    covers new seeds and new examples from the same distributions. d = mean + seed effect + example
    effect + interaction; resampling both ways counts the interaction three times (Owen 2007, the pigeonhole
    bootstrap), so the seed and example effects are shrunk by their estimated share of it, and a few seeds'
    spread is itself uncertain, so the seed effects are scaled by sqrt(S / (S - 1)) * t(S - 1) / z.
    tests/test_report.py checks the coverage on simulated studies."""
    n_seeds, n = d.shape
    mean = float(d.mean())
    seed_eff, ex_eff = d.mean(1) - mean, d.mean(0) - mean
    inter = d - mean - seed_eff[:, None] - ex_eff[None, :]
    v_inter = float((inter**2).sum()) / max((n_seeds - 1) * (n - 1), 1)
    v_seed, v_ex = float(seed_eff @ seed_eff) / (n_seeds - 1), float(ex_eff @ ex_eff) / max(n - 1, 1)

    def shrink(v, per):  # the effect's variance without the interaction's share of it
        return math.sqrt(max(0.0, 1 - v_inter / (per * v))) if v > 0 else 0.0

    k_seed = shrink(v_seed, n) * small_sample(n_seeds, level)
    k_ex = shrink(v_ex, n_seeds)
    rng = np.random.default_rng(seed)
    stat = np.empty(draws)
    chunk = max(1, (1 << 22) // n)  # draws at a time: a chunk's example weights stay within 32 MB
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        picks = rng.integers(0, n, (m, n)) + np.arange(m)[:, None] * n
        w = np.bincount(picks.ravel(), minlength=m * n).reshape(m, n) / n  # each draw's examples, as weights
        seeds = rng.integers(0, n_seeds, (m, n_seeds))
        stat[start : start + m] = (
            mean
            + k_seed * seed_eff[seeds].mean(1)
            + k_ex * (w @ ex_eff)
            + np.take_along_axis(w @ inter.T, seeds, 1).mean(1)
        )
    return stat


def small_sample(count: int, level: float = 0.95) -> float:
    """How much to widen the resampled spread of `count` units (seeds, targets) so that the bootstrap's
    quantiles are Student's: sqrt(n / (n - 1)) * t(n - 1) / z."""
    q = (1 + level) / 2
    return math.sqrt(count / (count - 1)) * t_quantile(q, count - 1) / t_quantile(q)


def across_interval(ds: list, draws: int = 2000, level: float = 0.95) -> tuple[float, float] | None:
    """The interval of the mean gain across targets (each a seeds x examples array of paired differences):
    each draw resamples the targets and, within each, takes one hierarchical draw; the targets' spread widened
    for their number (small_sample). It covers new targets from the pool's distribution, new seeds and new
    examples. None with fewer than two targets."""
    if len(ds) < 2:
        return None
    per = np.stack([hierarchical_draws(d, draws, level, seed=i) for i, d in enumerate(ds)])  # targets x draws
    centre = per.mean(0)
    picked = np.random.default_rng(len(ds)).integers(0, len(ds), (draws, len(ds)))
    stat = centre + small_sample(len(ds), level) * (per[picked, np.arange(draws)[:, None]].mean(1) - centre)
    q = (1 + level) / 2
    lo, hi = np.quantile(stat, [1 - q, q])
    return float(lo), float(hi)


@functools.lru_cache
def t_quantile(p: float, df: float = math.inf) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom (inf: the normal), by bisection on
    its CDF, integrated by Simpson's rule (no scipy in the environment)."""
    if math.isinf(df):
        pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    else:
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731

    def cdf(x, steps=2000):  # 0.5 + the integral of the pdf from 0 to x
        h = x / steps
        inner = sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
        return 0.5 + h / 3 * (pdf(0) + inner + pdf(x))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


INTERVAL = (
    "The 95% interval is a hierarchical paired bootstrap (common/report.py paired_ci): each draw resamples "
    "one set of test examples shared by every seed and both methods, and the seeds; it covers new seeds and "
    "new test examples. Verdict: win or loss where the interval excludes 0, tie where it holds it; one seed "
    "gives no interval."
)


def verdict(ci: tuple[float, float] | None) -> str:
    """win / loss where the interval excludes 0, tie where it holds it; '-' without an interval."""
    if ci is None:
        return "-"
    return "win" if ci[0] > 0 else "loss" if ci[1] < 0 else "tie"


def _results(cfg, target: str) -> list[dict]:
    """Every result of this target on disk (results/<target>-<shots>-s<seed>@<digest>.json), any config."""
    pattern = re.compile(rf"{re.escape(target)}-(\d+shot|full)-s\d+@[0-9a-f]+\.json$")
    out = []
    for p in sorted((cfg.run_dir / "results").glob(f"{glob.escape(target)}-*@*.json")):
        if pattern.match(p.name) and not p.is_symlink():
            r = json.loads(p.read_text())
            r["scores"] = scores_of(r)
            out.append(r)
    return out


def load_results(cfg, target: str) -> list[dict]:
    """The target's results on disk made under this config (any shots and seed: one config_id)."""
    return results_by_config(cfg, target).get(config_id(cfg), [])


def results_by_config(cfg, target: str) -> dict[str, list[dict]]:
    """config_id -> the target's results on disk made under it, this config's first."""
    groups: dict[str, list[dict]] = {}
    for r in _results(cfg, target):
        groups.setdefault(r.get("config_id", "?"), []).append(r)
    mine = config_id(cfg)
    return dict(sorted(groups.items(), key=lambda kv: kv[0] != mine))


def config_label(profile: str, config: dict) -> str:
    """A config named by the profile and the fields of it that differ from the profile's
    file (its overrides)."""
    changed = differs(config, profile)
    return f"{profile} with {' '.join(changed)}" if changed else f"{profile} as written"


def table(target: str, metric: str, runs: list[dict]) -> str:
    """Markdown: one row per method, mean ± std over the seeds evaluated (one seed: its value), per shots
    setting."""
    by_shots: dict[int, list[dict]] = {}
    for r in runs:
        by_shots.setdefault(r["shots"], []).append(r)
    lines = [
        f"| {target} (test {metric}) | "
        + " | ".join(f"{shots_label(s)} ({seeds(len(rs))})" for s, rs in sorted(by_shots.items()))
        + " |",
        "|---" * (1 + len(by_shots)) + "|",
    ]
    for m in ordered(runs):
        cells = [
            mean_sd([r["scores"][m] for r in rs if m in r["scores"]]) for _, rs in sorted(by_shots.items())
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tables(cfg, target: str) -> str:
    """Every config's table of this target's results on disk, this config's first, each headed by the fields
    that differ from the profile (what makes it)."""
    out = []
    for cid, runs in results_by_config(cfg, target).items():
        mine = " (this config)" if cid == config_id(cfg) else ""
        out += [
            f"## {config_label(cfg.path, runs[0]['config'])}{mine}",
            "",
            table(target, runs[0]["metric"], runs),
        ]
        other = dict(sorted({e: b for r in runs for e, b in r.get("ranked_by", {}).items()}.items()))
        if other:  # imported experts the configured embedding could not take (similarity.ranked_by)
            out += [
                "π-Tuning's experts ranked by another embedding than embed.embedding (imported without data, "
                "or of another recipe): " + ", ".join(f"{e} by `{b}`" for e, b in other.items()),
                "",
            ]
    return "\n".join(out)


def write_tables(cfg, target: str) -> Path:
    """results/<target>@<config_id>.md (tables, this config's first) and .json (this config's results), from
    the results on disk; results/<target>.md links to the last written."""
    res_dir, cid = cfg.run_dir / "results", config_id(cfg)
    res_dir.mkdir(parents=True, exist_ok=True)
    with open(res_dir / f".{target}.lock", "w") as lock:  # make report evaluates two runs at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_json(
            res_dir / f"{target}@{cid}.json", {"runs": {r["run"]: r for r in load_results(cfg, target)}}
        )
        write_text(res_dir / f"{target}@{cid}.md", tables(cfg, target))
        link(res_dir / f"{target}@{cid}.json"), link(res_dir / f"{target}@{cid}.md")
    return res_dir / f"{target}@{cid}.md"


def _against(runs: list[dict], base: str, method: str = PI.name) -> str:
    """'wins | mean gain ± std | 95% interval | verdict' of `method` over `base` on test, over the runs
    holding both; the verdict (win / tie / loss) is the interval's (paired_ci)."""
    both = [r for r in runs if base in r["scores"] and method in r["scores"]]
    if not both:
        return ""
    gains = [r["scores"][method] - r["scores"][base] for r in both]
    ci = paired_ci(both, method, base)
    interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"
    return (
        f"{sum(g > 0 for g in gains)}/{len(gains)} | {mean_sd(gains, signed=True)} | "
        f"{interval} | {verdict(ci)}"
    )


def _rhos(sims: dict, runs: list[dict], key: str) -> list[float]:
    """Spearman(similarity, transfer) of each run with both (key: transfer | val_transfer)."""
    out = []
    for r in runs:
        sim = sims.get(r["run"])
        if r.get(key) and sim is not None:
            names = sorted(n for n in r[key] if n in sim)  # (not those another embedding ranked)
            out.append(spearman([sim[n] for n in names], [r[key][n] for n in names]))
    return out


def _precision(sims: dict, runs: list[dict], k: int) -> list[float]:
    """Per run: the share of the embedding's top-k pool experts among the k of largest test transfer (the
    oracle's)."""
    out = []
    for r in runs:
        sim = sims.get(r["run"])
        if r.get("transfer") and sim is not None:
            ranked = [n for n in r["transfer"] if n in sim]  # (not those another embedding ranked)
            best = set(sorted(ranked, key=lambda n: -r["transfer"][n])[:k])
            out.append(len(best & set(sorted(ranked, key=lambda n: -sim[n])[:k])) / k)
    return out


def transfer_row(runs: list[dict]) -> str:
    """One target's transfer row on test as a study.md table row: target-only's seed-to-seed std, the control,
    the best and worst pool expert (mean ± std over seeds), their spread against target-only's std, and the
    experts that measurably hurt (mean transfer below 0 by more than its std). '' without a row."""
    measured = [r for r in runs if r.get("transfer")]
    if len(measured) < 2:  # a std needs two seeds
        return ""
    per_expert = {
        n: [r["transfer"][n] for r in measured if n in r["transfer"]] for n in measured[0]["transfer"]
    }
    stats = {n: (statistics.mean(v), statistics.stdev(v)) for n, v in per_expert.items() if len(v) > 1}
    if not stats:
        return ""
    best, worst = max(stats, key=lambda n: stats[n][0]), min(stats, key=lambda n: stats[n][0])
    spread = stats[best][0] - stats[worst][0]
    base_sd = statistics.stdev(r["scores"][TARGET_ONLY.name] for r in measured)
    control = [r["control"] for r in measured if r.get("control") is not None]
    hurt = sorted((n for n, (m, sd) in stats.items() if m + sd < 0), key=lambda n: stats[n][0])
    ratio = f"{spread / base_sd:.1f}x" if base_sd else "-"

    def cell(n):
        return f"{n} {mean_sd(per_expert[n], signed=True)}"

    return (
        f"| {shots_label(measured[0]['shots'])} | {len(measured)} | {base_sd:.3f} | "
        f"{mean_sd(control, signed=True)} | {cell(best)} | {cell(worst)} | {spread:.3f} ({ratio}) | "
        f"{', '.join(cell(n) for n in hurt) or 'none'} |"
    )


def write_study(cfg, targets: list[str]) -> Path:
    """runs/<profile>/study.md over several targets (one config): each target's own report as
    study/<target>.md, and across them π-Tuning against target-only and random-k, Spearman and precision@k of
    every embedding per target, which embedding ranks transfer best (on validation), and the targets x pool
    transfer matrix (study/transfer_matrix.png). Returns the markdown's path."""
    import matplotlib

    matplotlib.use("Agg")
    out, figs = cfg.run_dir / "study.md", cfg.run_dir / "study"
    k = cfg.interpolate.top_k
    by_target = {}
    for t in targets:
        write_report(cfg, t, figs / f"{t}.md", figs / t)
        by_target[t] = load_results(cfg, t)
    md = [
        f"# π-Tuning study: {', '.join(targets)} ({cfg.profile})",
        "",
        f"One config for every target ({cfg.path}): expert `{cfg.expert.method}`, top-{k} retrieval by "
        f"`{heading(cfg.embed)}`. Each target's full "
        "report: " + ", ".join(f"[{t}](study/{t}.md)" for t in targets) + ".",
        "",
        "## π-Tuning against target-only and random-k (test)",
        "",
        "Gain is π-Tuning minus the baseline, mean ± std over seeds. " + INTERVAL,
        "",
        "| target | shots | vs | wins | mean gain | 95% interval | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, runs in by_target.items():
        for s in sorted({r["shots"] for r in runs}):
            for base in LOTO_BASES:
                cells = _against([r for r in runs if r["shots"] == s], base)
                if cells:
                    md.append(f"| {t} | {shots_label(s)} | {base} | {cells} |")
    md += [
        "",
        "## Retrieval: which embedding ranks the measured transfer",
        "",
        f"Spearman(similarity, transfer) per seed over the pool, mean ± std over seeds, on validation and on "
        f"test; precision@{k}: the share of the embedding's top-{k} among the {k} experts of largest test "
        "transfer (the oracle's), mean over seeds.",
        "",
        "| target | shots | embedding | Spearman (val) | Spearman (test) | precision@k |",
        "|---|---|---|---|---|---|",
    ]
    overall: dict[str, list] = {}
    matrix: dict[str, dict[str, list]] = {}
    undefined: set[str] = set()
    transfer_rows = []  # each target's transfer row, per shots measured
    for t, runs in by_target.items():
        sims = _similarities(cfg, runs)
        measured = sorted({r["shots"] for r in runs if r.get("transfer")})
        for s in measured:
            at = [r for r in runs if r["shots"] == s]
            row = transfer_row(at)
            if row:
                transfer_rows.append(f"| {t} {row}")
            for emb, per_run in sims.items():
                val, test = (_rhos(per_run, at, key) for key in ("val_transfer", "transfer"))
                if not test:
                    continue
                val, test = ([x for x in v if not math.isnan(x)] for v in (val, test))
                # every seed's transfers all the same (a target at its ceiling), or one: nothing to rank
                if not test:
                    md.append(f"| {t} | {shots_label(s)} | {emb} | undefined | undefined | - |")
                    undefined.add(t)
                    continue
                prec = _precision(per_run, at, k)
                md.append(
                    f"| {t} | {shots_label(s)} | {emb} | {mean_sd(val, signed=True)} | "
                    f"{mean_sd(test, signed=True)} | {statistics.mean(prec):.2f} |"
                )
                name = "retrieval" if emb.startswith("retrieval") else emb
                overall.setdefault(name, []).append(
                    (statistics.mean(val) if val else math.nan, statistics.mean(test), statistics.mean(prec))
                )
            for r in at if s == measured[-1] else []:  # the matrix at the most shots measured
                for n, v in r.get("transfer", {}).items():
                    matrix.setdefault(t, {}).setdefault(n, []).append(v)
    if undefined:
        md += [
            "",
            f"Undefined: every pool expert's transfer to {', '.join(sorted(undefined))} was the same in "
            "every seed (a target at its ceiling), or one expert's alone was measured, so there is no "
            "ranking to correlate with or to take the top of; the line below leaves it out.",
        ]
    if overall:
        md += [
            "",
            "Across targets (each target's mean over seeds, then their mean; ranked by validation):",
            "",
            "| embedding | target × shots | Spearman (val) | Spearman (test) | precision@k |",
            "|---|---|---|---|---|",
        ]
        rows = [
            (emb, len(vals), *(statistics.mean(col) for col in zip(*vals))) for emb, vals in overall.items()
        ]
        rows.sort(key=lambda row: math.inf if math.isnan(row[2]) else -row[2])  # no validation transfer: last
        md += [f"| {e} | {n} | {v:+.3f} | {t:+.3f} | {p:.2f} |" for e, n, v, t, p in rows]
        best = next((row for row in rows if row[0] != "retrieval" and not math.isnan(row[2])), None)
        if best:
            md += [
                "",
                f"Best on validation: **{best[0]}** (Spearman {best[2]:+.3f} over {best[1]} target × shots).",
            ]
    if transfer_rows:
        md += [
            "",
            "## The transfer row: does the pool hold experts that help and experts that hurt? (test)",
            "",
            "Transfer of an expert: π-Tuning with the target's expert and that one alone, minus "
            "target-only; mean ± std over seeds. The control is the same run with an expert that changes "
            "nothing. Spread: best minus worst expert, and how many times target-only's seed-to-seed std "
            "that is. Hurts: mean transfer below 0 by more than its std.",
            "",
            "| target | shots | seeds | target-only std | control | best | worst | spread | hurts |",
            "|---|---|---|---|---|---|---|---|---|",
            *transfer_rows,
        ]
    if matrix:
        _plot_matrix(figs / "transfer_matrix.png", matrix)
        md += [
            "",
            "## Transfer matrix",
            "",
            "![targets x pool transfer](study/transfer_matrix.png) (test "
            f"{by_target[targets[0]][0]['metric']} of π-Tuning with the target's expert and "
            "one pool expert, minus target-only; mean over seeds, at each target's most shots "
            "with transfer measured)",
        ]
    write_text(out, "\n".join(md) + "\n")
    return out


def _diffs(runs: list[dict], a: str, b: str):
    """The seeds x examples array of a's per-example scores minus b's over runs, or None where any run lacks
    them (results made before per-example scores were kept for every metric) or they scored different
    examples."""
    rows = []
    for r in runs:
        each = r.get("per_example", {}).get("test", {})
        if a not in each or b not in each:
            return None
        rows.append(np.asarray(unpack(each[a])) - np.asarray(unpack(each[b])))
    return np.stack(rows) if len(rows) > 1 and len({len(x) for x in rows}) == 1 else None


LOTO_BASES = (TARGET_ONLY.name, RANDOM_K.name)  # what make loto compares its methods against


def loto_methods() -> list[str]:
    """What make loto compares against the two baselines: π-Tuning and the methods it makes beside it."""
    return [PI.name, *(m.name for m in METHODS.values() if "loto" in m.studies and m.name not in LOTO_BASES)]


def write_loto(cfg, targets: list[str]) -> Path:
    """runs/<profile>/loto.md: every target of the pool with the rest as its pool (make loto). Per target and
    shots: each method's test score and its gain over target-only and random-k with the hierarchical interval
    and verdict; across targets: how many each method wins, ties and loses, and its mean gain with an interval
    that resamples the targets too (across_interval). A target at its ceiling (every method 1.000 in every
    seed) is shown and left out of the counts; so is a result without per-example scores (made before they
    were kept for every metric: no interval)."""
    by_target = {t: load_results(cfg, t) for t in targets}
    missing = [t for t, runs in by_target.items() if not runs]
    if missing:
        raise UserError(
            f"{cfg.run_dir / 'results'}: no results under this config for {', '.join(missing)}; run `make "
            f"loto` first"
        )
    methods = [
        m for m in loto_methods() if any(m in r["scores"] for runs in by_target.values() for r in runs)
    ]
    md = [
        f"# π-Tuning on every target of the pool ({cfg.profile}): each task the target, the rest its pool",
        "",
        f"Config: {config_label(cfg.path, cfg.to_dict())}. Methods: `pi-tuning` as configured (retrieval "
        f"`{cfg.interpolate.retrieval}`, `{heading(cfg.embed)}`, top-{cfg.interpolate.top_k}, candidate ks "
        f"{cfg.interpolate.select_k} where chosen on validation); "
        + "".join(f"`{m}`: {METHODS[m].what}; " for m in methods if m != PI.name)
        + f"`{RANDOM_K.name}`: {RANDOM_K.what}. Test accuracy (each target's metric), mean over seeds. "
        + INTERVAL,
        "",
    ]
    for shots in sorted({r["shots"] for runs in by_target.values() for r in runs}):
        at = {t: [r for r in runs if r["shots"] == shots] for t, runs in by_target.items()}
        at = {t: rs for t, rs in at.items() if rs}
        md += [
            f"## {shots_label(shots)}",
            "",
            "| target | seeds | target-only | "
            + " | ".join(methods)
            + f" | {RANDOM_K.name} | "
            + " | ".join(f"{m} − {b}" for m in methods for b in LOTO_BASES)
            + " |",
            "|---" * (4 + 2 * len(methods) + len(methods)) + "|",
        ]
        tally = {
            (m, b): {"win": 0, "tie": 0, "loss": 0, "gains": [], "d": []} for m in methods for b in LOTO_BASES
        }
        ceiling = []
        for t, rs in at.items():

            def score(m):  # B023: called in this iteration only, with its rs
                vals = [r["scores"][m] for r in rs if m in r["scores"]]  # noqa: B023
                return mean_sd(vals) if vals else "-"

            flat = all(
                v >= 0.9995 for r in rs for v in r["scores"].values() if not isinstance(v, str)
            ) and all(r["scores"].get(TARGET_ONLY.name, 0) >= 0.9995 for r in rs)
            cells = []
            for m in methods:
                for b in LOTO_BASES:
                    both = [r for r in rs if m in r["scores"] and b in r["scores"]]
                    if not both:
                        cells.append("-")
                        continue
                    gains = [r["scores"][m] - r["scores"][b] for r in both]
                    d = _diffs(both, m, b)
                    ci = hierarchical_interval(d) if d is not None else None
                    cells.append(
                        f"{statistics.mean(gains):+.3f} "
                        + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}] {verdict(ci)}" if ci else "(no interval)")
                    )
                    if ci and not flat:
                        tally[m, b][verdict(ci)] += 1
                        tally[m, b]["gains"].append(statistics.mean(gains))
                        tally[m, b]["d"].append(d)
            if flat:
                ceiling.append(t)
            md.append(
                f"| {t} | {len(rs)} | {score(TARGET_ONLY.name)} | "
                + " | ".join(score(m) for m in methods)
                + f" | {score(RANDOM_K.name)} | "
                + " | ".join(cells)
                + " |"
            )
        md += [
            "",
            f"Across targets ({shots_label(shots)}): wins, ties and losses by each target's interval; the "
            "mean of the targets' mean gains, and its 95% interval over new targets, seeds and examples"
            + (f"; left out, at their ceiling: {', '.join(ceiling)}" if ceiling else "")
            + ".",
            "",
            "| method | vs | targets | wins | ties | losses | mean gain | 95% interval | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (m, b), got in tally.items():
            n = got["win"] + got["tie"] + got["loss"]
            if not n:
                continue
            ci = across_interval(got["d"])
            md.append(
                f"| {m} | {b} | {n} | {got['win']} | {got['tie']} | {got['loss']} | "
                f"{statistics.mean(got['gains']):+.3f} | "
                + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}] | {verdict(ci)} |" if ci else "- | - |")
            )
        md.append("")
        chosen = _chosen(cfg, [r for rs in at.values() for r in rs])
        if chosen:
            md += [
                f"What `pi-select` chose ({shots_label(shots)}, every target and seed): "
                + ", ".join(f"{what} {n}" for what, n in sorted(chosen.items(), key=lambda kv: -kv[1]))
                + ".",
                "",
            ]
        md += default_without_target(cfg, at)
    out = cfg.run_dir / "loto.md"
    write_text(out, "\n".join(md) + "\n")
    return out


def _selection(cfg, run: str) -> dict | None:
    """The selection artifact's meta.json of a run
    (its `retrieval` and every `candidates`' validation score)."""
    path = artifact(cfg, "interpolated", run, "" if PI.chosen(cfg) else SELECT.variant) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _chosen(cfg, runs: list[dict]) -> dict[str, int]:
    """How often selection chose each kind of retrieval (k = 0, or an embedding's top-k),
    from its artifacts."""
    counts: dict[str, int] = {}
    for meta in filter(None, (_selection(cfg, r["run"]) for r in runs)):
        how = meta["retrieval"].split(": ", 1)[-1]
        counts[how] = counts.get(how, 0) + 1
    return counts


def default_without_target(cfg, at: dict[str, list[dict]]) -> list[str]:
    """A global default chosen by leave-one-target-out on validation: for each target, the retrieval (an
    embedding's top-k, or k = 0) whose validation gain over k = 0, from selection's candidates, is largest on
    average over the other targets (each target's mean over its seeds). No test score and nothing of the
    target itself enters its row; ties go to fewer experts (k = 0 first), as selection's do. A target
    without selection artifacts is named and left out; a retrieval some other target lacks is not a choice
    for its row. Returns the markdown (nothing with fewer than two targets to compare)."""
    # target -> retrieval -> per-seed validation gain over k = 0
    gains: dict[str, dict[str, list[float]]] = {}
    for t, rs in at.items():
        for meta in filter(None, (_selection(cfg, r["run"]) for r in rs)):
            alone = next(c["val"] for c in meta["candidates"] if not c["experts"])
            for c in meta["candidates"]:
                for how in c["by"]:
                    gains.setdefault(t, {}).setdefault(how, []).append(c["val"] - alone)
    if len(gains) < 2:
        return []
    means = {t: {how: statistics.mean(g) for how, g in got.items()} for t, got in gains.items()}
    ic = cfg.interpolate
    fixed = ic.retrieval == "fixed" and not ic.experts  # else no one retrieval is shipped to compare
    shipped = f"{cfg.embed.embedding} top-{ic.top_k}" if fixed else "the configured retrieval"
    missing = [t for t in at if t not in gains]
    md = [
        "A default chosen without the target (validation only): for each target, the retrieval with the "
        "largest mean validation gain over k = 0 on the other targets (selection's candidates, each "
        f"target's mean over seeds), and that of the shipped `{shipped}`"
        + (f"; without selection artifacts, left out: {', '.join(missing)}" if missing else "")
        + ".",
        "",
        f"| target | chosen on the other targets | its mean validation gain there | `{shipped}`'s there |",
        "|---|---|---|---|",
    ]

    def experts(how: str) -> int:  # "fisher top-2" -> 2, k = 0 -> 0
        return int(how.rsplit("top-", 1)[1]) if "top-" in how else 0

    picks: dict[str, int] = {}
    for t in means:
        others = [m for u, m in means.items() if u != t]
        hows = set.intersection(*(set(m) for m in others))
        on_others = {how: statistics.mean(m[how] for m in others) for how in hows}
        best = min(on_others, key=lambda how: (-round(on_others[how], 6), experts(how), how))
        picks[best] = picks.get(best, 0) + 1
        md.append(
            f"| {t} | {best} | {on_others[best]:+.4f} | "
            + (f"{on_others[shipped]:+.4f} |" if shipped in on_others else "- |")
        )
    md += [
        "",
        "Chosen: "
        + ", ".join(
            f"{how} for {n} of {len(means)} targets"
            for how, n in sorted(picks.items(), key=lambda kv: -kv[1])
        )
        + ".",
        "",
    ]
    return md


def write_report(cfg, target: str, out: Path | None = None, figs: Path | None = None) -> Path:
    """runs/<profile>/report.md and report/*.png (or `out` and `figs`); returns the markdown's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    runs = load_results(cfg, target)
    others = [
        config_label(cfg.path, rs[0]["config"]) + f" ({seeds(len(rs))})"
        for cid, rs in results_by_config(cfg, target).items()
        if cid != config_id(cfg)
    ]
    if not runs:
        elsewhere = f" under this config (under others: {'; '.join(others)})" if others else ""
        raise UserError(
            f"{cfg.run_dir / 'results'}: no results for {target}{elsewhere}; run `make report "
            f"TARGET={target}` with this config first"
        )
    out, figs = out or cfg.run_dir / "report.md", figs or cfg.run_dir / "report"
    figs.mkdir(parents=True, exist_ok=True)
    rel = figs.relative_to(out.parent)  # the plots' links, from the markdown's folder
    by_shots: dict[int, list[dict]] = {}
    for r in runs:
        by_shots.setdefault(r["shots"], []).append(r)
    shots = sorted(by_shots)
    methods = ordered(runs)
    metric = runs[0]["metric"]

    ic = cfg.interpolate
    how = (
        f"retrieval chosen on the target's validation split (k = 0, or the top-k of each of "
        f"{', '.join(select_from(cfg))} for k in {ic.select_k})"
        if PI.chosen(cfg)
        else f"top-{ic.top_k} retrieval by `{heading(cfg.embed)}`"
    )
    md = [
        f"# π-Tuning study: {target} ({cfg.profile})",
        "",
        f"Expert `{cfg.expert.method}`, {how}, interpolation "
        f"groups `{cfg.interpolate.groups}`, {runs[0]['test_size']} test examples, test {metric}. Seeds "
        "vary the target's k-shot sample, its expert and the interpolation; pool experts are shared.",
        "",
        f"Every figure is from results made under this config: {config_label(cfg.path, cfg.to_dict())}."
        + (
            f" Results of other configs for this target (`make compare`): {'; '.join(others)}."
            if others
            else ""
        ),
        "",
        overlap_note(cfg),
        "",
        "## Accuracy (mean ± std over seeds)",
        "",
        "| method | " + " | ".join(f"{shots_label(s)} ({seeds(len(by_shots[s]))})" for s in shots) + " |",
        "|---" * (len(shots) + 1) + "|",
    ]
    for m in methods:
        md.append(
            f"| {m} | "
            + " | ".join(mean_sd([r["scores"][m] for r in by_shots[s] if m in r["scores"]]) for s in shots)
            + " |"
        )

    md += [
        "",
        "## π-Tuning against the baselines, seed by seed",
        "",
        "Wins count seeds where π-Tuning is strictly better; gain is π-Tuning minus the baseline, mean ± std "
        "over seeds. " + INTERVAL,
        "",
        "| shots | vs | wins | mean gain | 95% interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for s in shots:
        for base in (m.name for m in sorted(METHODS.values(), key=lambda m: m.against) if m.against):
            cells = _against(by_shots[s], base)
            if cells:
                md.append(f"| {s} | {base} | {cells} |")
    md += [
        "",
        "| shots | seed | retrieved | target-only | π-Tuning | π random-k |",
        "|---|---|---|---|---|---|",
    ]
    for s in shots:
        for r in sorted(by_shots[s], key=lambda r: r["seed"]):
            a = r["scores"]
            rnd = f"{a[RANDOM_K.name]:.3f}" if RANDOM_K.name in a else "-"
            md.append(
                f"| {s} | {r['seed']} | {', '.join(r['experts'][1:])} | {a[TARGET_ONLY.name]:.3f} | "
                f"{a[PI.name]:.3f} | {rnd} |"
            )

    md += [
        "",
        "## Retrieval: predicted similarity against measured transfer",
        "",
        "Transfer of expert s = accuracy of π-Tuning with the target's expert and s alone, minus "
        "target-only. Spearman is taken per seed over the pool, then averaged. `retrieval` is the "
        "embedding π-Tuning used; the others were computed beside it for comparison (embed_tasks.py "
        "--embedding; the `only` rows restrict the cached per-sample Fisher to those tensors):",
        "",
        *[f"- `{n}`: {what}" for n, what in described().items()],
        "",
    ]
    rho_rows, scatter = [], []
    for emb, sims in _similarities(cfg, runs).items():
        for s in shots:
            for split, key in (("val", "val_transfer"), ("test", "transfer")):
                rhos, per_expert = [], {}
                for r in by_shots[s]:
                    sim = sims.get(r["run"])
                    if not r.get(key) or sim is None:
                        continue
                    names = sorted(n for n in r[key] if n in sim)
                    rhos.append(spearman([sim[n] for n in names], [r[key][n] for n in names]))
                    for n in names:
                        per_expert.setdefault(n, []).append(
                            (sim[n], r[key][n], r.get("val_transfer", {}).get(n))
                        )
                if rhos:
                    ok = [x for x in rhos if not math.isnan(x)]
                    # defined ones
                    counted = f"{len(ok)} of {len(rhos)}" if len(ok) < len(rhos) else f"{len(rhos)}"
                    rho_rows.append(
                        f"| {s} | {emb} | {split} | {counted} | {mean_sd(ok, signed=True)} | "
                        f"{', '.join('undefined' if math.isnan(x) else f'{x:+.2f}' for x in rhos)} |"
                    )
                    if emb.startswith("retrieval") and split == "test":
                        scatter.append((s, per_expert, mean_sd(ok, signed=True)))
    if rho_rows:
        md += [
            "Each transfer is measured on the validation split (what an embedding or a default is chosen by) "
            "and on the test split (what is reported).",
            "",
            "| shots | embedding | split | seeds | Spearman (mean ± std) | per seed |",
            "|---|---|---|---|---|---|",
            *rho_rows,
            "",
        ]
        if any("undefined" in row for row in rho_rows):
            md += [
                "Undefined: every transfer of that seed is the same (all 0 where the target is at its "
                "ceiling), or one expert's alone was measured, so there is no ranking to correlate with.",
                "",
            ]
    if scatter:
        s, per_expert, rho = scatter[-1]
        md += [
            f"At {shots_label(s)} (retrieval's embedding):",
            "",
            "| expert | similarity | transfer (val) | transfer (test) |",
            "|---|---|---|---|",
        ]
        for n, v in sorted(per_expert.items(), key=lambda kv: -statistics.mean(t for _, t, _ in kv[1])):
            val = [x for _, _, x in v if x is not None]
            md.append(
                f"| {n} | {mean_sd([a for a, _, _ in v], signed=True)} | "
                f"{mean_sd(val, signed=True)} | {mean_sd([b for _, b, _ in v], signed=True)} |"
            )
        control = [r for r in by_shots[s] if r.get("control") is not None]
        if control:  # pair-null: the same interpolation with an expert that adds nothing
            val, test = ([r[k] for r in control] for k in ("val_control", "control"))
            md += [
                f"| control: `pair-null`, nothing added | - | {mean_sd(val, signed=True)} | "
                f"{mean_sd(test, signed=True)} |",
                "",
                "The control is the target's expert interpolated, as every pair run is, with an expert "
                "that changes nothing: what the interpolation alone does to the target's expert (its mix "
                "settles near the other runs'). An expert adds something of its own only by the amount its "
                "transfer exceeds the control's.",
            ]
        _plot_transfer(
            figs / "transfer_vs_similarity.png",
            s,
            {n: [(a, b) for a, b, _ in v] for n, v in per_expert.items()},
            rho,
        )
    elif not rho_rows:
        md.append(
            "_No transfer measured yet (interpolate.py --variant pair-<expert>, evaluate.py --transfer)._"
        )

    md += ["", "## Plots", ""]
    _plot_accuracy(figs / "accuracy_vs_shots.png", target, by_shots, methods, metric)
    md.append(f"![accuracy vs shots]({rel}/accuracy_vs_shots.png)")
    if scatter:
        md.append(f"![transfer vs similarity]({rel}/transfer_vs_similarity.png)")
    last = min(by_shots[shots[-1]], key=lambda r: r["seed"])  # the plots show one run: most shots, first seed
    sim_file = artifact(cfg, "similarity", last["run"])
    if sim_file.is_file():
        sim = json.loads(sim_file.read_text())  # its top_k: the edges drawn in red and the caption's k
        _plot_similarity(figs / "similarity.png", figs / "task_graph.png", _whole(cfg, sim), _families(cfg))
        md += [
            f"![similarity heatmap]({rel}/similarity.png) ![task graph]({rel}/task_graph.png)",
            f"(similarity of {last['run']}; graph edges: each task's two most similar, the target's top-"
            f"{len(sim.get('top_k', []))} in red)",
        ]
    weights = artifact(cfg, "interpolated", last["run"]) / "weights.json"
    if weights.is_file():
        _plot_weights(figs / "weights.png", json.loads(weights.read_text()), last["run"])
        md.append(f"![learned weights]({rel}/weights.png) (learned interpolation weights of {last['run']})")
    write_text(out, "\n".join(md) + "\n")
    return out


# which tensors count: the cached per-sample Fisher restricted to a subset, a pure post-processing
FISHER_SUBSETS = {
    "fisher: lora_A only": r"\.lora_A",
    "fisher: lora_B only": r"\.lora_B",
    "fisher: encoder only": r"\.encoder\.",
    "fisher: decoder only": r"\.decoder\.",
}


def _similarities(cfg, runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """embedding -> run -> {pool expert: predicted similarity to the target's expert}; "retrieval (<emb>)"
    is what π-Tuning used (similarity/<run>.json), the others similarity/<run>.<embedding>.json, and the
    FISHER_SUBSETS of the cached per-sample Fishers (fisher/<expert>.safetensors) where they exist."""
    from common.similarity import cached_fisher, fisher_cache, normalized, task_similarity

    plain = dataclasses.replace(
        cfg,
        embed=dataclasses.replace(cfg.embed, estimator="per_sample", passes=1, at="own", answers="truth"),
    )
    out: dict[str, dict] = {}
    fishers: dict[str, dict | None] = {}
    for r in runs:
        # this config's files (their paths carry its digests), by exact name: ...-s1's are not ...-s10's
        files = {emb: artifact(cfg, "similarity", r["run"], emb) for emb in ["", *variants()]}
        for emb, p in sorted(files.items(), key=lambda kv: readable(kv[1]).name):
            if not p.is_file():
                continue
            s = json.loads(p.read_text())
            used = settings_of(s).get("embedding", "fisher")
            row = s["row"] if "row" in s else s["matrix"][0]  # (files before 2026-12 held the whole matrix)
            # an import this embedding could not take was compared by another (ranked_by): not its to rank
            other = ranked_otherwise(s, s["names"], used)
            out.setdefault(emb or f"retrieval ({used})", {})[r["run"]] = {
                n: v for n, v in zip(s["names"], row) if n not in other
            }
        names = [r["run"]] + list(r.get("transfer", {}))
        for n in names:
            if n not in fishers:
                try:
                    fishers[n] = cached_fisher(*fisher_cache(plain, n))
                except OSError:  # the expert is gone
                    fishers[n] = None
        if len(names) < 2 or not all(fishers[n] for n in names):
            continue
        for label, pattern in FISHER_SUBSETS.items():
            sub = [{k: v for k, v in fishers[n].items() if re.search(pattern, k)} for n in names]
            if sub[0]:
                emb = [normalized(x, cfg.embed.normalize) for x in sub]
                out.setdefault(label, {})[r["run"]] = {
                    n: task_similarity(emb[0], e) for n, e in zip(names[1:], emb[1:])
                }
    return dict(sorted(out.items(), key=lambda kv: not kv[0].startswith("retrieval")))


def _whole(cfg, sim: dict) -> dict:
    """A target's similarity file with its whole matrix (retrieval wrote the target's row only): every pair of
    its experts compared again from the embeddings, read from their caches (or from the experts' files)."""
    if "matrix" in sim:
        return sim
    from common.similarity import compared

    as_made = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, **settings_of(sim)))
    return {**sim, "matrix": compared(as_made, sim["names"], target=False)[0]}


def overlap_note(cfg) -> str:
    """The overlap guard's line: how many training examples each pool task lost for showing an image of a
    scored split of the pool (data.exclude_scored_images), from the pool experts' meta.json."""
    if not cfg.data.exclude_scored_images:
        return (
            "Training examples that show an image of a scored split were kept "
            "(data.exclude_scored_images: false)."
        )
    dropped = {}
    for t in cfg.tasks.pool:  # the pool expert's, or (the target's) any of its k-shot experts'
        if t in cfg.tasks.imported:  # trained elsewhere: what it saw is not known here
            dropped[t] = "imported: not guarded"
            continue
        metas = [
            artifact(cfg, "expert", t) / "meta.json",
            *sorted((cfg.run_dir / "experts").glob(f"{glob.escape(t)}-*@*/meta.json")),
        ]
        rows = next(
            (
                m.get("train_rows")
                for m in (json.loads(p.read_text()) for p in metas if p.is_file())
                if m.get("task") == t
            ),
            None,
        )
        dropped[t] = f"{rows['dropped_scored_images']:,} of {rows['rows']:,}" if rows else "not recorded"
    hit = {t: d for t, d in dropped.items() if not d.startswith("0 of")}
    return (
        "Training examples left out for showing an image of a scored split (validation or test) of a pool "
        "task (data.exclude_scored_images): "
        + (", ".join(f"{t} {d}" for t, d in hit.items()) if hit else "none")
        + "."
    )


def _families(cfg) -> dict[str, str]:
    fam = {}
    for p in (cfg.run_dir / "experts").glob("*@*/meta.json"):
        m = json.loads(p.read_text())
        fam[m["name"]] = m.get("family", "")
    return fam


def _plot_accuracy(path: Path, target: str, by_shots: dict, methods: list[str], metric: str) -> None:
    """Left: every method's accuracy; right: the gain over target-only, seed by seed (paired), zoomed in."""
    import matplotlib.pyplot as plt

    shots = sorted(by_shots)
    x = list(range(len(shots)))
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(13, 4.8))
    off_panel = []  # methods whose mean gain is far below target-only's: named on the panel, not dropped
    for m in methods:
        style = dict(lw=2.5, color="black") if m == PI.name else dict(lw=1.2)
        pts = [(i, [r["scores"][m] for r in by_shots[s] if m in r["scores"]]) for i, s in zip(x, shots)]
        pts = [(i, v) for i, v in pts if v]
        line = ax.errorbar(
            [i for i, _ in pts],
            [statistics.mean(v) for _, v in pts],
            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
            marker="o",
            capsize=3,
            label=m,
            **style,
        )
        gains = [
            (i, [r["scores"][m] - r["scores"][TARGET_ONLY.name] for r in by_shots[s] if m in r["scores"]])
            for i, s in zip(x, shots)
        ]
        gains = [(i, g) for i, g in gains if g]
        if m in (ZERO_SHOT.name, TARGET_ONLY.name) or not gains:
            continue
        if m != PI.name and min(statistics.mean(g) for _, g in gains) < -0.1:  # would squash the others
            off_panel.append(f"{m} {min(statistics.mean(g) for _, g in gains):+.2f}")
            continue
        off = 0.012 * (methods.index(m) - len(methods) / 2)  # side by side, not on top of each other
        gx.errorbar(
            [i + off for i, _ in gains],
            [statistics.mean(g) for _, g in gains],
            yerr=[statistics.stdev(g) if len(g) > 1 else 0 for _, g in gains],
            marker="o",
            capsize=3,
            color=line[0].get_color(),
            **{k: v for k, v in style.items() if k != "color"},
        )
    below = f"\nbelow the panel (mean gain): {', '.join(off_panel)}" if off_panel else ""
    for a, title in (
        (ax, f"{target}: mean ± std over seeds"),
        (gx, f"gain over target-only, seed by seed{below}"),
    ):
        a.set_xticks(x, [shots_label(s) for s in shots])
        a.set_xlabel("target training data")
        a.set_title(title)
        a.grid(alpha=0.3)
    ax.set_ylabel(f"test {metric}")
    gx.axhline(0, color="grey", lw=1)
    gx.set_ylabel(f"{metric} − target-only")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_matrix(path: Path, matrix: dict[str, dict[str, list]]) -> None:
    import matplotlib.pyplot as plt

    targets = list(matrix)
    pool = sorted({n for row in matrix.values() for n in row})
    vals = [[statistics.mean(matrix[t][n]) if n in matrix[t] else math.nan for n in pool] for t in targets]
    top = max((abs(v) for row in vals for v in row if not math.isnan(v)), default=1) or 1
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(pool), 1.4 + 0.5 * len(targets)))
    im = ax.imshow(vals, cmap="RdBu", vmin=-top, vmax=top)
    ax.set_xticks(range(len(pool)), pool, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(targets)), targets, fontsize=8)
    for i, row in enumerate(vals):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:+.3f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="transfer")
    ax.set_title("transfer: π with the target's expert and one pool expert, minus target-only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_transfer(path: Path, shots: int, per_expert: dict, rho: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for n, v in per_expert.items():
        xs, ys = [a for a, _ in v], [b for _, b in v]
        dots = ax.scatter(xs, ys, s=18, alpha=0.6)
        ax.annotate(
            n,
            (statistics.mean(xs), statistics.mean(ys)),
            fontsize=8,
            weight="bold",
            color=dots.get_facecolor()[0][:3],
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("predicted similarity to the target")
    ax.set_ylabel("measured transfer (accuracy gain)")
    ax.set_title(f"{shots_label(shots)}: one dot per expert and seed, name at its mean\nSpearman {rho}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_similarity(heat_path: Path, graph_path: Path, sim: dict, families: dict) -> None:
    import matplotlib.pyplot as plt

    names, m = sim["names"], sim["matrix"]
    fig, ax = plt.subplots(figsize=(7, 6))
    off = [v for i, row in enumerate(m) for j, v in enumerate(row) if i != j]
    im = ax.imshow(m, cmap="viridis", vmin=min(off), vmax=max(off))
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            if i != j:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=ax, label="similarity (off-diagonal range)")
    embedding = EMBEDDINGS.get(settings_of(sim).get("embedding", "fisher"))
    ax.set_title(f"task similarity ({embedding.what if embedding else settings_of(sim)['embedding']})")
    fig.tight_layout()
    fig.savefig(heat_path, dpi=110)
    plt.close(fig)

    n = len(names)
    pos = [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)]
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    edges = {
        tuple(sorted((i, j)))
        for i in range(n)
        for j in sorted((j for j in range(n) if j != i), key=lambda j: -m[i][j])[:2]
    }
    for i, j in edges:
        ax.plot(
            [pos[i][0], pos[j][0]],
            [pos[i][1], pos[j][1]],
            color="grey",
            lw=0.5 + 6 * (m[i][j] - min(off)) / max(max(off) - min(off), 1e-9),
            alpha=0.6,
            zorder=1,
        )
    for name in sim.get("top_k", []):
        j = names.index(name)
        ax.plot([pos[0][0], pos[j][0]], [pos[0][1], pos[j][1]], color="red", lw=2.5, zorder=2)
    for i, name in enumerate(names):
        fam = families.get(name) or families.get(name.split("-")[0] if "shot" in name else name, "")
        ax.scatter(
            *pos[i],
            s=500 if i == 0 else 250,
            color=FAMILY_COLOURS.get(fam, "tab:gray"),
            edgecolor="red" if i == 0 else "black",
            zorder=3,
        )
        r = 1.25 if i == 0 else 1.14
        ax.annotate(name, (pos[i][0] * r, pos[i][1] * r), ha="center", va="center", fontsize=8)
    for fam, colour in FAMILY_COLOURS.items():
        ax.scatter([], [], color=colour, label=fam)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.axis("off")
    ax.set_title("task graph: line width = similarity")
    fig.tight_layout()
    fig.savefig(graph_path, dpi=110)
    plt.close(fig)


def _plot_weights(path: Path, weights: dict, run: str) -> None:
    import matplotlib.pyplot as plt

    experts, groups = weights["experts"], list(weights["groups"])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(groups) + 2), 4.5))
    bottom = [0.0] * len(groups)
    for e in experts:
        vals = [weights["groups"][g][e] for g in groups]
        ax.bar(range(len(groups)), vals, bottom=bottom, label=e)
        bottom = [b + v for b, v in zip(bottom, vals)]
    short = [
        re.sub(r"^.*?(encoder|decoder|vision_tower)", r"\1", g)
        .replace("layers.", "")
        .replace("self_attn", "sa")
        .replace("encoder_attn", "ca")
        for g in groups
    ]
    ax.set_xticks(range(len(groups)), short, rotation=80, fontsize=6)
    ax.set_ylabel("softmax weight")
    ax.set_title(f"learned interpolation weights per group: {run}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# python -m common.report CONFIG [key=value ...] --tables TARGET: make all's table, fresh
if __name__ == "__main__":
    try:
        argv = sys.argv[1:]
        at = argv.index("--tables")
        cfg = load_config(argv[0], split_overrides(argv[1:at]))
        print(write_tables(cfg, argv[at + 1]).read_text(), end="")
    except (UserError, ValueError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
