from kp_utils.prompts import (
    SYSTEM_PROMPT,
    Exemplar,
    PromptStyle,
    encode_prompt,
    extract_answer,
    format_training_text,
    split_prompt,
)

EXEMPLARS = [Exemplar("Who wrote Hamlet?", "William Shakespeare"), Exemplar("2+2?", "4")]


def test_chat_split_concatenates_to_template(tokenizer):
    prefix, suffix = split_prompt(
        tokenizer, EXEMPLARS, "What is the capital of Peru?", PromptStyle.CHAT
    )
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Question: Who wrote Hamlet?"},
        {"role": "assistant", "content": "Answer: William Shakespeare"},
        {"role": "user", "content": "Question: 2+2?"},
        {"role": "assistant", "content": "Answer: 4"},
        {"role": "user", "content": "Question: What is the capital of Peru?"},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prefix + suffix == expected


def test_chat_prefix_shared_across_questions(tokenizer):
    first, _ = split_prompt(tokenizer, EXEMPLARS, "Q one?", PromptStyle.CHAT)
    second, _ = split_prompt(tokenizer, EXEMPLARS, "Q two?", PromptStyle.CHAT)
    assert first == second
    assert "Q one?" not in first


def test_plain_prompt_format():
    prefix, suffix = split_prompt(None, EXEMPLARS[:1], "Capital of Peru?", PromptStyle.PLAIN)
    assert prefix == (
        f"{SYSTEM_PROMPT}\n\nQuestion: Who wrote Hamlet?\nAnswer: William Shakespeare\n\n"
    )
    assert suffix == "Question: Capital of Peru?\nAnswer:"


def test_encode_prompt_suffix_has_no_bos(tokenizer):
    prefix_ids, suffix_ids = encode_prompt(
        tokenizer, EXEMPLARS, "Capital of Peru?", PromptStyle.CHAT
    )
    assert tokenizer.decode(prefix_ids + suffix_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(suffix_ids).startswith("<|im_start|>user")


def test_training_text_chat_reply(tokenizer):
    prompt, reply = format_training_text(tokenizer, "Capital of Peru?", "Lima", PromptStyle.CHAT)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert reply == "Answer: Lima<|im_end|>\n"


def test_training_text_plain_reply():
    prompt, reply = format_training_text(None, "Capital of Peru?", "Lima", PromptStyle.PLAIN)
    assert prompt == f"{SYSTEM_PROMPT}\n\nQuestion: Capital of Peru?\nAnswer:"
    assert reply == " Lima\n"


def test_extract_answer_strips_cue():
    assert extract_answer("Answer: Lima ") == "Lima"
    assert extract_answer("  answer:Paris") == "Paris"
    assert extract_answer("Lima") == "Lima"
