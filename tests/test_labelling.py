import pandas as pd
import pytest

from kp_utils.categories import KnowledgeCategory
from kp_utils.labelling import (
    REPLY_COLUMNS,
    SAMPLED_COLUMNS,
    SamplingSettings,
    ask_questions,
    ask_questions_sampled,
    count_categories,
    prompt_seed,
    select_exemplars,
    summarise_labels,
)
from kp_utils.prompts import PromptStyle

POOL = pd.DataFrame(
    {
        "fact_id": [f"t{i}" for i in range(8)],
        "question": [f"Trivia question {i}?" for i in range(8)],
        "answer": [f"answer {i}" for i in range(8)],
    }
)
FACTS = pd.DataFrame(
    {
        "fact_id": ["a", "b", "c"],
        "relation": ["capital", "capital", "symbol"],
        "domain": ["country", "country", "element"],
        "question": [
            "What is the capital of France?",
            "What is the capital of Peru?",
            "What is the symbol of gold?",
        ],
        "aliases": [["Paris"], ["Lima"], ["Au"]],
    }
)


def test_exemplars_fixed_by_seed():
    first = select_exemplars(POOL, 3, 2, seed=7)
    second = select_exemplars(POOL, 3, 2, seed=7)
    assert first == second
    assert first != select_exemplars(POOL, 3, 2, seed=8)


def test_exemplars_differ_between_prompts():
    prompts = select_exemplars(POOL, 3, 4, seed=0)
    assert len({tuple(e.question for e in p) for p in prompts}) == 3


def test_exemplars_exclude_ids():
    prompts = select_exemplars(POOL, 5, 4, seed=0, exclude_ids={"t0", "t1"})
    used = {e.question for p in prompts for e in p}
    assert "Trivia question 0?" not in used
    assert "Trivia question 1?" not in used


def test_exemplars_small_pool_raises():
    with pytest.raises(ValueError, match="exemplar pool has 2 usable facts"):
        select_exemplars(POOL.head(2), 1, 4, seed=0)


def replies_frame(correct_by_fact):
    rows = []
    for fact_id, hits in correct_by_fact.items():
        for prompt_index, hit in enumerate(hits):
            rows.append(
                {
                    "fact_id": fact_id,
                    "prompt_index": prompt_index,
                    "is_correct": hit,
                    "is_refusal": False,
                    "greedy_prob": 0.5,
                }
            )
    return pd.DataFrame(rows)


def test_summarise_labels_categories():
    replies = replies_frame({"a": [True, True], "b": [True, False], "c": [False, False]})
    labels = summarise_labels(replies, FACTS).set_index("fact_id")["category"]
    assert labels["a"] == KnowledgeCategory.HIGHLY_KNOWN.value
    assert labels["b"] == KnowledgeCategory.MAYBE_KNOWN.value
    assert labels["c"] == KnowledgeCategory.UNKNOWN.value


def test_count_categories_overall_and_by_relation():
    replies = replies_frame({"a": [True, True], "b": [True, False], "c": [False, False]})
    labels = summarise_labels(replies, FACTS)
    overall = count_categories(labels)
    assert overall.loc["all", "total"] == 3
    assert overall.loc["all", KnowledgeCategory.UNKNOWN.value] == 1
    by_relation = count_categories(labels, by="relation")
    assert by_relation.loc["capital", "total"] == 2
    assert by_relation.loc["symbol", KnowledgeCategory.HIGHLY_KNOWN.value] == 0


def test_ask_questions_scores_every_prompt(tiny_model, tokenizer):
    exemplar_sets = select_exemplars(POOL, 2, 2, seed=0)
    replies = ask_questions(
        tiny_model,
        tokenizer,
        FACTS,
        exemplar_sets,
        PromptStyle.CHAT,
        max_new_tokens=4,
        batch_size=2,
        show_progress=False,
    )
    assert list(replies.columns) == REPLY_COLUMNS
    assert len(replies) == 6
    assert sorted(replies["prompt_index"].unique()) == [0, 1]
    # A random model does not name these capitals, so every reply is scored wrong.
    assert not replies["is_correct"].any()
    assert replies["greedy_prob"].between(0, 1).all()


def sampled_frame(correct_by_fact, n_samples=4):
    rows = []
    for fact_id, counts in correct_by_fact.items():
        for prompt_index, count in enumerate(counts):
            rows.append(
                {
                    "fact_id": fact_id,
                    "prompt_index": prompt_index,
                    "n_samples": n_samples,
                    "n_correct_sampled": count,
                    "sampled_replies": ["x"] * n_samples,
                }
            )
    return pd.DataFrame(rows, columns=SAMPLED_COLUMNS)


def test_summarise_labels_sampled_hit_weakly_known():
    replies = replies_frame({"a": [False, False], "b": [True, False], "c": [False, False]})
    sampled = sampled_frame({"a": [0, 0], "c": [0, 2]})
    labels = summarise_labels(replies, FACTS, sampled).set_index("fact_id")
    assert labels.loc["a", "category"] == KnowledgeCategory.UNKNOWN.value
    assert labels.loc["b", "category"] == KnowledgeCategory.MAYBE_KNOWN.value
    assert labels.loc["c", "category"] == KnowledgeCategory.WEAKLY_KNOWN.value


