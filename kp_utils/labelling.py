"""Ask questions under P few-shot prompts and label each one HighlyKnown, MaybeKnown, WeaklyKnown
or Unknown.

Each prompt index p has its own fixed set of exemplars, drawn by (seed, p) from an exemplar pool
(TriviaQA by default). Every question is asked under every prompt with greedy decoding; a reply is
correct when one of the question's aliases appears in it (see `kp_utils.matching`).

With WeaklyKnown on, `ask_questions_sampled` also samples several replies per prompt for the
questions that no greedy prompt got right, and `summarise_labels` marks those with at least one
correct sample WeaklyKnown (Gekhman et al., 2024).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kp_utils.categories import CATEGORY_RULE_VERSION, KnowledgeCategory, label_category
from kp_utils.generation import generate_greedy, generate_sampled, stop_token_ids
from kp_utils.matching import MATCHING_VERSION, alias_in_reply, is_refusal
from kp_utils.prompts import Exemplar, PromptStyle, encode_prompt, extract_answer

logger = logging.getLogger(__name__)

REPLY_COLUMNS = [
    "fact_id",
    "prompt_index",
    "question",
    "reply",
    "extracted_answer",
    "is_correct",
    "is_refusal",
    "greedy_prob",
    "is_stopped",
]
SAMPLED_COLUMNS = ["fact_id", "prompt_index", "n_samples", "n_correct_sampled", "sampled_replies"]


@dataclass(frozen=True)
class SamplingSettings:
    """Settings of `ask_questions_sampled` (see `kp_utils.generation.generate_sampled`)."""

    n_samples: int  # sampled replies per question and prompt
    temperature: float
    top_k: int
    seed: int  # each prompt derives its own seed from this one (see `prompt_seed`)


def select_exemplars(
    pool: pd.DataFrame, n_prompts: int, n_shots: int, seed: int, exclude_ids: set[str] = frozenset()
) -> list[list[Exemplar]]:
    """Draw `n_shots` exemplars for each of `n_prompts` prompts, fixed by (seed, prompt index).

    Facts in `exclude_ids` never serve as exemplars, so no question is shown with its own answer.
    """
    candidates = pool[~pool["fact_id"].isin(exclude_ids)]
    if len(candidates) < n_shots:
        raise ValueError(
            f"The exemplar pool has {len(candidates)} usable facts but each prompt needs "
            f"{n_shots}; "
            "raise data.n_triviaqa or lower data.n_shots."
        )
    prompts = []
    for prompt_index in range(n_prompts):
        rng = np.random.default_rng([seed, prompt_index])
        rows = candidates.iloc[rng.choice(len(candidates), size=n_shots, replace=False)]
        prompts.append([Exemplar(q, a) for q, a in zip(rows["question"], rows["answer"])])
    return prompts


def ask_questions(
    model,
    tokenizer,
    questions: pd.DataFrame,
    exemplar_sets: list[list[Exemplar]],
    style: PromptStyle,
    max_new_tokens: int,
    batch_size: int,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Ask every question under every prompt and score the greedy replies.

    Args:
        questions: columns fact_id, question, aliases (list of accepted answers).
        exemplar_sets: one list of exemplars per prompt index.

    Returns:
        One row per (fact_id, prompt_index) with the columns in REPLY_COLUMNS.
    """
    stops = stop_token_ids(tokenizer, stop_at_newline=style is PromptStyle.PLAIN)

    def generate(prompt_index: int, prefix_ids: list[int], suffixes: list[list[int]]):
        return generate_greedy(
            model, tokenizer, prefix_ids, suffixes, max_new_tokens, stops, batch_size
        )

    frames = [
        _score_replies(questions, replies, prompt_index)
        for prompt_index, replies in _generate_per_prompt(
            tokenizer, questions, exemplar_sets, style, generate, "ask questions", show_progress
        )
    ]
    return pd.concat(frames, ignore_index=True)


