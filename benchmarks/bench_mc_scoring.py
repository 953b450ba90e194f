"""Time cached against naive multiple-choice scoring on the embedded SmolLM2-135M-Instruct model.

The cached path of `kp_utils.benchmarks` encodes each shared prompt once and scores the options
as batched continuations over its key/value cache. The naive path runs one full forward pass per
option. Both score the same questions, the script checks that their log-likelihoods agree
within --tolerance, and it prints a Markdown table of wall-clock times and speed-ups.

Run from the repository root:
    python benchmarks/bench_mc_scoring.py
It exits with status 1 when the two paths disagree.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers

from kp_utils import benchmarks
from kp_utils.models import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SUBJECTS = ["astronomy", "college_medicine", "high_school_biology", "world_religions"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="embedded:smollm2-135m-instruct",
        help="model for kp_utils.models.load_model",
    )
    parser.add_argument(
        "--subjects",
        nargs="+",
        default=DEFAULT_SUBJECTS,
        help="MMLU subjects to draw questions from",
    )
    parser.add_argument(
        "--n-per-subject", type=int, default=10, help="MMLU test questions per subject"
    )
    parser.add_argument("--n-truthfulqa", type=int, default=20, help="TruthfulQA questions")
    parser.add_argument("--n-arc", type=int, default=20, help="ARC-Challenge questions")
    parser.add_argument(
        "--truthfulqa-source",
        default=str(REPO_ROOT.parent / "shared" / "data" / "truthfulqa"),
        help="TruthfulQA CSV, its folder, or a hub dataset name",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed for the question samples")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="maximum allowed log-likelihood difference between the two paths",
    )
    return parser.parse_args()


def sample_questions(args: argparse.Namespace) -> dict[str, pd.DataFrame]:
    """Draw the MMLU, TruthfulQA and ARC questions that both paths score."""
    mmlu = benchmarks.load_mmlu(None, args.seed)
    mmlu = mmlu[mmlu["subject"].isin(args.subjects)]
    mmlu = mmlu.groupby("subject").sample(n=args.n_per_subject, random_state=args.seed)
    truthfulqa = benchmarks.load_truthfulqa(args.truthfulqa_source, args.n_truthfulqa, args.seed)
    arc = benchmarks.load_arc("ARC-Challenge", args.n_arc, args.seed)
    return {"MMLU 5-shot": mmlu, "TruthfulQA MC": truthfulqa, "ARC-Challenge": arc}


def loglikelihood_vector(name: str, scores: pd.DataFrame) -> np.ndarray:
    """Flatten every option log-likelihood of one scoring run into a vector."""
    if name.startswith("MMLU"):
        columns = [f"loglikelihood_{letter}" for letter in benchmarks.MMLU_LETTERS]
        return scores[columns].to_numpy().ravel()
    if name.startswith("TruthfulQA"):
        lists = list(scores["correct_loglikelihoods"]) + list(scores["incorrect_loglikelihoods"])
        return np.concatenate([np.asarray(values) for values in lists])
    return np.concatenate([np.asarray(values) for values in scores["loglikelihoods"]])


def scorer_for(name: str) -> Callable[..., pd.DataFrame]:
    if name.startswith("MMLU"):
        return benchmarks.score_mmlu
    if name.startswith("TruthfulQA"):
        return benchmarks.score_truthfulqa
    return benchmarks.score_arc


def time_scoring(
    model, tokenizer, name: str, questions: pd.DataFrame, batch_size: int, use_cache: bool
) -> tuple[pd.DataFrame, float]:
    """Score questions once and return (scores, wall-clock seconds)."""
    start = time.perf_counter()
    scores = scorer_for(name)(
        model, tokenizer, questions, batch_size=batch_size, show_progress=False, use_cache=use_cache
    )
    return scores, time.perf_counter() - start


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model, tokenizer = load_model(args.model)
    samples = sample_questions(args)

    # One untimed pass on each path, so one-off start-up costs do not land on either side.
    for use_cache in (True, False):
        time_scoring(
            model, tokenizer, "MMLU", samples["MMLU 5-shot"].iloc[:1], args.batch_size, use_cache
        )

    load_before = os.getloadavg()[0]
    rows, is_agreeing = [], True
    for name, questions in samples.items():
        cached, cached_s = time_scoring(model, tokenizer, name, questions, args.batch_size, True)
        naive, naive_s = time_scoring(model, tokenizer, name, questions, args.batch_size, False)
        cached_ll, naive_ll = loglikelihood_vector(name, cached), loglikelihood_vector(name, naive)
        max_difference = float(np.abs(cached_ll - naive_ll).max())
        is_agreeing &= max_difference <= args.tolerance
        rows.append(
            f"| {name} | {len(questions)} | {cached_ll.size} | {cached_s:.1f} | "
            f"{naive_s:.1f} | {naive_s / cached_s:.1f}x | {max_difference:.1e} |"
        )

    print(
        f"Model {args.model} on {next(model.parameters()).device}, CPU {cpu_name()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, batch size {args.batch_size}. One-minute load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after the timed runs."
    )
    print(
        "| Benchmark | Questions | Options scored | Cached (s) | Naive (s) | Speed-up "
        "| Max abs. log-likelihood difference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if not is_agreeing:
        print(f"FAILED: the paths differ by more than {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