def test_summarise_labels_sampled_counts_summed():
    replies = replies_frame({"a": [False, False], "b": [True, False], "c": [False, False]})
    sampled = sampled_frame({"a": [0, 0], "c": [1, 2]})
    counts = summarise_labels(replies, FACTS, sampled).set_index("fact_id")["n_correct_sampled"]
    assert counts["a"] == 0
    assert counts["c"] == 3
    # b has a greedy hit, so it was not sampled.
    assert pd.isna(counts["b"])


def test_summarise_labels_greedy_hit_ignores_samples():
    # Samples of a fact with a greedy hit cannot move it: it stays MaybeKnown.
    replies = replies_frame({"a": [True, False], "b": [True, True], "c": [False, False]})
    sampled = sampled_frame({"a": [3, 3], "b": [4, 4], "c": [0, 0]})
    labels = summarise_labels(replies, FACTS, sampled).set_index("fact_id")
    assert labels.loc["a", "category"] == KnowledgeCategory.MAYBE_KNOWN.value
    assert labels.loc["b", "category"] == KnowledgeCategory.HIGHLY_KNOWN.value
    assert pd.isna(labels.loc["a", "n_correct_sampled"])


def test_summarise_labels_sampling_off_na():
    replies = replies_frame({"a": [True, True], "b": [True, False], "c": [False, False]})
    labels = summarise_labels(replies, FACTS)
    assert labels["n_correct_sampled"].isna().all()
    assert str(labels["n_correct_sampled"].dtype) == "Int64"
    assert KnowledgeCategory.WEAKLY_KNOWN.value not in set(labels["category"])


def test_summarise_labels_unsampled_miss_warns(caplog):
    replies = replies_frame({"a": [True, True], "b": [False, False], "c": [False, False]})
    sampled = sampled_frame({"c": [1, 0]})
    labels = summarise_labels(replies, FACTS, sampled).set_index("fact_id")
    assert labels.loc["b", "category"] == KnowledgeCategory.UNKNOWN.value
    assert pd.isna(labels.loc["b", "n_correct_sampled"])
    assert "1 facts with no greedy hit have no sampled replies" in caplog.text


def sampling(n_samples, top_k, seed=0):
    return SamplingSettings(n_samples=n_samples, temperature=0.5, top_k=top_k, seed=seed)


def test_ask_questions_sampled_rows(tiny_model, tokenizer):
    exemplar_sets = select_exemplars(POOL, 2, 2, seed=0)
    sampled = ask_questions_sampled(
        tiny_model,
        tokenizer,
        FACTS,
        exemplar_sets,
        PromptStyle.CHAT,
        sampling(3, top_k=40),
        max_new_tokens=4,
        batch_size=4,
        show_progress=False,
    )
    assert list(sampled.columns) == SAMPLED_COLUMNS
    assert len(sampled) == 6
    assert (sampled["n_samples"] == 3).all()
    assert all(len(replies) == 3 for replies in sampled["sampled_replies"])
    # A random model does not name these capitals, so no sample is correct.
    assert (sampled["n_correct_sampled"] == 0).all()


def test_ask_questions_sampled_counts_hits(tiny_model, tokenizer):
    # The same seed repeats the same samples, so taking the first sample of each question as
    # its only alias makes exactly that one of the 3 samples correct on the second run.
    exemplar_sets = select_exemplars(POOL, 1, 2, seed=0)
    settings = dict(max_new_tokens=4, batch_size=4, show_progress=False)
    style = PromptStyle.CHAT
    seeded = sampling(3, top_k=40, seed=1)
    first = ask_questions_sampled(
        tiny_model, tokenizer, FACTS, exemplar_sets, style, seeded, **settings
    )
    planted = FACTS.assign(aliases=[[replies[0]] for replies in first["sampled_replies"]])
    second = ask_questions_sampled(
        tiny_model, tokenizer, planted, exemplar_sets, style, seeded, **settings
    )
    assert list(first["n_correct_sampled"]) == [0, 0, 0]
    assert list(second["n_correct_sampled"]) == [1, 1, 1]


def test_ask_questions_sampled_empty_questions(tiny_model, tokenizer):
    exemplar_sets = select_exemplars(POOL, 2, 2, seed=0)
    sampled = ask_questions_sampled(
        tiny_model,
        tokenizer,
        FACTS.iloc[:0],
        exemplar_sets,
        PromptStyle.CHAT,
        sampling(3, top_k=40),
        max_new_tokens=4,
        batch_size=4,
        show_progress=False,
    )
    assert list(sampled.columns) == SAMPLED_COLUMNS
    assert sampled.empty


def test_prompt_seed_differs_between_prompts():
    assert prompt_seed(0, 0) != prompt_seed(0, 1)
    assert prompt_seed(0, 1) == prompt_seed(0, 1)
