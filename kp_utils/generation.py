"""Batched greedy generation that encodes a shared few-shot prefix once.

Labelling asks every question under the same P prompts, and about nine tenths of each prompt is
the few-shot prefix (system prompt plus exemplars). `generate_greedy` runs that prefix once,
copies its key/value cache for each batch, and feeds only the per-question suffixes, left-padded
between prefix and suffix. The attention mask hides the padding and explicit position ids keep
each suffix contiguous with the prefix, so the logits equal those of the unpadded full prompt up
to float rounding. Each sequence stops at its own stop token and then leaves the batch, with
its rows of the cache, so the remaining rows run on without it.

`generate_sampled` runs the same cached path but draws each token from the temperature-scaled
top-k distribution, several samples per suffix. Each (seed, suffix position, sample index) has
its own random stream, so a sample does not depend on the batch size or on the other rows.

`generate_naive` is the reference path: one `model.generate` call per question on the full
prompt. The benchmark and the tests compare the two.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GreedyReply:
    """One greedy continuation.

    `prob` is the model's probability of the generated tokens before the stop token, the product
    of their softmax probabilities. An empty reply has probability 1.
    """

    text: str
    token_ids: tuple[int, ...]
    prob: float
    is_stopped: bool  # False when max_new_tokens ran out before a stop token


@dataclass(frozen=True)
class SampledReply:
    """One sampled continuation."""

    text: str
    token_ids: tuple[int, ...]
    is_stopped: bool  # False when max_new_tokens ran out before a stop token


# A function that picks the next token of each of the R running rows. It takes the step's
# log-probabilities (R, V), the step number (0 for the first new token) and the rows' indices in
# the batch (R, on the CPU), and returns token ids (R).
TokenChooser = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def stop_token_ids(tokenizer, stop_at_newline: bool) -> set[int]:
    """Return the ids that end a reply: EOS and end-of-turn tokens, plus newlines if asked.

    Base models answering plain-text prompts have no end-of-turn token, so a reply ends at its
    first newline, like the exemplar answers do.
    """
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    if stop_at_newline:
        vocab_ids = range(len(tokenizer))
        ids.update(i for i in vocab_ids if "\n" in tokenizer.decode([i]))
    return ids


def cache_argument(model) -> str:
    """Return the name of the forward argument that takes a key/value cache.

    Transformers 5.25 renamed `past_key_values` to `cache` (the old name warns until 5.40). A
    wrong name would vanish into **kwargs and the prefix would be silently ignored.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _pad_suffixes(suffixes: list[list[int]], pad_id: int, prefix_len: int, device):
    """Left-pad suffixes; return ids, the full attention mask and position ids, all (B, S)."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        ids[row, width - len(suffix) :] = torch.tensor(suffix)
        suffix_mask[row, width - len(suffix) :] = 1
    # Real suffix tokens sit at positions prefix_len, prefix_len + 1, ...; padding slots get the
    # first real position, and the mask hides them anyway.
    positions = (prefix_len + suffix_mask.cumsum(-1) - 1).clamp(min=prefix_len)
    prefix_mask = torch.ones((len(suffixes), prefix_len), dtype=torch.long)
    mask = torch.cat([prefix_mask, suffix_mask], dim=-1)
    return ids.to(device), mask.to(device), positions.to(device)


def _choose_argmax(step_log_probs: torch.Tensor, step: int, rows: torch.Tensor) -> torch.Tensor:
    return step_log_probs.argmax(dim=-1)


def _top_k_chooser(uniforms: torch.Tensor, temperature: float, top_k: int) -> TokenChooser:
    """Build a chooser that samples from the top-k tokens at `temperature`.

    `uniforms` (B, max_new_tokens) contains one draw from [0, 1) per row and step. Inverse-CDF
    sampling over the k tokens sorted by probability needs only that one number, so top_k=1
    always returns the argmax.
    """

    def choose(step_log_probs: torch.Tensor, step: int, rows: torch.Tensor) -> torch.Tensor:
        k = min(top_k, step_log_probs.shape[-1])
        top_log_probs, top_ids = step_log_probs.topk(k, dim=-1)  # both (R, k), best first
        probs = torch.softmax(top_log_probs.double() / temperature, dim=-1)
        cdf = probs.cumsum(dim=-1)
        targets = uniforms[rows, step : step + 1].to(cdf.device) * cdf[:, -1:]
        # Index of the first token whose cumulative probability exceeds the draw. The clamp
        # guards against rounding leaving the last cumulative value below the target.
        picks = (cdf <= targets).sum(dim=-1).clamp(max=k - 1)
        return top_ids.gather(-1, picks.unsqueeze(-1)).squeeze(-1)

    return choose


@torch.inference_mode()
def _decode_batch(
    model,
    cache,
    ids,
    mask,
    positions,
    max_new_tokens: int,
    stops: set[int],
    choose: TokenChooser = _choose_argmax,
) -> list[tuple[list[int], float, bool]]:
    batch = ids.shape[0]
    replies = [_Reply() for _ in range(batch)]
    active = torch.arange(batch)  # batch rows still decoding, in the order of the cache rows
    name = cache_argument(model)
    for step in range(max_new_tokens):
        # logits_to_keep=1 skips the vocabulary projection of every position but the last.
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{name: cache},
        )
        step_log_probs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        next_ids = choose(step_log_probs, step, active)
        is_running = _record_step(replies, active, next_ids, step_log_probs, stops)
        if not bool(is_running.any()):
            break
        cache = out[name]
        if not bool(is_running.all()):
            # Dropping stopped rows from the batch and its cache saves their compute. One long
            # reply would otherwise keep every row of the batch running to max_new_tokens.
            keep = is_running.nonzero().squeeze(-1)
            device_keep = keep.to(next_ids.device)
            cache.batch_select_indices(device_keep)
            active, next_ids = active[keep], next_ids[device_keep]
            mask, positions = mask[device_keep], positions[device_keep]
        ids = next_ids.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
    return [(r.token_ids, math.exp(r.log_prob), r.is_stopped) for r in replies]


@dataclass
class _Reply:
    token_ids: list[int] = field(default_factory=list)
    log_prob: float = 0.0
    is_stopped: bool = False


def _record_step(replies, active, next_ids, step_log_probs, stops: set[int]) -> torch.Tensor:
    """Append each active row's token, or mark the row stopped; return which rows go on."""
    is_running = torch.ones(len(active), dtype=torch.bool)
    for slot, (row, token) in enumerate(zip(active.tolist(), next_ids.tolist())):
        if token in stops:
            replies[row].is_stopped = True
            is_running[slot] = False
        else:
            replies[row].token_ids.append(token)
            replies[row].log_prob += float(step_log_probs[slot, token])
    return is_running


