"""Findings checklist: each main claim of Pletenev et al. (2025), this run's statistic, a verdict.

A verdict is "reproduced", "contradicted" or "inconclusive at this scale". Every check states
the interval behind its verdict, so a reader can see whether a difference is larger than the
noise of a small run. Intervals are at 95%:
- shares of replies or questions: Wilson score intervals, or normal intervals for differences;
- benchmark changes: a paired bootstrap over questions of (adapted - base), averaged over cells;
- learning speed: the range of the per-pair differences, because a CPU run has only a few pairs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from kp_utils.artifacts import RunLayout

logger = logging.getLogger(__name__)

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive at this scale"
LEARNED_RELIABILITY = 0.95  # reliability at which a set of facts counts as learned
Z_95 = 1.959964  # two-sided 95% normal quantile
# Accuracy of guessing among 4 options, the usual count for MMLU and ARC questions.
CHANCE_ACCURACY = {"mmlu": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25}
# Per-question benchmark files: results.csv column -> (file stem, per-question score column).
BENCHMARK_FILES = {
    "mmlu": ("mmlu", "is_correct"),
    "truthfulqa_mc1": ("truthfulqa", "mc1"),
    "truthfulqa_mc2": ("truthfulqa", "mc2"),
    "arc_easy": ("arc_easy", "is_correct"),
    "arc_challenge": ("arc_challenge", "is_correct"),
}


@dataclass(frozen=True)
class Finding:
    """One row of the checklist."""

    claim: str
    statistic: str  # what `value` measures, in words
    value: float
    ci_low: float
    ci_high: float
    verdict: str
    reason: str  # why the verdict follows from the value and interval


def wilson_interval(successes: float, trials: float) -> tuple[float, float]:
    """Return the 95% Wilson score interval of a binomial share, or NaNs when `trials` is 0."""
    if trials <= 0:
        return math.nan, math.nan
    share = successes / trials
    denominator = 1 + Z_95**2 / trials
    centre = (share + Z_95**2 / (2 * trials)) / denominator
    half = Z_95 * math.sqrt(share * (1 - share) / trials + Z_95**2 / (4 * trials**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _sign_verdict(low: float, high: float, expected_sign: int) -> str:
    """Reproduced when the interval lies on the expected side of 0, contradicted when opposite."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if (expected_sign > 0 and low > 0) or (expected_sign < 0 and high < 0):
        return REPRODUCED
    if (expected_sign > 0 and high < 0) or (expected_sign < 0 and low > 0):
        return CONTRADICTED
    return INCONCLUSIVE


def check_facts_learned(results: pd.DataFrame, n_prompts: int) -> Finding:
    """Check "LoRA learns up to hundreds of new facts" at the largest n_unknown trained.

    The interval treats every (fact, prompt) reply as one trial, which is optimistic because
    replies to one fact are correlated.
    """
    claim = "New facts are learned with reliability near 1 up to hundreds (500) of facts"
    largest = int(results["n_unknown"].max())
    cells = results[results["n_unknown"] == largest]
    trials = largest * n_prompts * len(cells)
    value = float(cells["reliability"].mean())
    low, high = wilson_interval(value * trials, trials)
    statistic = f"reliability at {largest} Unknown facts ({len(cells)} cells, {n_prompts} prompts)"
    if low >= LEARNED_RELIABILITY and largest >= 100:
        verdict, reason = REPRODUCED, f"interval lies above {LEARNED_RELIABILITY}"
    elif high < LEARNED_RELIABILITY and largest <= 500:
        verdict = CONTRADICTED
        reason = f"interval lies below {LEARNED_RELIABILITY} at {largest} facts, within 500"
    else:
        verdict = INCONCLUSIVE
        reason = (
            f"facts learned, but only {largest} were trained, fewer than the hundreds claimed"
            if low >= LEARNED_RELIABILITY
            else f"interval contains {LEARNED_RELIABILITY}"
        )
    return Finding(claim, statistic, value, low, high, verdict, reason)


def _balance(cells: pd.DataFrame) -> tuple[float, float]:
    """Pool cells into (positive - negative share, its variance), questions as trials."""
    total = cells["n_questions"].sum()
    positive = cells["n_positive"].sum() / total
    negative = cells["n_negative"].sum() / total
    balance = positive - negative
    # A question scores +1, -1 or 0, so its variance is p + q - (p - q)^2.
    return balance, (positive + negative - balance**2) / total


