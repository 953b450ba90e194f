"""Stage 01: build the study's facts and label them with the base model."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from kp_utils.artifacts import RunLayout, read_json, write_json, write_parquet
from kp_utils.config import StudyConfig
from kp_utils.facts import build_fact_base, combine_facts, load_external_facts, load_triviaqa
from kp_utils.labelling import (
    SamplingSettings,
    ask_questions,
    ask_questions_sampled,
    select_exemplars,
    summarise_labels,
)
from kp_utils.prompts import PromptStyle

logger = logging.getLogger(__name__)

EXEMPLAR_POOL_SIZE = 500  # TriviaQA questions kept apart for few-shot exemplars only
TRIVIAQA_RELATION = "triviaqa"


def cap_per_relation(facts: pd.DataFrame, n_per_relation: int | None, seed: int) -> pd.DataFrame:
    """Keep at most `n_per_relation` facts of each relation, drawn by seed; log what was dropped."""
    if n_per_relation is None:
        return facts
    shuffled = facts.sample(frac=1.0, random_state=seed)
    kept = shuffled.groupby("relation", sort=False).head(n_per_relation)
    if len(kept) < len(facts):
        logger.warning(
            "data.n_facts_per_relation=%d keeps %d of %d facts",
            n_per_relation,
            len(kept),
            len(facts),
        )
    return kept.sort_values("fact_id").reset_index(drop=True)


def build_study_facts(config: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Assemble the questions to label and the exemplar pool.

    Returns:
        (facts, exemplar_pool). Facts are the embedded fact base (capped per relation), any
        external file, and `data.n_triviaqa` TriviaQA questions. The exemplar pool contains other
        TriviaQA questions, so no labelled question serves as its own exemplar.
    """
    data = config.data
    frames = []
    if data.external_mode == "extend":
        frames.append(build_fact_base(data.relations, data.n_heldout_templates))
    if data.external_path is not None:
        frames.append(
            load_external_facts(
                config.resolve_path(data.external_path),
                question_column=data.external_question_column,
                answer_column=data.external_answer_column,
                aliases_column=data.external_aliases_column,
                relation_column=data.external_relation_column,
                skip_invalid=data.skip_invalid_rows,
            )
        )
    facts = cap_per_relation(combine_facts(frames), data.n_facts_per_relation, config.study.seed)

    trivia = load_triviaqa(None, config.study.seed)
    order = np.random.default_rng(config.study.seed).permutation(len(trivia))
    trivia = trivia.iloc[order].reset_index(drop=True)
    asked = trivia.iloc[: data.n_triviaqa]
    pool = trivia.iloc[data.n_triviaqa : data.n_triviaqa + EXEMPLAR_POOL_SIZE].reset_index(
        drop=True
    )
    facts = combine_facts([facts, asked]) if len(asked) else facts
    logger.info(
        "Study facts: %d (%d relations); exemplar pool: %d TriviaQA questions",
        len(facts),
        facts["relation"].nunique(),
        len(pool),
    )
    return facts.reset_index(drop=True), pool


def label_base_model(
    config: StudyConfig, model, tokenizer, facts: pd.DataFrame, pool: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, list, pd.DataFrame | None]:
    """Ask every fact under the study's prompts and label it.

    Returns (replies, labels, exemplar sets, sampled). `sampled` contains the sampled-reply counts
    of the facts no greedy prompt got right (see `ask_questions_sampled`), or None when
    `data.weakly_known_samples` is 0.
    """
    exemplar_sets = study_exemplars(config, pool)
    replies, labels, sampled = label_facts(config, model, tokenizer, facts, exemplar_sets)
    return replies, labels, exemplar_sets, sampled


def study_exemplars(config: StudyConfig, pool: pd.DataFrame) -> list:
    """Draw the study's exemplar sets, the same for the base model, epoch probes and adapters."""
    return select_exemplars(pool, config.data.n_prompts, config.data.n_shots, config.study.seed)


def ask_study_questions(
    config: StudyConfig,
    model,
    tokenizer,
    questions: pd.DataFrame,
    exemplar_sets: list,
    show_progress: bool,
) -> pd.DataFrame:
    """Ask `questions` (fact_id, question, aliases) with the study's prompt style and budget."""
    return ask_questions(
        model,
        tokenizer,
        questions[["fact_id", "question", "aliases"]],
        exemplar_sets,
        PromptStyle(config.model.prompt_style),
        config.data.max_new_tokens,
        config.data.batch_size,
        show_progress,
    )


