import pytest
import torch

from kp_utils.generation import (
    _top_k_chooser,
    generate_greedy,
    generate_naive,
    generate_sampled,
    stop_token_ids,
)
from kp_utils.prompts import Exemplar, PromptStyle, encode_prompt

from .conftest import build_tiny_llama

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


@pytest.fixture()
def untied_model(tokenizer):
    """A tiny random Llama with untied input and output embeddings.

    With tied embeddings a random model echoes the last prompt token, so every greedy reply is
    the same repeated token. Untied, replies differ between questions after a few tokens.
    """
    return build_tiny_llama(len(tokenizer), max_position_embeddings=512)


def early_stops(replies):
    """Pick a token that ends some replies after at least one token while another runs on."""
    for reply in replies:
        for token in reply.token_ids[1:]:
            if any(token not in other.token_ids for other in replies):
                return {token}
    raise AssertionError("every reply holds the same tokens; no stop token splits them")


def test_cached_matches_naive_with_early_stops(untied_model, tokenizer):
    # Rows that stop leave the batch mid-decoding, and the rows left must still match the naive
    # path.
    prefix, suffixes = encoded(tokenizer)
    free = generate_greedy(untied_model, tokenizer, prefix, suffixes, 6, set())
    stops = early_stops(free)
    cached = generate_greedy(untied_model, tokenizer, prefix, suffixes, 6, stops, batch_size=5)
    naive = generate_naive(untied_model, tokenizer, [prefix + s for s in suffixes], 6, stops)
    assert any(reply.is_stopped for reply in cached)
    assert not all(reply.is_stopped for reply in cached)
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


def sample(model, tokenizer, seed, top_k=40, batch_size=4, n_samples=3):
    prefix, suffixes = encoded(tokenizer)
    return generate_sampled(
        model,
        tokenizer,
        prefix,
        suffixes,
        n_samples=n_samples,
        temperature=0.5,
        top_k=top_k,
        max_new_tokens=6,
        stops=set(),
        seed=seed,
        batch_size=batch_size,
    )


def token_ids(samples):
    return [[reply.token_ids for reply in replies] for replies in samples]


def test_sampled_shape_per_suffix(tiny_model, tokenizer):
    samples = sample(tiny_model, tokenizer, seed=0)
    assert len(samples) == len(QUESTIONS)
    assert all(len(replies) == 3 for replies in samples)
    assert all(len(reply.token_ids) == 6 for replies in samples for reply in replies)


def test_sampled_same_seed_reproducible(tiny_model, tokenizer):
    first = sample(tiny_model, tokenizer, seed=3)
    second = sample(tiny_model, tokenizer, seed=3)
    assert token_ids(first) == token_ids(second)


def test_sampled_seeds_differ(tiny_model, tokenizer):
    # The random model spreads its probability over the whole vocabulary, so two seeds that
    # gave the same 15 samples of 6 tokens each would point to an ignored seed.
    first = sample(tiny_model, tokenizer, seed=3)
    second = sample(tiny_model, tokenizer, seed=4)
    assert token_ids(first) != token_ids(second)


def test_sampled_samples_of_one_suffix_differ(tiny_model, tokenizer):
    samples = sample(tiny_model, tokenizer, seed=0)
    assert len({reply.token_ids for reply in samples[0]}) > 1


def test_sampled_independent_of_batch_size(tiny_model, tokenizer):
    one = sample(tiny_model, tokenizer, seed=5, batch_size=1)
    seven = sample(tiny_model, tokenizer, seed=5, batch_size=7)
    assert token_ids(one) == token_ids(seven)


def test_sampled_with_stops_independent_of_batch_size(tiny_model, tokenizer):
    # A token from inside one sample serves as stop token, so rows leave the batch at
    # different steps and each remaining row must keep its own random draws.
    prefix, suffixes = encoded(tokenizer)
    free = sample(tiny_model, tokenizer, seed=5)
    stops = early_stops([replies[0] for replies in free])
    runs = [
        generate_sampled(tiny_model, tokenizer, prefix, suffixes, 3, 0.5, 40, 6, stops, 5, size)
        for size in (1, 7)
    ]
    assert any(reply.is_stopped for replies in runs[1] for reply in replies)
    assert token_ids(runs[0]) == token_ids(runs[1])


