"""Prompt and training-text formats shared by labelling, training and evaluation.

The format is that of the reproduced study (Pletenev et al., 2025): the system prompt "Answer
the following question.", user turns "Question: ..." and assistant turns "Answer: ...". Chat
models get their own chat template. Base models have no template, so they get the same turns as
plain text, one blank line between exemplars, and their replies stop at the first newline.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

SYSTEM_PROMPT = "Answer the following question."
QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "Answer: "


class PromptStyle(str, Enum):
    """Rendering of the turns: the tokenizer's chat template, or plain text for base models."""

    CHAT = "chat"
    PLAIN = "plain"


@dataclass(frozen=True)
class Exemplar:
    """One few-shot demonstration: a question and the answer shown for it."""

    question: str
    answer: str


def _chat_messages(exemplars: list[Exemplar], question: str | None) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for exemplar in exemplars:
        messages.append({"role": "user", "content": QUESTION_PREFIX + exemplar.question})
        messages.append({"role": "assistant", "content": ANSWER_PREFIX + exemplar.answer})
    if question is not None:
        messages.append({"role": "user", "content": QUESTION_PREFIX + question})
    return messages


def _plain_turns(exemplars: list[Exemplar]) -> str:
    blocks = [SYSTEM_PROMPT]
    for exemplar in exemplars:
        blocks.append(f"{QUESTION_PREFIX}{exemplar.question}\n{ANSWER_PREFIX}{exemplar.answer}")
    return "\n\n".join(blocks) + "\n\n"


def split_prompt(
    tokenizer, exemplars: list[Exemplar], question: str, style: PromptStyle
) -> tuple[str, str]:
    """Render a few-shot prompt as (shared prefix, per-question suffix).

    The prefix contains the system prompt and all exemplars, so it is identical for every question
    asked under one prompt; the suffix contains the question and the cue for the reply. Their
    concatenation is the full prompt.
    """
    if style is PromptStyle.PLAIN:
        # The reply cue stops at "Answer:" without its space, because the model's first token
        # usually carries the leading space.
        return _plain_turns(exemplars), f"{QUESTION_PREFIX}{question}\n{ANSWER_PREFIX.rstrip()}"
    full = tokenizer.apply_chat_template(
        _chat_messages(exemplars, question), tokenize=False, add_generation_prompt=True
    )
    prefix = tokenizer.apply_chat_template(
        _chat_messages(exemplars, None), tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prefix):
        raise ValueError(
            "The chat template renders the exemplar turns differently once a question follows, "
            "so the few-shot prefix cannot be shared; use model.prompt_style: plain."
        )
    return prefix, full[len(prefix) :]


def encode_prompt(
    tokenizer, exemplars: list[Exemplar], question: str, style: PromptStyle
) -> tuple[list[int], list[int]]:
    """Tokenize the prefix and suffix of `split_prompt` separately.

    Both the cached and the naive generation paths feed exactly these ids, so their greedy
    answers are comparable token for token. The prefix gets the tokenizer's special tokens (BOS
    where the model uses one) and the suffix gets none.
    """
    prefix, suffix = split_prompt(tokenizer, exemplars, question, style)
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return prefix_ids, suffix_ids


def format_training_text(
    tokenizer, question: str, answer: str, style: PromptStyle
) -> tuple[str, str]:
    """Render one training fact as (prompt, reply), in the same format as the labelling prompts.

    Training uses no exemplars, only the system prompt, the question and the answer. The reply
    includes the end-of-turn marker, so the adapter learns to stop.
    """
    if style is PromptStyle.PLAIN:
        prompt = f"{SYSTEM_PROMPT}\n\n{QUESTION_PREFIX}{question}\n{ANSWER_PREFIX.rstrip()}"
        return prompt, f" {answer}\n"
    prompt = tokenizer.apply_chat_template(
        _chat_messages([], question), tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(
        _chat_messages([], question) + [{"role": "assistant", "content": ANSWER_PREFIX + answer}],
        tokenize=False,
        add_generation_prompt=False,
    )
    if not full.startswith(prompt):
        raise ValueError("The chat template changes the prompt once a reply follows it.")
    return prompt, full[len(prompt) :]


def extract_answer(reply: str) -> str:
    """Strip the "Answer:" cue and surrounding whitespace from a generated reply."""
    text = reply.strip()
    if text.lower().startswith(ANSWER_PREFIX.strip().lower()):
        text = text[len(ANSWER_PREFIX.strip()) :]
    return text.strip()