def label_facts(
    config: StudyConfig, model, tokenizer, facts: pd.DataFrame, exemplar_sets: list
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Ask every fact, sample the greedy misses when WeaklyKnown is on, and label each fact.

    Stage 01 runs this on the base model and stage 03 on every adapter, so both sides of a
    knowledge shift come from the same procedure. Returns (replies, labels, sampled or None).
    """
    replies = ask_study_questions(
        config, model, tokenizer, facts, exemplar_sets, config.study.show_progress
    )
    sampled = None
    if config.data.weakly_known_samples > 0:
        questions = facts[["fact_id", "question", "aliases"]]
        sampled = sample_greedy_misses(config, model, tokenizer, questions, replies, exemplar_sets)
    return replies, summarise_labels(replies, facts, sampled), sampled


def sample_greedy_misses(
    config: StudyConfig,
    model,
    tokenizer,
    questions: pd.DataFrame,
    replies: pd.DataFrame,
    exemplar_sets: list,
) -> pd.DataFrame:
    """Sample replies for the questions no greedy prompt got right, the WeaklyKnown candidates.

    Samples cannot change the category of the other questions, which are HighlyKnown or
    MaybeKnown, so sampling them would only cost time.
    """
    data = config.data
    n_hits = replies.groupby("fact_id")["is_correct"].sum()
    misses = questions[questions["fact_id"].map(n_hits).eq(0)]
    logger.info(
        "Sampling %d replies per prompt at temperature %g, top-k %d for %d of %d facts with no "
        "greedy hit",
        data.weakly_known_samples,
        data.sampling_temperature,
        data.sampling_top_k,
        len(misses),
        len(questions),
    )
    sampling = SamplingSettings(
        data.weakly_known_samples, data.sampling_temperature, data.sampling_top_k, config.study.seed
    )
    return ask_questions_sampled(
        model,
        tokenizer,
        misses,
        exemplar_sets,
        PromptStyle(config.model.prompt_style),
        sampling,
        data.max_new_tokens,
        data.batch_size,
        config.study.show_progress,
    )


def data_fingerprint(config: StudyConfig) -> str:
    """Hash the settings stage 01 depends on: the study seed, model and data sections."""
    return config.fingerprint("model", "data") + f"-seed{config.study.seed}"


def is_data_stage_done(config: StudyConfig) -> bool:
    """Tell whether stage 01 already finished with the current settings."""
    done = RunLayout(config.run_dir).data_dir / "done.json"
    return done.exists() and read_json(done).get("fingerprint") == data_fingerprint(config)


def save_data_stage(
    config: StudyConfig, facts, pool, replies, labels, exemplar_sets, sampled=None
) -> None:
    """Write stage 01's tables, then its done marker last.

    `sampled` (from `label_base_model`) goes to data/base_sampled.parquet when it is not None.
    """
    layout = RunLayout(config.run_dir)
    write_parquet(facts, layout.facts_path)
    write_parquet(pool, layout.exemplar_pool_path)
    write_parquet(replies, layout.base_replies_path)
    write_parquet(labels, layout.base_labels_path)
    if sampled is not None:
        write_parquet(sampled, layout.data_dir / "base_sampled.parquet")
    write_json(
        [[vars(e) for e in exemplars] for exemplars in exemplar_sets],
        layout.data_dir / "exemplars.json",
    )
    write_json(
        {"fingerprint": data_fingerprint(config), "n_facts": len(facts)},
        layout.data_dir / "done.json",
    )
    logger.info("Stage 01 tables written to %s", layout.data_dir)


def load_data_stage(config: StudyConfig) -> dict[str, pd.DataFrame]:
    """Read stage 01's tables; raise FileNotFoundError naming the notebook to run first."""
    layout = RunLayout(config.run_dir)
    if not (layout.data_dir / "done.json").exists():
        raise FileNotFoundError(
            f"No finished stage 01 in {layout.data_dir}; run notebooks/01_data.ipynb first."
        )
    return {
        "facts": pd.read_parquet(layout.facts_path),
        "pool": pd.read_parquet(layout.exemplar_pool_path),
        "replies": pd.read_parquet(layout.base_replies_path),
        "labels": pd.read_parquet(layout.base_labels_path),
    }


def label_or_load(
    config: StudyConfig, model, tokenizer, facts: pd.DataFrame, pool: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """Label the facts with the base model, or load the labels of a finished earlier run.

    A finished stage 01 with different model or data settings is relabelled, not reused.
    """
    if is_data_stage_done(config):
        logger.info("Stage 01 already finished with these settings; loading its tables")
        return load_data_stage(config)
    replies, labels, exemplar_sets, sampled = label_base_model(
        config, model, tokenizer, facts, pool
    )
    save_data_stage(config, facts, pool, replies, labels, exemplar_sets, sampled)
    return {"facts": facts, "pool": pool, "replies": replies, "labels": labels}
