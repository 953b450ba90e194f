import logging

import pandas as pd

from kp_utils.config import load_config
from kp_utils.study_data import EXEMPLAR_POOL_SIZE, build_study_facts, cap_per_relation


def study_file(tmp_path, data_lines):
    path = tmp_path / "study.yaml"
    path.write_text("study:\n  name: t\n  seed: 3\ntrain:\n  n_unknown: [1]\ndata:\n" + data_lines)
    return path


def test_cap_per_relation_limits_and_warns(caplog):
    facts = pd.DataFrame(
        {"fact_id": [f"f{i}" for i in range(6)], "relation": ["a", "a", "a", "a", "b", "b"]}
    )
    with caplog.at_level(logging.WARNING):
        kept = cap_per_relation(facts, 3, seed=0)
    assert kept["relation"].value_counts().to_dict() == {"a": 3, "b": 2}
    assert "keeps 5 of 6 facts" in caplog.text


def test_cap_per_relation_none_keeps_all():
    facts = pd.DataFrame({"fact_id": ["x"], "relation": ["a"]})
    assert cap_per_relation(facts, None, seed=0) is facts


def test_external_replace_with_named_columns(tmp_path):
    csv = tmp_path / "dbpedia.csv"
    pd.DataFrame(
        {
            "q": ["Where was Ada Lovelace born?", "Who founded Rome?"],
            "a": ["London", "Romulus"],
            "alts": ["London|City of London", "Romulus"],
            "rel": ["birthPlace", "founder"],
        }
    ).to_csv(csv, index=False)
    lines = (
        f"  external_path: {csv}\n  external_mode: replace\n  external_question_column: q\n"
        "  external_answer_column: a\n  external_aliases_column: alts\n"
        "  external_relation_column: rel\n  n_triviaqa: 2\n"
    )
    facts, pool = build_study_facts(load_config(study_file(tmp_path, lines)))
    external = facts[facts["relation"] != "triviaqa"]
    assert sorted(external["relation"]) == ["birthPlace", "founder"]
    aliases = external.set_index("relation").loc["birthPlace", "aliases"]
    assert "City of London" in list(aliases)
    assert (facts["relation"] == "triviaqa").sum() == 2
    assert len(pool) == EXEMPLAR_POOL_SIZE
    # Asked TriviaQA questions never reappear as exemplars.
    assert not set(pool["fact_id"]) & set(facts["fact_id"])