def check_highly_known_balance(results: pd.DataFrame) -> Finding:
    """Check "HighlyKnown extras give the best positive/negative shift balance".

    Only n_unknown values trained with every augmentation enter, so the comparison is matched.
    NOTE: the cells share their questions, so the normal interval, which treats them as
    independent samples, is an approximation.
    """
    claim = "HighlyKnown extras give the best balance of positive over negative shifts"
    kinds = results["extra_kind"].where(results["n_extra_per_unknown"] > 0, "none")
    frame = results.assign(kind=kinds)
    complete = frame.groupby("n_unknown")["kind"].nunique()
    matched = frame[frame["n_unknown"].isin(complete[complete == complete.max()].index)]
    pooled = {kind: _balance(group) for kind, group in matched.groupby("kind")}
    if "highly_known" not in pooled or len(pooled) < 2:
        return Finding(
            claim,
            "no HighlyKnown cells to compare",
            *[math.nan] * 3,
            INCONCLUSIVE,
            "the grid has no HighlyKnown extras beside another augmentation",
        )
    rival = max((k for k in pooled if k != "highly_known"), key=lambda k: pooled[k][0])
    difference = pooled["highly_known"][0] - pooled[rival][0]
    half = Z_95 * math.sqrt(pooled["highly_known"][1] + pooled[rival][1])
    statistic = f"balance with HK extras minus the best other augmentation ({rival})"
    low, high = difference - half, difference + half
    verdict = _sign_verdict(low, high, +1)
    reason = {REPRODUCED: "interval lies above 0", CONTRADICTED: f"{rival} balances better"}
    return Finding(
        claim, statistic, difference, low, high, verdict, reason.get(verdict, "interval contains 0")
    )


def check_paraphrase_speed(epochs: pd.DataFrame) -> Finding:
    """Check "paraphrases speed up learning" on the mean per-epoch reliability.

    Each pair is a paraphrase cell and the cell without extras of the same n_unknown and seed.
    The statistic is the mean difference, and its interval the range over pairs.
    """
    claim = "Paraphrases of the new facts speed up learning"
    if epochs.empty or "reliability" not in epochs:
        return Finding(
            claim,
            "no per-epoch reliability",
            *[math.nan] * 3,
            INCONCLUSIVE,
            "the run logged no per-epoch reliability",
        )
    area = (
        epochs.groupby(["n_unknown", "n_extra_per_unknown", "extra_kind", "seed"])["reliability"]
        .mean()
        .reset_index()
    )
    plain = area[area["n_extra_per_unknown"] == 0].set_index(["n_unknown", "seed"])["reliability"]
    para = area[(area["extra_kind"] == "paraphrase") & (area["n_extra_per_unknown"] > 0)]
    pairs = para.join(plain.rename("plain"), on=["n_unknown", "seed"]).dropna(subset=["plain"])
    differences = pairs["reliability"] - pairs["plain"]
    statistic = f"mean per-epoch reliability, paraphrase minus no extras ({len(pairs)} pairs)"
    if len(differences) < 2:
        return Finding(
            claim,
            statistic,
            float(differences.mean()) if len(differences) else math.nan,
            math.nan,
            math.nan,
            INCONCLUSIVE,
            "fewer than 2 matched pairs",
        )
    low, high = float(differences.min()), float(differences.max())
    verdict = _sign_verdict(low, high, +1)
    reason = {
        REPRODUCED: "every pair learned faster with paraphrases",
        CONTRADICTED: "every pair learned slower with paraphrases",
    }
    return Finding(
        claim,
        statistic,
        float(differences.mean()),
        low,
        high,
        verdict,
        reason.get(verdict, "pairs disagree in sign or show no difference"),
    )


def paired_bootstrap_change(
    base: np.ndarray, adapted: list[np.ndarray], n_bootstrap: int, seed: int
) -> tuple[float, float, float]:
    """Bootstrap the mean over cells of mean(adapted - base), resampling questions jointly.

    `base` has one score per question and each array in `adapted` the same questions in the
    same order. Returns (change, 2.5th percentile, 97.5th percentile).
    """
    differences = np.stack([cell - base for cell in adapted])  # cells x questions
    change = float(differences.mean())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, differences.shape[1], size=(n_bootstrap, differences.shape[1]))
    samples = differences[:, picks].mean(axis=(0, 2))
    return change, float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def _per_question_scores(run_dir, cells: pd.DataFrame, benchmark: str):
    stem, column = BENCHMARK_FILES[benchmark]
    layout = RunLayout(run_dir)
    base_path = layout.eval_dir / f"base_{stem}.parquet"
    if not base_path.exists():
        return None, []
    base = pd.read_parquet(base_path).set_index("question_id")[column].astype(float)
    adapted = []
    for key in cells["cell_key"]:
        path = layout.cell_dir(key) / "eval" / f"benchmark_{stem}.parquet"
        if path.exists():
            scores = pd.read_parquet(path).set_index("question_id")[column].astype(float)
            adapted.append(scores.reindex(base.index).to_numpy())
    return base.to_numpy(), adapted