def ask_questions_sampled(
    model,
    tokenizer,
    questions: pd.DataFrame,
    exemplar_sets: list[list[Exemplar]],
    style: PromptStyle,
    sampling: SamplingSettings,
    max_new_tokens: int,
    batch_size: int,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Sample replies to every question under every prompt and count the correct ones.

    Args:
        questions: columns fact_id, question, aliases; usually only the questions that no
            greedy prompt got right, because only those can become WeaklyKnown.
        exemplar_sets: the same exemplar sets as the greedy pass.
        batch_size: rows per forward pass, where each (question, sample) pair is one row.

    Returns:
        One row per (fact_id, prompt_index) with the columns in SAMPLED_COLUMNS;
        sampled_replies lists the raw reply texts.
    """
    if questions.empty:
        return pd.DataFrame(columns=SAMPLED_COLUMNS)
    stops = stop_token_ids(tokenizer, stop_at_newline=style is PromptStyle.PLAIN)

    def generate(prompt_index: int, prefix_ids: list[int], suffixes: list[list[int]]):
        return generate_sampled(
            model,
            tokenizer,
            prefix_ids,
            suffixes,
            sampling.n_samples,
            sampling.temperature,
            sampling.top_k,
            max_new_tokens,
            stops,
            prompt_seed(sampling.seed, prompt_index),
            batch_size,
        )

    frames = [
        _score_samples(questions, samples, prompt_index)
        for prompt_index, samples in _generate_per_prompt(
            tokenizer, questions, exemplar_sets, style, generate, "sample replies", show_progress
        )
    ]
    return pd.concat(frames, ignore_index=True)


def _generate_per_prompt(
    tokenizer,
    questions: pd.DataFrame,
    exemplar_sets: list[list[Exemplar]],
    style: PromptStyle,
    generate: Callable[[int, list[int], list[list[int]]], list],
    desc: str,
    show_progress: bool,
) -> Iterator[tuple[int, list]]:
    """Yield (prompt index, one output per question in question order) for every prompt.

    `generate(prompt_index, prefix_ids, suffixes)` receives the suffixes sorted by length, which
    keeps padding inside a batch small; its outputs are put back in question order here.
    """
    bar = tqdm(total=len(questions) * len(exemplar_sets), desc=desc, disable=not show_progress)
    for prompt_index, exemplars in enumerate(exemplar_sets):
        encoded = [encode_prompt(tokenizer, exemplars, q, style) for q in questions["question"]]
        suffixes = [suffix for _, suffix in encoded]
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        outputs = generate(prompt_index, encoded[0][0], [suffixes[i] for i in order])
        by_row = dict(zip(order, outputs))
        yield prompt_index, [by_row[i] for i in range(len(suffixes))]
        bar.update(len(questions))
    bar.close()


def prompt_seed(seed: int, prompt_index: int) -> int:
    """Derive the sampling seed of one prompt, so prompts do not share random draws."""
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0])


def _score_samples(questions: pd.DataFrame, samples, prompt_index: int) -> pd.DataFrame:
    texts = [[reply.text for reply in replies] for replies in samples]
    n_correct = [
        sum(alias_in_reply(extract_answer(text), list(aliases)) for text in replies)
        for replies, aliases in zip(texts, questions["aliases"])
    ]
    return pd.DataFrame(
        {
            "fact_id": questions["fact_id"].to_numpy(),
            "prompt_index": prompt_index,
            "n_samples": [len(replies) for replies in texts],
            "n_correct_sampled": n_correct,
            "sampled_replies": texts,
        }
    )


def _score_replies(questions: pd.DataFrame, replies, prompt_index: int) -> pd.DataFrame:
    texts = [reply.text for reply in replies]
    return pd.DataFrame(
        {
            "fact_id": questions["fact_id"].to_numpy(),
            "prompt_index": prompt_index,
            "question": questions["question"].to_numpy(),
            "reply": texts,
            "extracted_answer": [extract_answer(text) for text in texts],
            "is_correct": [
                alias_in_reply(extract_answer(text), list(aliases))
                for text, aliases in zip(texts, questions["aliases"])
            ],
            "is_refusal": [is_refusal(text) for text in texts],
            "greedy_prob": [reply.prob for reply in replies],
            "is_stopped": [reply.is_stopped for reply in replies],
        }
    )


def summarise_labels(
    replies: pd.DataFrame, facts: pd.DataFrame, sampled: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Turn per-prompt replies into one row per fact with its knowledge category.

    Args:
        replies: greedy replies, one row per (fact_id, prompt_index), as from `ask_questions`.
        sampled: sampled-reply counts from `ask_questions_sampled`, or None when WeaklyKnown is
            off. Only facts with no greedy hit use it.

    Returns columns fact_id, relation, domain, n_correct, n_prompts, n_refusals, mean_greedy_prob,
    n_correct_sampled, category, category_rule_version and matching_version. n_correct_sampled
    is the nullable integer count of correct samples over all prompts, and <NA> for facts that
    were not sampled: all facts when `sampled` is None, and facts with a greedy hit.
    """
    grouped = (
        replies.groupby("fact_id", sort=False)
        .agg(
            n_correct=("is_correct", "sum"),
            n_prompts=("prompt_index", "nunique"),
            n_refusals=("is_refusal", "sum"),
            mean_greedy_prob=("greedy_prob", "mean"),
        )
        .reset_index()
    )
    grouped["n_correct_sampled"] = _count_sampled_hits(grouped, sampled)
    grouped["category"] = [
        label_category(int(c), int(p), None if pd.isna(s) else int(s)).value
        for c, p, s in zip(grouped["n_correct"], grouped["n_prompts"], grouped["n_correct_sampled"])
    ]
    labels = facts[["fact_id", "relation", "domain"]].merge(grouped, on="fact_id", how="inner")
    labels["category_rule_version"] = CATEGORY_RULE_VERSION
    labels["matching_version"] = MATCHING_VERSION
    return labels


def _count_sampled_hits(grouped: pd.DataFrame, sampled: pd.DataFrame | None) -> pd.Series:
    """Sum correct samples per fact for facts with no greedy hit; <NA> for the rest."""
    counts = pd.Series(pd.NA, index=grouped.index, dtype="Int64")
    if sampled is None:
        return counts
    totals = sampled.groupby("fact_id")["n_correct_sampled"].sum()
    is_greedy_miss = grouped["n_correct"] == 0
    missing = sorted(set(grouped.loc[is_greedy_miss, "fact_id"]) - set(totals.index))
    if missing:
        logger.warning(
            "%d facts with no greedy hit have no sampled replies and stay Unknown, e.g. %s",
            len(missing),
            missing[:5],
        )
    counts[is_greedy_miss] = grouped.loc[is_greedy_miss, "fact_id"].map(totals).astype("Int64")
    return counts


def count_categories(labels: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Count facts per knowledge category, overall or per `by` column.

    This is Table 1 of Pletenev et al. (2025).
    """
    order = [category.value for category in KnowledgeCategory]
    if by is None:
        counts = labels["category"].value_counts().reindex(order, fill_value=0).to_frame("all").T
    else:
        counts = labels.groupby([by, "category"]).size().unstack("category", fill_value=0)
        counts = counts.reindex(columns=order, fill_value=0)
    counts["total"] = counts.sum(axis=1)
    return counts
