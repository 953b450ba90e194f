"""Knowledge categories of a question for one model, after Gekhman et al. (2024) and
Pletenev et al. (2025).

A question is asked under P few-shot prompts with greedy decoding. HighlyKnown means correct under
all P prompts, MaybeKnown under some, Unknown under none. WeaklyKnown (Gekhman et al., 2024)
splits the greedy-wrong questions that sampling at temperature 0.5 sometimes gets right.

CATEGORY_RULE_VERSION changes whenever this rule changes, and every results file stores it.
"""

from __future__ import annotations

from enum import Enum

CATEGORY_RULE_VERSION = 1


class KnowledgeCategory(str, Enum):
    """Degree to which a model answers one fact correctly, ordered from best to worst known."""

    HIGHLY_KNOWN = "HighlyKnown"
    MAYBE_KNOWN = "MaybeKnown"
    WEAKLY_KNOWN = "WeaklyKnown"
    UNKNOWN = "Unknown"

    @property
    def rank(self) -> int:
        """Order used for shifts: a higher rank is better known."""
        return _RANKS[self]


_RANKS = {
    KnowledgeCategory.UNKNOWN: 0,
    KnowledgeCategory.WEAKLY_KNOWN: 1,
    KnowledgeCategory.MAYBE_KNOWN: 2,
    KnowledgeCategory.HIGHLY_KNOWN: 3,
}

# The paper's short forms, for figure and table labels only.
SHORT_LABELS = {
    KnowledgeCategory.HIGHLY_KNOWN: "HK",
    KnowledgeCategory.MAYBE_KNOWN: "MK",
    KnowledgeCategory.WEAKLY_KNOWN: "WK",
    KnowledgeCategory.UNKNOWN: "UK",
}


def label_category(
    n_correct_greedy: int, n_prompts: int, n_correct_sampled: int | None = None
) -> KnowledgeCategory:
    """Label one question from its greedy hit count under `n_prompts` prompts.

    Args:
        n_correct_greedy: prompts under which the greedy reply contained an answer alias.
        n_prompts: prompts asked, at least 1.
        n_correct_sampled: correct sampled replies over all prompts, or None when sampling was
            off. A question wrong under every greedy prompt but right in at least one sample is
            WeaklyKnown.
    """
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be at least 1, got {n_prompts}")
    if not 0 <= n_correct_greedy <= n_prompts:
        raise ValueError(f"n_correct_greedy must lie in [0, {n_prompts}], got {n_correct_greedy}")
    if n_correct_greedy == n_prompts:
        return KnowledgeCategory.HIGHLY_KNOWN
    if n_correct_greedy > 0:
        return KnowledgeCategory.MAYBE_KNOWN
    if n_correct_sampled:
        return KnowledgeCategory.WEAKLY_KNOWN
    return KnowledgeCategory.UNKNOWN


class ExtraKind(str, Enum):
    """Kind of extra example added for each Unknown fact."""

    PARAPHRASE = "paraphrase"  # the same fact asked with another question wording
    HIGHLY_KNOWN = "highly_known"  # a different fact, from the base model's HighlyKnown category


# Short forms for figure labels only (Pletenev et al., 2025, use "Para" and "HK").
EXTRA_KIND_LABELS = {
    ExtraKind.PARAPHRASE: "Para",
    ExtraKind.HIGHLY_KNOWN: SHORT_LABELS[KnowledgeCategory.HIGHLY_KNOWN],
}
