"""Answer matching and refusal detection for free-form model replies.

A reply is correct when it contains any alias of the gold answer as whole words, after both sides
pass through `normalize_text`. This is the alias substring rule of Pletenev et al. (2025), with
token boundaries added so that "Rome" does not match inside "Romero" and "1766" does not match
inside "17661".

`normalize_text` applies these steps in order:
1. Unicode NFKD, then drop combining marks, so "São Paulo" and "Sao Paulo" compare equal.
2. `str.casefold`, a stronger lower-casing that also maps "ß" to "ss".
3. Delete apostrophes, so "it's" becomes "its" and leaves no stray "s" token that would match the
   element symbol S.
4. Replace every other character that is neither a letter, a digit nor whitespace with a space.
5. Drop the articles "a", "an" and "the" as whole words, then collapse whitespace.

`is_refusal` flags a reply that matches any of `REFUSAL_PATTERNS`, which run over the normalised
reply. It flags a reply that contains a refusal anywhere, even after an answer, so callers score
correctness first and count refusals among the wrong replies.

MATCHING_VERSION changes whenever a change to `normalize_text`, `alias_in_reply` or
`REFUSAL_PATTERNS` can change the result for any reply, and every results file stores it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

MATCHING_VERSION = 1

_ARTICLES = frozenset({"a", "an", "the"})
# ASCII apostrophe, right single quotation mark, modifier letter apostrophe, backtick.
_APOSTROPHES = re.compile("['\u2019\u02bc`]")
# \w keeps letters and digits of every script; the underscore counts as punctuation here.
_NON_WORD = re.compile(r"[^\w\s]|_")

# Each pattern runs with re.search over normalize_text(reply), so it sees lower-case words
# separated by single spaces, with no punctuation, no apostrophes and no articles.
REFUSAL_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern)
    for pattern in (
        # "I don't know", "I do not know", "we didn't know"
        r"\b(i|we) (dont|do not|didnt|did not) know\b",
        # "I'm not sure", "I am not certain", "I'm unsure"
        r"\b(im|i am) (not (sure|certain|aware)|unsure)\b",
        # "I couldn't find any information", "I cannot answer", "I was unable to determine"
        r"\b(i|we) (couldnt|could not|cannot|can not|cant|(am|was|were|are) unable to|unable to)"
        r" (find|locate|answer|provide|determine|say|tell|confirm|verify|help)\b",
        # "I have no idea", "I've no information"
        r"\b(i have|ive|i had) no (idea|information|knowledge|data|answer)\b",
        # "I don't have any information", "I do not have an answer" (the article is gone)
        r"\b(i|we) (dont|do not) have (any |enough )?(information|data|knowledge|answer|idea)\b",
        # "There is no information", "there are no records"
        r"\b(there is|theres|there are) no (information|data|records?|answer|known)\b",
        # "Not enough information", "No information available"
        r"\bnot enough information\b",
        r"\bno (information|data) (is )?(available|found)\b",
        # A reply that is only "Unknown", "Not known", "No idea", "Unsure", "idk" or "N/A". "N/A"
        # normalises to "n" because the article rule drops the "a".
        r"^(unknown|not known|no idea|unsure|idk|n)$",
    )
)


def normalize_text(text: str) -> str:
    """Normalise `text` for alias matching with the five steps listed in the module docstring."""
    decomposed = unicodedata.normalize("NFKD", text)
    without_marks = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    lowered = without_marks.casefold()
    without_apostrophes = _APOSTROPHES.sub("", lowered)
    spaced = _NON_WORD.sub(" ", without_apostrophes)
    tokens = [token for token in spaced.split() if token not in _ARTICLES]
    return " ".join(tokens)


def alias_in_reply(reply: str, aliases: Sequence[str]) -> bool:
    """Check whether any alias occurs in `reply` as whole words after normalisation.

    An alias that is empty, or that normalises to the empty string (for example "the" or "..."),
    never matches. An empty `aliases` sequence never matches.
    """
    # Padding both sides with one space turns a substring test into a token-boundary test,
    # because normalize_text leaves exactly one space between tokens.
    padded_reply = f" {normalize_text(reply)} "
    for alias in aliases:
        normalized_alias = normalize_text(alias)
        if normalized_alias and f" {normalized_alias} " in padded_reply:
            return True
    return False


def is_refusal(reply: str) -> bool:
    """Check whether `reply` declines to answer, by any pattern in `REFUSAL_PATTERNS`."""
    normalized = normalize_text(reply)
    return any(pattern.search(normalized) for pattern in REFUSAL_PATTERNS)