@torch.inference_mode()
def _generate_cached(
    model,
    tokenizer,
    prefix_ids: list[int],
    rows: list[list[int]],
    max_new_tokens: int,
    stops: set[int],
    batch_size: int,
    make_chooser: Callable[[int, int], TokenChooser],
    show_progress: bool,
    desc: str,
) -> list[tuple[list[int], float, bool]]:
    """Decode prefix + row for every row, encoding the prefix once.

    `make_chooser(start, n_rows)` returns the token chooser for rows start .. start + n_rows - 1.
    Returns (new token ids, probability of those tokens, is_stopped) per row, in input order.
    """
    n_empty = sum(len(row) == 0 for row in rows)
    if not prefix_ids or n_empty:
        raise ValueError(
            f"cached generation needs a non-empty prefix and non-empty suffixes, got a "
            f"{len(prefix_ids)}-token prefix and {n_empty} empty suffixes"
        )
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix = model(
        input_ids=torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1
    )
    decoded = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=desc, total=len(starts), disable=not show_progress, leave=False):
        chunk = rows[start : start + batch_size]
        cache = copy.deepcopy(prefix[cache_argument(model)])
        cache.batch_repeat_interleave(len(chunk))
        ids, mask, positions = _pad_suffixes(chunk, pad_id, len(prefix_ids), device)
        choose = make_chooser(start, len(chunk))
        decoded.extend(
            _decode_batch(model, cache, ids, mask, positions, max_new_tokens, stops, choose)
        )
    return decoded