def test_sampled_top_k_one_equals_greedy(untied_model, tokenizer):
    prefix, suffixes = encoded(tokenizer)
    stops = early_stops(generate_greedy(untied_model, tokenizer, prefix, suffixes, 6, set()))
    greedy = generate_greedy(untied_model, tokenizer, prefix, suffixes, 6, stops, batch_size=4)
    samples = generate_sampled(
        untied_model, tokenizer, prefix, suffixes, 3, 0.5, 1, 6, stops, seed=0, batch_size=4
    )
    assert len({reply.token_ids for reply in greedy}) > 1
    for reply, replies in zip(greedy, samples):
        assert [r.token_ids for r in replies] == [reply.token_ids] * 3
        assert all(r.text == reply.text for r in replies)
        assert all(r.is_stopped == reply.is_stopped for r in replies)


def test_sampled_stops_on_stop_token(tiny_model, tokenizer):
    prefix, suffixes = encoded(tokenizer)
    greedy = generate_greedy(tiny_model, tokenizer, prefix, suffixes[:1], 4, set())
    first_token = greedy[0].token_ids[0]
    (replies,) = generate_sampled(
        tiny_model, tokenizer, prefix, suffixes[:1], 2, 0.5, 1, 4, {first_token}, seed=0
    )
    assert all(reply.token_ids == () for reply in replies)
    assert all(reply.is_stopped for reply in replies)


@pytest.mark.parametrize(
    ("n_samples", "temperature", "top_k", "message"),
    [
        (0, 0.5, 40, "n_samples must be at least 1"),
        (2, 0.0, 40, "temperature must be positive"),
        (2, 0.5, 0, "top_k must be at least 1"),
    ],
)
def test_sampled_invalid_setting_raises(
    tiny_model, tokenizer, n_samples, temperature, top_k, message
):
    prefix, suffixes = encoded(tokenizer)
    with pytest.raises(ValueError, match=message):
        generate_sampled(
            tiny_model, tokenizer, prefix, suffixes, n_samples, temperature, top_k, 4, set(), 0
        )


def chosen(log_probs, uniform, temperature, top_k):
    choose = _top_k_chooser(torch.tensor([[uniform]]), temperature, top_k)
    return int(choose(torch.tensor([log_probs]).log(), 0, torch.tensor([0]))[0])


def test_top_k_chooser_inverse_cdf():
    # Probabilities 0.5, 0.3, 0.2 give cumulative 0.5, 0.8, 1.0 at temperature 1.
    probs = [0.2, 0.5, 0.3]  # token 1 is the most probable, then token 2, then token 0
    assert chosen(probs, 0.1, 1.0, 3) == 1
    assert chosen(probs, 0.6, 1.0, 3) == 2
    assert chosen(probs, 0.9, 1.0, 3) == 0


def test_top_k_chooser_drops_tail():
    # With k=2 the kept 0.5 and 0.3 renormalise to 0.625 and 0.375, so token 0 never appears.
    assert chosen([0.2, 0.5, 0.3], 0.9, 1.0, 2) == 2
    assert chosen([0.2, 0.5, 0.3], 0.999, 1.0, 2) == 2


def test_top_k_chooser_temperature_sharpens():
    # At temperature 0.5 the weights become 0.25, 0.09, 0.04 (squares), so token 1 keeps
    # 0.25 / 0.38 = 0.658 of the mass and a draw of 0.6 still picks it.
    assert chosen([0.2, 0.5, 0.3], 0.6, 0.5, 3) == 1
    assert chosen([0.2, 0.5, 0.3], 0.6, 1.0, 3) == 2
