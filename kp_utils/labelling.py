"""Ask questions under P few-shot prompts and label each one HighlyKnown, MaybeKnown or Unknown.

Each prompt index p has its own fixed set of exemplars, drawn by (seed, p) from an exemplar pool
(TriviaQA by default). Every question is asked under every prompt with greedy decoding; a reply is
correct when one of the question's aliases appears in it (see `kp_utils.matching`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kp_utils.categories import CATEGORY_RULE_VERSION, KnowledgeCategory, label_category
from kp_utils.generation import generate_greedy, stop_token_ids
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
    frames = []
    bar = tqdm(
        total=len(questions) * len(exemplar_sets), desc="ask questions", disable=not show_progress
    )
    for prompt_index, exemplars in enumerate(exemplar_sets):
        encoded = [encode_prompt(tokenizer, exemplars, q, style) for q in questions["question"]]
        prefix_ids = encoded[0][0]
        suffixes = [suffix for _, suffix in encoded]
        # Sorting by length keeps padding inside a batch small; the order is restored below.
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        replies = generate_greedy(
            model,
            tokenizer,
            prefix_ids,
            [suffixes[i] for i in order],
            max_new_tokens,
            stops,
            batch_size,
        )
        by_row = dict(zip(order, replies))
        frames.append(
            _score_replies(questions, [by_row[i] for i in range(len(suffixes))], prompt_index)
        )
        bar.update(len(questions))
    bar.close()
    return pd.concat(frames, ignore_index=True)


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


def summarise_labels(replies: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    """Turn per-prompt replies into one row per fact with its knowledge category.

    Returns columns fact_id, relation, domain, n_correct, n_prompts, category, n_refusals,
    mean_greedy_prob, category_rule_version and matching_version.
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
    grouped["category"] = [
        label_category(int(c), int(p)).value
        for c, p in zip(grouped["n_correct"], grouped["n_prompts"])
    ]
    labels = facts[["fact_id", "relation", "domain"]].merge(grouped, on="fact_id", how="inner")
    labels["category_rule_version"] = CATEGORY_RULE_VERSION
    labels["matching_version"] = MATCHING_VERSION
    return labels


def count_categories(labels: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Count facts per knowledge category (the paper's Table 1), overall or per `by` column."""
    order = [category.value for category in KnowledgeCategory]
    if by is None:
        counts = labels["category"].value_counts().reindex(order, fill_value=0).to_frame("all").T
    else:
        counts = labels.groupby([by, "category"]).size().unstack("category", fill_value=0)
        counts = counts.reindex(columns=order, fill_value=0)
    counts["total"] = counts.sum(axis=1)
    return counts
