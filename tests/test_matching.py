import pytest

from kp_utils.matching import (
    MATCHING_VERSION,
    REFUSAL_PATTERNS,
    alias_in_reply,
    is_refusal,
    normalize_text,
)


def test_matching_version_is_int():
    assert isinstance(MATCHING_VERSION, int)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("São Paulo", "sao paulo"),
        ("Sao Paulo", "sao paulo"),
        ("Zürich", "zurich"),
        ("Straße", "strasse"),
        ("The Hague", "hague"),
        ("A cat and an apple", "cat and apple"),
        ("Washington, D.C.", "washington d c"),
        ("It's  Paris!\n", "its paris"),
        ("Côte d'Ivoire", "cote divoire"),
        ("rock_and_roll", "rock and roll"),
        ("Theatre", "theatre"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_text_cases(text, expected):
    assert normalize_text(text) == expected


def test_alias_match_accents_either_side():
    assert alias_in_reply("The city is Sao Paulo.", ["São Paulo"])
    assert alias_in_reply("The city is São Paulo.", ["Sao Paulo"])


def test_alias_match_ignores_articles():
    assert alias_in_reply("It is in Netherlands", ["The Netherlands"])
    assert alias_in_reply("The seat is The Hague.", ["Hague"])


def test_alias_match_ignores_punctuation():
    assert alias_in_reply("Washington D.C. is the capital", ["Washington, D.C."])
    assert alias_in_reply("It was discovered by Gay-Lussac.", ["Gay Lussac"])


def test_alias_match_is_case_insensitive():
    assert alias_in_reply("PARIS", ["paris"])


def test_alias_match_rejects_partial_word():
    assert not alias_in_reply("The striker was Romero.", ["Rome"])


def test_alias_match_accepts_whole_word():
    assert alias_in_reply("Rome, of course.", ["Rome"])


def test_alias_match_rejects_longer_number():
    assert not alias_in_reply("It was found in 17661.", ["1766"])


def test_alias_match_accepts_exact_number():
    assert alias_in_reply("It was found in 1766.", ["1766"])


def test_alias_match_multiword_alias():
    assert alias_in_reply("I believe it is the United States of America.", ["United States"])


def test_alias_match_multiword_needs_all_words():
    assert not alias_in_reply("Somewhere in the United Kingdom.", ["United States"])


def test_alias_match_multiword_needs_adjacent_words():
    assert not alias_in_reply("New houses in York", ["New York"])


def test_alias_match_any_alias_suffices():
    assert alias_in_reply("They use the pound sterling.", ["British Pound", "pound sterling"])


def test_alias_match_empty_alias_list():
    assert not alias_in_reply("Paris", [])


def test_alias_match_empty_alias():
    assert not alias_in_reply("Paris", [""])


def test_alias_match_alias_only_article():
    assert not alias_in_reply("The answer is the", ["the"])


def test_alias_match_alias_only_punctuation():
    assert not alias_in_reply("Well... I guess", ["..."])


def test_alias_match_apostrophe_leaves_no_letter():
    # "it's" must not leave a lone "s" token, which would match the symbol of sulfur.
    assert not alias_in_reply("It's a yellow element.", ["S"])


def test_refusal_patterns_not_empty():
    assert len(REFUSAL_PATTERNS) > 0


@pytest.mark.parametrize(
    "reply",
    [
        "I don't know.",
        "I do not know the answer to that.",
        "I don’t know",
        "I couldn't find any information about this element.",
        "Sorry, I could not find the capital.",
        "I'm not sure.",
        "I am not certain about that.",
        "I cannot answer this question.",
        "I can't answer that.",
        "I was unable to determine who discovered it.",
        "There is no information about this city.",
        "There's no data on that.",
        "Unknown",
        "unknown.",
        "  UNKNOWN  ",
        "I have no idea.",
        "I don't have any information on that.",
        "I do not have an answer.",
        "Not enough information to say.",
        "N/A",
    ],
)
def test_is_refusal_positive(reply):
    assert is_refusal(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "Paris",
        "The capital of France is Paris.",
        "Gold has the symbol Au.",
        "The discoverer is unknown to most people, but it was Henry Cavendish.",
        "The Unknown Soldier is buried there.",
        "I know it: Rome.",
        "Nobody knows why, but the answer is 1766.",
        "",
    ],
)
def test_is_refusal_negative(reply):
    assert not is_refusal(reply)