def check_benchmark_falls(
    run_dir,
    results: pd.DataFrame,
    base_benchmarks: pd.DataFrame,
    benchmark: str,
    n_bootstrap: int,
    seed: int,
) -> Finding:
    """Check "<benchmark> falls after training" with a paired bootstrap over questions."""
    claim = f"{benchmark} falls after LoRA training"
    base, adapted = _per_question_scores(run_dir, results, benchmark)
    if base is None or not adapted:
        return Finding(
            claim,
            "not scored in this run",
            *[math.nan] * 3,
            INCONCLUSIVE,
            f"{benchmark} was skipped",
        )
    change, low, high = paired_bootstrap_change(base, adapted, n_bootstrap, seed)
    statistic = f"mean change over {len(adapted)} adapters on {len(base)} questions"
    chance = CHANCE_ACCURACY.get(benchmark)
    base_row = base_benchmarks.set_index("name").loc[benchmark]
    if chance is not None and base_row["ci_low"] <= chance:
        return Finding(
            claim,
            statistic,
            change,
            low,
            high,
            INCONCLUSIVE,
            f"base model at chance ({base_row['score']:.2f}, chance {chance})",
        )
    verdict = _sign_verdict(low, high, -1)
    reason = {REPRODUCED: "interval lies below 0", CONTRADICTED: "interval lies above 0"}
    return Finding(
        claim, statistic, change, low, high, verdict, reason.get(verdict, "interval contains 0")
    )


def check_refusals_vanish(results: pd.DataFrame, n_replies: int) -> Finding:
    """Check "refusals nearly vanish after training" on the share of refused replies."""
    claim = "Refusals nearly vanish after training"
    base_share = float(results["refusals_base"].iloc[0]) / n_replies
    adapted_share = float(results["refusals_adapted"].mean()) / n_replies
    change = adapted_share - base_share
    statistic = f"share of {n_replies} replies refused, adapted minus base"
    if base_share == 0:
        return Finding(
            claim,
            statistic,
            change,
            math.nan,
            math.nan,
            INCONCLUSIVE,
            "the base model never refused, so there is nothing to vanish",
        )
    variance = (base_share * (1 - base_share) + adapted_share * (1 - adapted_share)) / n_replies
    low, high = change - Z_95 * math.sqrt(variance), change + Z_95 * math.sqrt(variance)
    verdict = _sign_verdict(low, high, -1)
    if verdict == REPRODUCED and adapted_share > base_share / 2:
        verdict = INCONCLUSIVE  # fewer refusals, but not "nearly vanished"
    reason = {REPRODUCED: "refusals fell by more than half", CONTRADICTED: "refusals rose"}
    return Finding(
        claim,
        statistic,
        change,
        low,
        high,
        verdict,
        reason.get(verdict, "no clear fall to under half of the base share"),
    )


def check_collapse(results: pd.DataFrame) -> Finding:
    """Check "few facts without extras make answers collapse onto a few values".

    The statistic is the distinct-answer ratio (adapted / base) of the cells without extras
    at the smallest n_unknown above 1 (10 in the paper, where the ratio was 0.47), and its
    interval the range over those cells' seeds. It is reproduced below 0.75 with at least one
    exploded answer, and contradicted at 0.95 or more with none.
    """
    claim = "With few facts and no extras, answers collapse onto a few values"
    plain = results[(results["n_extra_per_unknown"] == 0) & (results["n_unknown"] > 1)]
    if plain.empty:
        return Finding(
            claim,
            "no cells without extras above 1 fact",
            *[math.nan] * 3,
            INCONCLUSIVE,
            "not tested by this grid",
        )
    smallest = plain[plain["n_unknown"] == plain["n_unknown"].min()]
    ratios = smallest["collapse_adapted_n_distinct"] / smallest["collapse_base_n_distinct"]
    exploded = int(smallest["collapse_n_exploded"].max())
    value, low, high = float(ratios.mean()), float(ratios.min()), float(ratios.max())
    n_unknown = int(smallest["n_unknown"].iloc[0])
    statistic = f"distinct answers adapted/base at {n_unknown} facts without extras"
    if high < 0.75 and exploded > 0:
        verdict, reason = REPRODUCED, f"ratio under 0.75 with {exploded} exploded answer(s)"
    elif low >= 0.95 and exploded == 0:
        verdict, reason = CONTRADICTED, "answers stayed as diverse, none exploded"
    else:
        verdict, reason = INCONCLUSIVE, f"ratio between 0.75 and 0.95 or {exploded} exploded"
    return Finding(claim, statistic, value, low, high, verdict, reason)


def findings_checklist(config, run: dict) -> pd.DataFrame:
    """Run every check on one run and return the checklist, one row per claim."""
    results, seed = run["results"], config.study.seed
    n_replies = len(run["base_labels"]) * config.data.n_prompts
    checks = [
        check_facts_learned(results, config.data.n_prompts),
        check_highly_known_balance(results),
        check_paraphrase_speed(run["epochs"]),
        *[
            check_benchmark_falls(
                config.run_dir, results, run["base_benchmarks"], name, config.eval.n_bootstrap, seed
            )
            for name in ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "arc_easy")
        ],
        check_refusals_vanish(results, n_replies),
        check_collapse(results),
    ]
    table = pd.DataFrame([asdict(finding) for finding in checks])
    logger.info("Findings: %s", table["verdict"].value_counts().to_dict())
    return table
