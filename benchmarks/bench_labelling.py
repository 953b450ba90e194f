"""Time cached batched labelling against one `generate` call per question on SmolLM2-135M-Instruct.

The cached path is `kp_utils.labelling.ask_questions`, which calls `generate_greedy`: it encodes
the few-shot prefix of each prompt once and decodes the questions in batches over copies of its
key/value cache. The naive path is `kp_utils.generation.generate_naive`: one `model.generate`
call per question and prompt on the full prompt. Both label the same questions under the same
prompts. The script counts the replies whose text differs between the paths, prints them, and
prints answers per second for each path and their ratio.

Run from the repository root:
    python benchmarks/bench_labelling.py
It exits with status 1 when any reply differs.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import transformers

from kp_utils.facts import build_fact_base, load_triviaqa
from kp_utils.generation import generate_naive, stop_token_ids
from kp_utils.labelling import ask_questions, select_exemplars
from kp_utils.models import load_model
from kp_utils.prompts import Exemplar, PromptStyle, encode_prompt


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="embedded:smollm2-135m-instruct",
        help="model for kp_utils.models.load_model",
    )
    parser.add_argument(
        "--prompt-style",
        default="chat",
        choices=[style.value for style in PromptStyle],
        help="prompt format; chat for instruction-tuned models",
    )
    parser.add_argument("--n-questions", type=int, default=200, help="fact-base questions")
    parser.add_argument("--n-prompts", type=int, default=1, help="few-shot prompts per question")
    parser.add_argument("--n-shots", type=int, default=4, help="exemplars per prompt")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="questions per forward pass (cached path)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="reply length limit")
    parser.add_argument("--seed", type=int, default=0, help="seed for questions and exemplars")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads; default: torch's own choice"
    )
    return parser.parse_args()


def sample_questions(n_questions: int, seed: int) -> pd.DataFrame:
    """Draw questions from the embedded fact base by seed."""
    facts = build_fact_base()
    sample = facts.sample(n=min(n_questions, len(facts)), random_state=seed)
    return sample[["fact_id", "question", "aliases"]].reset_index(drop=True)


def label_naive(
    model, tokenizer, questions, exemplar_sets: list[list[Exemplar]], style, max_new_tokens
) -> list[str]:
    """Return the greedy reply texts, prompt by prompt, from one generate call per question."""
    stops = stop_token_ids(tokenizer, stop_at_newline=style is PromptStyle.PLAIN)
    texts = []
    for exemplars in exemplar_sets:
        prompts = []
        for question in questions["question"]:
            prefix, suffix = encode_prompt(tokenizer, exemplars, question, style)
            prompts.append(prefix + suffix)
        replies = generate_naive(model, tokenizer, prompts, max_new_tokens, stops)
        texts.extend(reply.text for reply in replies)
    return texts


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def time_paths(args, model, tokenizer, questions, exemplar_sets, style) -> dict:
    """Label the questions on both paths; return replies, seconds and load averages."""

    def run_cached(chosen: pd.DataFrame) -> list[str]:
        replies = ask_questions(
            model,
            tokenizer,
            chosen,
            exemplar_sets,
            style,
            args.max_new_tokens,
            args.batch_size,
            show_progress=False,
        )
        return list(replies["reply"])

    def run_naive(chosen: pd.DataFrame) -> list[str]:
        return label_naive(model, tokenizer, chosen, exemplar_sets, style, args.max_new_tokens)

    # One untimed question on each path, so one-off start-up costs land on neither side.
    run_cached(questions.iloc[:1])
    run_naive(questions.iloc[:1])

    result = {"load_before": os.getloadavg()[0]}
    for name, run in (("cached", run_cached), ("naive", run_naive)):
        start = time.perf_counter()
        result[name] = run(questions)
        result[f"{name}_s"] = time.perf_counter() - start
    result["load_after"] = os.getloadavg()[0]
    return result


def print_report(args, model, questions, style, result: dict) -> int:
    """Print the setup, a Markdown table and every differing reply; return the exit status."""
    cached, naive = result["cached"], result["naive"]
    n_answers = len(cached)
    mismatches = [
        (i, fast, slow) for i, (fast, slow) in enumerate(zip(cached, naive)) if fast != slow
    ]
    parameter = next(model.parameters())
    print(
        f"Model {args.model} on {parameter.device} ({parameter.dtype}), CPU {cpu_name()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, transformers {transformers.__version__}. {len(questions)} "
        f"questions x {args.n_prompts} prompt(s) ({args.n_shots}-shot, {style.value} style), "
        f"max {args.max_new_tokens} new tokens, batch size {args.batch_size}, seed {args.seed}. "
        f"One-minute load average {result['load_before']:.1f} before and "
        f"{result['load_after']:.1f} after the timed runs."
    )
    print("| Path | Answers | Time (s) | Answers/s |")
    print("|---|---:|---:|---:|")
    for name, label in (("cached", "cached (ask_questions)"), ("naive", "naive (generate_naive)")):
        seconds = result[f"{name}_s"]
        print(f"| {label} | {n_answers} | {seconds:.1f} | {n_answers / seconds:.2f} |")
    print(f"Speed-up cached / naive: {result['naive_s'] / result['cached_s']:.1f}x")
    print(f"Replies that differ: {len(mismatches)} of {n_answers}")
    for index, fast, slow in mismatches:
        prompt_index, row = divmod(index, len(questions))
        question = questions["question"].iloc[row]
        print(f"  prompt {prompt_index}, {question!r}: cached {fast!r}, naive {slow!r}")
    return 1 if mismatches else 0


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    style = PromptStyle(args.prompt_style)
    questions = sample_questions(args.n_questions, args.seed)
    pool = load_triviaqa(None, args.seed)
    exemplar_sets = select_exemplars(pool, args.n_prompts, args.n_shots, args.seed)
    result = time_paths(args, model, tokenizer, questions, exemplar_sets, style)
    return print_report(args, model, questions, style, result)


if __name__ == "__main__":
    sys.exit(main())
