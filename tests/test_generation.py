import pytest

from kp_utils.generation import generate_greedy, generate_naive, stop_token_ids
from kp_utils.prompts import Exemplar, PromptStyle, encode_prompt

EXEMPLARS = [
    Exemplar("Who wrote Hamlet?", "William Shakespeare"),
    Exemplar("Largest ocean?", "Pacific Ocean"),
]
QUESTIONS = [
    "What is the capital of France?",
    "Who painted the Mona Lisa?",
    "Which element has the symbol Au?",
    "In which year did the Berlin Wall fall?",
    "What is 7 times 8?",
]


def encoded(tokenizer):
    parts = [encode_prompt(tokenizer, EXEMPLARS, q, PromptStyle.CHAT) for q in QUESTIONS]
    return parts[0][0], [suffix for _, suffix in parts]


def test_cached_matches_naive_generation(tiny_model, tokenizer):
    prefix, suffixes = encoded(tokenizer)
    stops = stop_token_ids(tokenizer, stop_at_newline=False)
    cached = generate_greedy(tiny_model, tokenizer, prefix, suffixes, 8, stops, batch_size=3)
    naive = generate_naive(tiny_model, tokenizer, [prefix + s for s in suffixes], 8, stops)
    assert [r.token_ids for r in cached] == [r.token_ids for r in naive]
    for fast, slow in zip(cached, naive):
        assert fast.prob == pytest.approx(slow.prob, rel=1e-4, abs=1e-9)


def test_cached_output_independent_of_batch_size(tiny_model, tokenizer):
    prefix, suffixes = encoded(tokenizer)
    stops = stop_token_ids(tokenizer, stop_at_newline=False)
    one = generate_greedy(tiny_model, tokenizer, prefix, suffixes, 6, stops, batch_size=1)
    five = generate_greedy(tiny_model, tokenizer, prefix, suffixes, 6, stops, batch_size=5)
    assert [r.token_ids for r in one] == [r.token_ids for r in five]


def test_generation_respects_token_budget(tiny_model, tokenizer):
    prefix, suffixes = encoded(tokenizer)
    replies = generate_greedy(tiny_model, tokenizer, prefix, suffixes, 3, set(), batch_size=4)
    assert all(len(r.token_ids) == 3 for r in replies)
    assert not any(r.is_stopped for r in replies)


def test_generation_stops_on_stop_token(tiny_model, tokenizer):
    prefix, suffixes = encoded(tokenizer)
    free = generate_greedy(tiny_model, tokenizer, prefix, suffixes[:1], 4, set())
    first_token = free[0].token_ids[0]
    stopped = generate_greedy(tiny_model, tokenizer, prefix, suffixes[:1], 4, {first_token})
    assert stopped[0].token_ids == ()
    assert stopped[0].is_stopped
    assert stopped[0].prob == 1.0


def test_stop_ids_include_end_of_turn(tokenizer):
    stops = stop_token_ids(tokenizer, stop_at_newline=False)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops


def test_stop_ids_newline_for_plain(tokenizer):
    stops = stop_token_ids(tokenizer, stop_at_newline=True)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert set(newline) <= stops


def test_generation_empty_suffix_raises(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        generate_greedy(tiny_model, tokenizer, [1, 2], [[]], 4, set())
