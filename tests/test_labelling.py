import pandas as pd
import pytest

from kp_utils.categories import KnowledgeCategory
from kp_utils.labelling import (
    REPLY_COLUMNS,
    ask_questions,
    count_categories,
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
