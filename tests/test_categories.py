import pytest

from kp_utils.categories import KnowledgeCategory, label_category


def test_category_all_correct_highly_known():
    assert label_category(10, 10) is KnowledgeCategory.HIGHLY_KNOWN


def test_category_some_correct_maybe_known():
    assert label_category(1, 10) is KnowledgeCategory.MAYBE_KNOWN


def test_category_none_correct_unknown():
    assert label_category(0, 10) is KnowledgeCategory.UNKNOWN


def test_category_sampled_hit_weakly_known():
    assert label_category(0, 10, n_correct_sampled=3) is KnowledgeCategory.WEAKLY_KNOWN


def test_category_sampled_miss_unknown():
    assert label_category(0, 10, n_correct_sampled=0) is KnowledgeCategory.UNKNOWN


def test_category_single_prompt_extremes():
    assert label_category(1, 1) is KnowledgeCategory.HIGHLY_KNOWN
    assert label_category(0, 1) is KnowledgeCategory.UNKNOWN


@pytest.mark.parametrize("n_correct, n_prompts", [(11, 10), (-1, 10), (0, 0)])
def test_category_invalid_counts_raise(n_correct, n_prompts):
    with pytest.raises(ValueError):
        label_category(n_correct, n_prompts)


def test_category_rank_orders_known_above_unknown():
    ranks = [
        c.rank
        for c in (
            KnowledgeCategory.UNKNOWN,
            KnowledgeCategory.WEAKLY_KNOWN,
            KnowledgeCategory.MAYBE_KNOWN,
            KnowledgeCategory.HIGHLY_KNOWN,
        )
    ]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == 4