def generate_greedy(
    model,
    tokenizer,
    prefix_ids: list[int],
    suffixes: list[list[int]],
    max_new_tokens: int,
    stops: set[int],
    batch_size: int = 32,
    show_progress: bool = False,
    desc: str = "generate",
) -> list[GreedyReply]:
    """Greedily continue prefix + suffix for every suffix, encoding the prefix once.

    Args:
        prefix_ids: token ids shared by every prompt (at least one token).
        suffixes: per-question token ids, each non-empty.
        stops: token ids that end a reply (see `stop_token_ids`); they are not part of the text.

    Returns:
        One `GreedyReply` per suffix, in input order.
    """
    decoded = _generate_cached(
        model,
        tokenizer,
        prefix_ids,
        suffixes,
        max_new_tokens,
        stops,
        batch_size,
        lambda start, n_rows: _choose_argmax,
        show_progress,
        desc,
    )
    return [
        GreedyReply(tokenizer.decode(tokens, skip_special_tokens=True), tuple(tokens), prob, stop)
        for tokens, prob, stop in decoded
    ]


def _row_uniforms(
    seed: int, n_samples: int, start: int, n_rows: int, max_new_tokens: int
) -> torch.Tensor:
    """Draw (n_rows, max_new_tokens) uniforms from [0, 1) for rows start .. start + n_rows - 1.

    Row r is sample r % n_samples of suffix r // n_samples. Each row gets a generator seeded
    from (seed, suffix position, sample index), so its draws do not depend on the batching.
    """
    uniforms = torch.empty((n_rows, max_new_tokens), dtype=torch.float64)
    for offset in range(n_rows):
        suffix_index, sample_index = divmod(start + offset, n_samples)
        row_seed = np.random.SeedSequence([seed, suffix_index, sample_index]).generate_state(1)
        generator = torch.Generator().manual_seed(int(row_seed[0]))
        uniforms[offset] = torch.rand(max_new_tokens, generator=generator, dtype=torch.float64)
    return uniforms


def generate_sampled(
    model,
    tokenizer,
    prefix_ids: list[int],
    suffixes: list[list[int]],
    n_samples: int,
    temperature: float,
    top_k: int,
    max_new_tokens: int,
    stops: set[int],
    seed: int,
    batch_size: int = 32,
    show_progress: bool = False,
    desc: str = "sample",
) -> list[list[SampledReply]]:
    """Sample `n_samples` continuations of prefix + suffix per suffix, encoding the prefix once.

    Each token is drawn from the `top_k` most probable tokens after dividing the logits by
    `temperature`. The same seed and inputs give the same samples, and sample j of suffix i
    depends only on (seed, i, j) and the model, not on `batch_size`. With top_k=1 the samples
    equal the greedy reply.

    Args:
        suffixes: per-question token ids, each non-empty.
        batch_size: rows per forward pass, where each (suffix, sample) pair is one row.

    Returns:
        One list of `n_samples` replies per suffix, in input order.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    rows = [suffix for suffix in suffixes for _ in range(n_samples)]

    def make_chooser(start: int, n_rows: int) -> TokenChooser:
        uniforms = _row_uniforms(seed, n_samples, start, n_rows, max_new_tokens)
        return _top_k_chooser(uniforms, temperature, top_k)

    decoded = _generate_cached(
        model,
        tokenizer,
        prefix_ids,
        rows,
        max_new_tokens,
        stops,
        batch_size,
        make_chooser,
        show_progress,
        desc,
    )
    replies = [
        SampledReply(tokenizer.decode(tokens, skip_special_tokens=True), tuple(tokens), stop)
        for tokens, _, stop in decoded
    ]
    return [replies[i : i + n_samples] for i in range(0, len(replies), n_samples)]


@torch.inference_mode()
def generate_naive(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    stops: set[int],
    show_progress: bool = False,
) -> list[GreedyReply]:
    """Greedily continue each full prompt with its own `model.generate` call (reference path)."""
    device = next(model.parameters()).device
    replies = []
    for ids in tqdm(prompt_ids, desc="generate (naive)", disable=not show_progress, leave=False):
        out = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stops),
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_tokens = out.sequences[0, len(ids) :].tolist()
        log_prob, kept, stopped = 0.0, [], False
        for token, scores in zip(new_tokens, out.logits):
            if token in stops:
                stopped = True
                break
            kept.append(token)
            log_prob += float(torch.log_softmax(scores[0].float(), dim=-1)[token])
        text = tokenizer.decode(kept, skip_special_tokens=True)
        replies.append(
            GreedyReply(text, tuple(kept), float(torch.exp(torch.tensor(log_prob))), stopped)
        )
    return replies
