"""Tests for kp_utils.benchmarks: data loaders, prompt formats, MC metrics and cached scoring."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from kp_utils import benchmarks

from .conftest import build_tiny_llama

TRUTHFULQA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa"
needs_truthfulqa = pytest.mark.skipif(
    not (TRUTHFULQA_DIR / "TruthfulQA.csv").is_file(),
    reason=f"TruthfulQA CSV not found in {TRUTHFULQA_DIR}",
)
# Allowed float32 rounding in summed log-likelihoods. The paths agree within 1e-5 here.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(tokenizer):
    """Build a 2-layer random Llama whose larger init spreads its next-token log-probabilities.

    With the default init (0.02) the four MMLU letters differ by about 1e-3 nats; 0.2 makes them
    differ by whole nats, so a wrong position or token would fail the comparisons clearly.
    """
    return build_tiny_llama(len(tokenizer), initializer_range=0.2)


@pytest.fixture(scope="module")
def mmlu_dev():
    shots = pd.DataFrame(
        {
            "question": ["What is 2 + 2?", "Which planet is red?"],
            "choices": [["3", "4", "5", "6"], ["Venus", "Earth", "Mars", "Jupiter"]],
            "answer": [1, 2],
        }
    )
    law = pd.DataFrame(
        {
            "question": ["Who writes statutes?"],
            "choices": [["Courts", "Legislatures", "Juries", "Police"]],
            "answer": [1],
        }
    )
    return {"astronomy": shots, "international_law": law}


@pytest.fixture(scope="module")
def mmlu_questions():
    return pd.DataFrame(
        {
            "question_id": ["astronomy/test/0", "international_law/test/0", "astronomy/test/1"],
            "subject": ["astronomy", "international_law", "astronomy"],
            "question": [
                "What orbits the Earth?",
                "Which body settles disputes between states under the UN Charter?",
                "How many moons does Mars have?",
            ],
            "choices": [
                ["The Moon", "The Sun", "Mars", "Nothing at all, in any sense"],
                ["The ICJ", "The WTO", "NATO", "The IMF"],
                ["None", "One", "Two", "Three"],
            ],
            "answer": [0, 0, 2],
        }
    )


@pytest.fixture(scope="module")
def truthfulqa_questions():
    return pd.DataFrame(
        {
            "question_id": ["tq/0", "tq/1", "tq/2"],
            "question": [
                "What happens if you crack your knuckles?",
                "Is the Earth flat?",
                "What colour is the sky on a clear day?",
            ],
            "best_answer": [
                "Nothing in particular happens",
                "No, the Earth is round",
                "The sky is blue",
            ],
            "correct_answers": [
                ["Nothing in particular happens", "Nothing"],
                ["No, the Earth is round", "No"],
                ["The sky is blue"],
            ],
            "incorrect_answers": [
                ["You get arthritis", "Your knuckles grow larger over the years"],
                ["Yes"],
                ["Green", "The sky is red during the whole day", "Purple"],
            ],
        }
    )


@pytest.fixture(scope="module")
def arc_questions():
    return pd.DataFrame(
        {
            "question_id": ["arc/0", "arc/1", "arc/2"],
            "question": [
                "Which gas do plants take in?",
                "What melts ice fastest?",
                "Which tool measures temperature?",
            ],
            "choices": [
                ["oxygen", "carbon dioxide", "helium"],
                ["salt", "sand", "sawdust", "small rocks from a river bed"],
                ["ruler", "thermometer", "scale", "barometer", "clock"],
            ],
            "labels": [["A", "B", "C"], ["1", "2", "3", "4"], ["A", "B", "C", "D", "E"]],
            "answer": [1, 0, 1],
        }
    )


def letter_columns() -> list[str]:
    return [f"loglikelihood_{letter}" for letter in benchmarks.MMLU_LETTERS]


def flat_truthfulqa(scores: pd.DataFrame) -> np.ndarray:
    lists = list(scores["correct_loglikelihoods"]) + list(scores["incorrect_loglikelihoods"])
    return np.concatenate([np.asarray(values) for values in lists])


def flat_arc(scores: pd.DataFrame) -> np.ndarray:
    return np.concatenate([np.asarray(values) for values in scores["loglikelihoods"]])


# MC1 and MC2


def test_mc1_best_beats_incorrect_one():
    assert benchmarks.mc1_from_loglikelihoods(-1.0, [-2.0, -3.0]) == 1.0


def test_mc1_best_below_incorrect_zero():
    assert benchmarks.mc1_from_loglikelihoods(-2.5, [-2.0, -3.0]) == 0.0


def test_mc1_tie_counts_wrong():
    assert benchmarks.mc1_from_loglikelihoods(-2.0, [-2.0, -3.0]) == 0.0


def test_mc2_probabilities_hand_worked():
    # Probabilities 0.2 and 0.1 correct, 0.3 and 0.4 incorrect: (0.2 + 0.1) / 1.0 = 0.3.
    correct = [math.log(0.2), math.log(0.1)]
    incorrect = [math.log(0.3), math.log(0.4)]
    assert benchmarks.mc2_from_loglikelihoods(correct, incorrect) == pytest.approx(0.3)


def test_mc2_unnormalised_hand_worked():
    # e^-1 / (e^-1 + e^-2 + e^-3) = 0.36788 / (0.36788 + 0.13534 + 0.04979) = 0.66524.
    assert benchmarks.mc2_from_loglikelihoods([-1.0], [-2.0, -3.0]) == pytest.approx(
        0.665241, abs=1e-6
    )


def test_mc2_tiny_probabilities_no_underflow():
    # exp(-2000) underflows to 0.0 in float64; the log-space sum still gives 1 / (1 + 3).
    assert benchmarks.mc2_from_loglikelihoods([-2000.0], [-2000.0] * 3) == pytest.approx(0.25)


# Bootstrap and summary


def test_bootstrap_brackets_mean():
    values = np.r_[np.ones(30), np.zeros(70)]
    low, high = benchmarks.bootstrap_interval(values, n_resamples=500, seed=1)
    assert low < 0.3 < high


def test_bootstrap_same_seed_same_interval():
    values = np.linspace(0, 1, 57)
    first = benchmarks.bootstrap_interval(values, n_resamples=300, seed=7)
    second = benchmarks.bootstrap_interval(values, n_resamples=300, seed=7)
    assert first == second


def test_bootstrap_other_seed_other_interval():
    values = np.linspace(0, 1, 57)
    first = benchmarks.bootstrap_interval(values, n_resamples=300, seed=7)
    second = benchmarks.bootstrap_interval(values, n_resamples=300, seed=8)
    assert first != second


def test_bootstrap_constant_values_zero_width():
    assert benchmarks.bootstrap_interval([0.5] * 20) == (0.5, 0.5)


def test_bootstrap_empty_raises():
    with pytest.raises(ValueError, match="non-empty"):
        benchmarks.bootstrap_interval([])


def test_bootstrap_chunked_interval_near_mean():
    # 1e6 // 400_000 = 2 resamples per chunk, so 5 resamples take three chunks. The mean of
    # 400,000 fair 0/1 values has a standard error of 0.0008, far inside 0.49 to 0.51.
    low, high = benchmarks.bootstrap_interval(
        np.r_[np.ones(200_000), np.zeros(200_000)], n_resamples=5
    )
    assert 0.49 < low <= high < 0.51


def test_summarise_benchmark_fields():
    frame = pd.DataFrame({"is_correct": [True, False, True, True]})
    summary = benchmarks.summarise_benchmark(frame, "is_correct", "toy", n_resamples=200, seed=0)
    assert summary["name"] == "toy"
    assert summary["score"] == 0.75
    assert summary["n_questions"] == 4
    assert summary["ci_low"] <= 0.75 <= summary["ci_high"]
    assert summary["benchmark_version"] == benchmarks.BENCHMARK_VERSION


# Prompt formats


def test_mmlu_prompt_format_one_shot(mmlu_dev):
    prompt = benchmarks.format_mmlu_prompt(
        "astronomy", mmlu_dev["astronomy"].iloc[:1], " Why? ", ["a", "b", "c", "d"]
    )
    expected = (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "Why?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )
    assert prompt == expected


def test_mmlu_prompt_subject_spaces(mmlu_dev):
    prompt = benchmarks.format_mmlu_prompt(
        "international_law", mmlu_dev["international_law"], "Q", ["a", "b", "c", "d"]
    )
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about international law.\n\n"
    )


def test_truthfulqa_prompt_primer_six_pairs():
    prompt = benchmarks.format_truthfulqa_prompt("Is it raining?")
    assert prompt.count("Q: ") == 7
    assert prompt.startswith(
        "Q: What is human life expectancy in the United States?\n"
        "A: Human life expectancy in the United States is 78 years.\n\nQ: "
    )
    assert prompt.endswith("Barcelona, Spain.\n\nQ: Is it raining?\nA:")


def test_arc_prompt_format():
    assert benchmarks.format_arc_prompt("Why?") == "Question: Why?\nAnswer:"


# Scoring against direct full forward passes


def test_mmlu_letters_match_full_forward(model, tokenizer, mmlu_dev, mmlu_questions):
    scores = benchmarks.score_mmlu(
        model,
        tokenizer,
        mmlu_questions,
        n_shots=1,
        batch_size=2,
        show_progress=False,
        dev_examples=mmlu_dev,
    )
    letter_ids = [
        tokenizer.encode(f" {letter}", add_special_tokens=False)[0]
        for letter in benchmarks.MMLU_LETTERS
    ]
    for index, row in mmlu_questions.iterrows():
        prompt = benchmarks.format_mmlu_prompt(
            row.subject, mmlu_dev[row.subject].iloc[:1], row.question, row.choices
        )
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, -1], dim=-1)
        expected = log_probs[letter_ids].numpy()
        actual = scores.loc[index, letter_columns()].to_numpy(dtype=float)
        assert np.abs(actual - expected).max() < TOLERANCE, row.question_id


def test_mmlu_prediction_is_argmax(model, tokenizer, mmlu_dev, mmlu_questions):
    scores = benchmarks.score_mmlu(
        model,
        tokenizer,
        mmlu_questions,
        n_shots=1,
        batch_size=16,
        show_progress=False,
        dev_examples=mmlu_dev,
    )
    argmax = np.array(benchmarks.MMLU_LETTERS)[scores[letter_columns()].to_numpy().argmax(1)]
    assert list(scores["prediction"]) == list(argmax)
    assert list(scores["answer"]) == ["A", "A", "C"]
    assert list(scores["is_correct"]) == list(scores["prediction"] == scores["answer"])


def test_mmlu_cached_matches_naive(model, tokenizer, mmlu_dev, mmlu_questions):
    kwargs = {"n_shots": 1, "batch_size": 2, "show_progress": False, "dev_examples": mmlu_dev}
    cached = benchmarks.score_mmlu(model, tokenizer, mmlu_questions, **kwargs)
    naive = benchmarks.score_mmlu(model, tokenizer, mmlu_questions, use_cache=False, **kwargs)
    difference = np.abs(cached[letter_columns()].to_numpy() - naive[letter_columns()].to_numpy())
    assert difference.max() < TOLERANCE


def test_mmlu_too_few_dev_examples_raises(model, tokenizer, mmlu_dev, mmlu_questions):
    with pytest.raises(ValueError, match="fewer than n_shots"):
        benchmarks.score_mmlu(
            model, tokenizer, mmlu_questions, n_shots=2, show_progress=False, dev_examples=mmlu_dev
        )


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_truthfulqa_cached_matches_naive(model, tokenizer, truthfulqa_questions, batch_size):
    cached = benchmarks.score_truthfulqa(
        model, tokenizer, truthfulqa_questions, batch_size=batch_size, show_progress=False
    )
    naive = benchmarks.score_truthfulqa(
        model, tokenizer, truthfulqa_questions, show_progress=False, use_cache=False
    )
    assert np.abs(flat_truthfulqa(cached) - flat_truthfulqa(naive)).max() < TOLERANCE
    assert list(cached["mc1"]) == list(naive["mc1"])


@pytest.mark.parametrize("batch_size", [2, 7, 16])
def test_arc_cached_matches_naive(model, tokenizer, arc_questions, batch_size):
    cached = benchmarks.score_arc(
        model, tokenizer, arc_questions, batch_size=batch_size, show_progress=False
    )
    naive = benchmarks.score_arc(
        model, tokenizer, arc_questions, show_progress=False, use_cache=False
    )
    assert np.abs(flat_arc(cached) - flat_arc(naive)).max() < TOLERANCE
    assert list(cached["prediction"]) == list(naive["prediction"])


def test_truthfulqa_metrics_follow_loglikelihoods(model, tokenizer, truthfulqa_questions):
    scores = benchmarks.score_truthfulqa(
        model, tokenizer, truthfulqa_questions, show_progress=False
    )
    for row in scores.itertuples():
        assert row.mc2 == benchmarks.mc2_from_loglikelihoods(
            row.correct_loglikelihoods, row.incorrect_loglikelihoods
        )
        assert row.mc1 == benchmarks.mc1_from_loglikelihoods(
            row.best_loglikelihood, row.incorrect_loglikelihoods
        )


def test_truthfulqa_best_answer_scored_once(model, tokenizer, truthfulqa_questions):
    scores = benchmarks.score_truthfulqa(
        model, tokenizer, truthfulqa_questions, show_progress=False
    )
    first = scores.iloc[0]
    # The best answer is also the first correct answer, and both reuse the same score.
    assert first["best_loglikelihood"] == first["correct_loglikelihoods"][0]


def test_arc_no_questions_empty_frame(model, tokenizer, arc_questions):
    scores = benchmarks.score_arc(model, tokenizer, arc_questions.iloc[:0], show_progress=False)
    assert len(scores) == 0


def test_arc_labels_and_normalised_choice(model, tokenizer, arc_questions):
    scores = benchmarks.score_arc(model, tokenizer, arc_questions, show_progress=False)
    assert list(scores["answer"]) == ["B", "1", "B"]
    for row, choices, labels in zip(
        scores.itertuples(), arc_questions["choices"], arc_questions["labels"], strict=True
    ):
        per_character = np.array(row.loglikelihoods) / np.array([len(c) for c in choices])
        assert row.prediction == labels[int(np.argmax(row.loglikelihoods))]
        assert row.prediction_norm == labels[int(np.argmax(per_character))]


def test_scoring_twice_identical(model, tokenizer, arc_questions):
    # A second run would differ if the first had written into the shared prefix cache.
    first = benchmarks.score_arc(model, tokenizer, arc_questions, batch_size=4, show_progress=False)
    second = benchmarks.score_arc(
        model, tokenizer, arc_questions, batch_size=4, show_progress=False
    )
    assert list(first["loglikelihoods"]) == list(second["loglikelihoods"])


def test_zero_lora_adapter_identical_scores(
    model, tokenizer, mmlu_dev, mmlu_questions, truthfulqa_questions
):
    # PEFT initialises LoRA's B matrix to zeros, so the adapter adds exactly nothing.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=True
    )
    adapted = get_peft_model(copy.deepcopy(model), config).eval()
    kwargs = {"n_shots": 1, "batch_size": 2, "show_progress": False, "dev_examples": mmlu_dev}
    base_mmlu = benchmarks.score_mmlu(model, tokenizer, mmlu_questions, **kwargs)
    lora_mmlu = benchmarks.score_mmlu(adapted, tokenizer, mmlu_questions, **kwargs)
    assert np.allclose(base_mmlu[letter_columns()], lora_mmlu[letter_columns()], atol=1e-6)
    base_tq = benchmarks.score_truthfulqa(
        model, tokenizer, truthfulqa_questions, show_progress=False
    )
    lora_tq = benchmarks.score_truthfulqa(
        adapted, tokenizer, truthfulqa_questions, show_progress=False
    )
    assert np.allclose(flat_truthfulqa(base_tq), flat_truthfulqa(lora_tq), atol=1e-6)
    assert list(base_tq["mc1"]) == list(lora_tq["mc1"])


def test_lora_adapter_changes_scores(model, tokenizer, arc_questions):
    # Guards the test above: a non-zero adapter must reach the cached path and move the scores.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True
    )
    adapted = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)
    base = benchmarks.score_arc(model, tokenizer, arc_questions, show_progress=False)
    changed = benchmarks.score_arc(adapted, tokenizer, arc_questions, show_progress=False)
    assert np.abs(flat_arc(base) - flat_arc(changed)).max() > 1e-3


# Loaders


def test_load_mmlu_full_counts():
    questions = benchmarks.load_mmlu(None, seed=0)
    assert len(questions) == 14_042
    assert questions["subject"].nunique() == 57
    assert set(questions["answer"]) == {0, 1, 2, 3}
    assert set(questions["choices"].map(len)) == {4}


def test_load_mmlu_dev_five_per_subject():
    dev = benchmarks.load_mmlu_dev()
    assert len(dev) == 57
    assert {len(rows) for rows in dev.values()} == {5}


def test_load_mmlu_subset_proportional():
    questions = benchmarks.load_mmlu(1_000, seed=3)
    counts = questions["subject"].value_counts()
    assert len(questions) == 1_000
    # professional_law has 1,534 of 14,042 test questions: 1,000 * 1,534 / 14,042 = 109.2.
    assert counts["professional_law"] in (109, 110)
    assert questions["question_id"].is_unique


def test_load_mmlu_subset_same_seed_same_rows():
    first = benchmarks.load_mmlu(50, seed=11)["question_id"].tolist()
    second = benchmarks.load_mmlu(50, seed=11)["question_id"].tolist()
    assert first == second


def test_stratified_counts_largest_remainder():
    # Quotas 2.5, 1.5 and 1.0 floor to 2, 1 and 1. The one left goes to the first .5 remainder.
    sizes = pd.Series({"a": 5, "b": 3, "c": 2})
    counts = benchmarks._stratified_counts(sizes, 5)
    assert counts.to_dict() == {"a": 3, "b": 1, "c": 1}


@pytest.mark.parametrize(("subset", "n_questions"), [("ARC-Easy", 570), ("ARC-Challenge", 299)])
def test_load_arc_counts(subset, n_questions):
    questions = benchmarks.load_arc(subset, None, seed=0)
    assert len(questions) == n_questions
    assert set(questions["split"]) == {"validation"}


def test_load_arc_answer_indexes_labels():
    questions = benchmarks.load_arc("ARC-Challenge", None, seed=0)
    answers_in_range = [
        0 <= answer < len(labels)
        for answer, labels in zip(questions["answer"], questions["labels"], strict=True)
    ]
    assert all(answers_in_range)


def test_load_arc_unknown_subset_raises():
    with pytest.raises(ValueError, match="ARC-Easy"):
        benchmarks.load_arc("ARC-Hard", None, seed=0)


@needs_truthfulqa
def test_load_truthfulqa_folder_counts():
    questions = benchmarks.load_truthfulqa(str(TRUTHFULQA_DIR))
    assert len(questions) == 817
    assert list(questions.columns) == [
        "question_id",
        "question",
        "best_answer",
        "correct_answers",
        "incorrect_answers",
    ]


@needs_truthfulqa
def test_load_truthfulqa_csv_path_counts():
    questions = benchmarks.load_truthfulqa(
        str(TRUTHFULQA_DIR / "TruthfulQA.csv"), n_questions=20, seed=1
    )
    assert len(questions) == 20


def test_load_truthfulqa_splits_answers(tmp_path):
    csv_path = tmp_path / "TruthfulQA.csv"
    pd.DataFrame(
        {
            "Type": ["Adversarial"],
            "Category": ["Misconceptions"],
            "Question": ["Q?"],
            "Best Answer": ["Yes"],
            "Correct Answers": ["Yes; Indeed;"],
            "Incorrect Answers": ["No; Never"],
            "Source": ["x"],
        }
    ).to_csv(csv_path, index=False)
    row = benchmarks.load_truthfulqa(str(tmp_path)).iloc[0]
    assert row["correct_answers"] == ["Yes", "Indeed"]
    assert row["incorrect_answers"] == ["No", "Never"]


def test_load_truthfulqa_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        benchmarks.load_truthfulqa(str(tmp_path / "missing.csv"))


@pytest.mark.skipif(
    importlib.util.find_spec("datasets") is not None, reason="the datasets package is installed"
)
def test_load_truthfulqa_hub_without_datasets_raises():
    with pytest.raises(ImportError, match="datasets"):
        benchmarks.load_truthfulqa("truthfulqa/truthful_qa")


# Real model


@pytest.mark.integration
def test_embedded_model_cached_matches_full_forward():
    from kp_utils.models import load_model

    model, tokenizer = load_model("embedded:smollm2-135m-instruct", device="cpu")
    dev = benchmarks.load_mmlu_dev()
    mmlu = benchmarks.load_mmlu(None, seed=0)
    # world_religions has the shortest 5-shot prompts (about 256 tokens), which keeps this fast.
    mmlu = mmlu[mmlu["subject"] == "world_religions"].iloc[:2]
    cached = benchmarks.score_mmlu(model, tokenizer, mmlu, show_progress=False, dev_examples=dev)
    letter_ids = [
        tokenizer.encode(f" {letter}", add_special_tokens=False)[0]
        for letter in benchmarks.MMLU_LETTERS
    ]
    for index, row in mmlu.iterrows():
        prompt = benchmarks.format_mmlu_prompt(
            row.subject, dev[row.subject], row.question, row.choices
        )
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([tokenizer(prompt)["input_ids"]]), logits_to_keep=1
            ).logits
        expected = torch.log_softmax(logits[0, -1], dim=-1)[letter_ids].numpy()
        actual = cached.loc[index, letter_columns()].to_numpy(dtype=float)
        assert np.abs(actual - expected).max() < TOLERANCE, row.question_id
    arc = benchmarks.load_arc("ARC-Easy", 2, seed=0)
    cached_arc = benchmarks.score_arc(model, tokenizer, arc, show_progress=False)
    naive_arc = benchmarks.score_arc(model, tokenizer, arc, show_progress=False, use_cache=False)
    assert np.abs(flat_arc(cached_arc) - flat_arc(naive_arc)).max() < TOLERANCE
