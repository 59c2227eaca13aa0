"""Prefill then KV-cached decode, greedy or sampled, capturing the mask hidden states.

The LLM is anything with ``forward(inputs_embeds [B, T, D], input_pos [T], kv_len) ->
(logits [B, T, V], last_hidden [B, T, D])``, ``embed(ids)`` and a KV cache of
``max_seq_len`` positions set up beforehand (the reference :mod:`edgeav.models.llama` and the exported
engines share this interface).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from edgeav.errors import OptionError
from edgeav.sampling import SAMPLING_PRESETS, Sampling


# A loop: the last REPEAT_MIN_TOKENS or more tokens are one n-gram of 1..REPEAT_MAX_NGRAM tokens over
# and over. Greedy decoding never leaves one, and a sampled run that repeats one n-gram that long has
# stopped saying anything new, so either way going on only burns the token budget.
REPEAT_MAX_NGRAM = 8
REPEAT_MIN_TOKENS = 32


@dataclass
class Generation:
    """What one generation produced.

    ``stopped_by``: "eos" (the model ended its answer), "max_new_tokens" (the limit cut it
    short) or "repetition" (it was repeating ``repeated`` over and over: :func:`repetition`).
    """

    token_ids: list[int]
    # Post-norm last-layer hidden states of the steps that produced mask tokens (Crab's <mask_i>,
    # u-LLaVA's [SEG]): [n, D], or None when none (or fewer than asked) were generated.
    mask_hidden: torch.Tensor | None
    prefill_s: float
    decode_s: float
    stopped_by: str = "eos"
    repeated: list[int] | None = None  # the n-gram of a "repetition" stop


def repetition(tokens: list[int], *, max_ngram: int = REPEAT_MAX_NGRAM,
               min_tokens: int = REPEAT_MIN_TOKENS) -> list[int] | None:
    """The n-gram (1 to ``max_ngram`` tokens) that ``tokens`` end with, repeated back to back over at
    least the last ``min_tokens`` tokens; None when they do not end in such a loop."""
    if len(tokens) < min_tokens:
        return None
    for n in range(1, max_ngram + 1):
        ngram = tokens[-n:]
        copies = -(-min_tokens // n)  # whole copies covering min_tokens
        if len(tokens) >= copies * n and tokens[-copies * n:] == ngram * copies:
            return ngram
    return None


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token from logits [B, V] -> [B]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    llm,
    inputs_embeds: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    mask_token_ids: tuple[int, ...] = (),
    n_mask_tokens: int | None = 6,
    sampling: Sampling = SAMPLING_PRESETS["greedy"],
    forced: list[int] | None = None,
    logits_out: list[torch.Tensor] | None = None,
    stop_repeats: bool = True,
) -> Generation:
    """Generate from one prompt of embeddings [1, T, D] until EOS, ``max_new_tokens`` or a loop.

    ``mask_token_ids``: the states that produced these tokens are kept (:attr:`Generation.mask_hidden`):
    the last ``n_mask_tokens`` of them, or every one (``None``).

    ``stop_repeats``: stop as soon as the answer ends in a loop (:func:`repetition`), keeping the
    tokens written so far; ``stopped_by`` says which of the three ended it.

    ``forced`` (teacher forcing, for fidelity receipts): feed these tokens instead of the
    chosen ones, the last one included, then stop (never earlier: a forced loop is fed whole):
    with ``logits_out`` that gives ``len(forced) + 1`` distributions, as many as a free run that
    wrote ``forced`` and then EOS. ``logits_out`` receives the fp32 next-token logits [V] of every step,
    prefill's included.

    This loop reads every token back to the host; :func:`edgeav.fastpath.generate_fast` gives the
    same tokens and mask states without that, for torch models (the runtime uses it on CUDA).
    """
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise OptionError(f"generate takes one prompt [1, T, D], got {tuple(inputs_embeds.shape)}")
    prompt_len = inputs_embeds.shape[1]
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=inputs_embeds.device).manual_seed(sampling.seed)
    room = llm.max_seq_len - prompt_len
    if room <= 0:
        raise OptionError(f"the prompt has {prompt_len} tokens; the KV cache holds {llm.max_seq_len}")
    max_new_tokens = min(max_new_tokens, room)
    if forced is not None:
        max_new_tokens = min(len(forced), room - 1)

    start = time.perf_counter()
    logits, hidden = llm(inputs_embeds, torch.arange(prompt_len, device=inputs_embeds.device), prompt_len)
    token = next_token(logits[:, -1], sampling, generator)
    prefill_s = time.perf_counter() - start
    if logits_out is not None:
        logits_out.append(logits[0, -1].float())

    tokens: list[int] = []
    mask_hidden: list[torch.Tensor] = []
    stopped_by, repeated = "max_new_tokens", None
    last_hidden = hidden[0, -1]
    decode_start = time.perf_counter()
    for step in range(max_new_tokens):
        if forced is not None:
            token = torch.tensor([forced[step]], device=inputs_embeds.device)
        token_id = int(token)
        if token_id == eos_id:
            stopped_by = "eos"
            break
        tokens.append(token_id)
        if token_id in mask_token_ids:
            mask_hidden.append(last_hidden)  # the state that produced this <mask_i>
        if stop_repeats and forced is None:
            repeated = repetition(tokens)
            if repeated is not None:
                stopped_by = "repetition"
                break
        if step == max_new_tokens - 1 and forced is None:
            break
        pos = torch.tensor([prompt_len + step], device=inputs_embeds.device)
        logits, hidden = llm(llm.embed(token.view(1, 1)), pos, prompt_len + step + 1)
        token = next_token(logits[:, -1], sampling, generator)
        last_hidden = hidden[0, -1]
        if logits_out is not None:
            logits_out.append(logits[0, -1].float())
    decode_s = time.perf_counter() - decode_start
    return Generation(
        token_ids=tokens,
        mask_hidden=kept_mask_states(mask_hidden, n_mask_tokens),
        prefill_s=prefill_s,
        decode_s=decode_s,
        stopped_by=stopped_by,
        repeated=repeated,
    )


def ensure_cache(llm, length: int, context: int) -> None:
    """Grow ``llm``'s KV cache to hold ``length`` positions (at least 256, at most the model's ``context``);
    later runs that fit reuse it."""
    if length > llm.max_seq_len:
        llm.setup_caches(1, min(max(length, 256), context))


def kept_mask_states(states: list[torch.Tensor], n_mask_tokens: int | None) -> torch.Tensor | None:
    """The mask-token states a generation hands back: the last ``n_mask_tokens`` ([n, D], None when fewer
    were written), or all of them with ``None`` (None when there is none)."""
    kept = states if n_mask_tokens is None else states[-n_mask_tokens:] if n_mask_tokens else []
    if not kept or (n_mask_tokens is not None and len(kept) != n_mask_tokens):
        return None
    return torch.stack(kept)


def splice_blocks(text: torch.Tensor, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Token embeddings [L, D] with each placeholder row replaced by its block's rows -> [1, L', D]."""
    pieces, start = [], 0
    for position, token in enumerate(token_ids):
        if token in blocks:
            pieces.append(text[start:position])
            pieces.append(blocks[token].to(text.dtype))
            start = position + 1
    pieces.append(text[start:])
    return torch.cat(pieces)[None]


def fill_placeholders(text: torch.Tensor, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Token embeddings [L, D] where each placeholder id stands once per row of its block (Qwen's
    ``<|AUDIO|>`` repeated per audio token) -> [1, L, D] with those rows replaced by the block's, in order."""
    ids = torch.tensor(token_ids, dtype=torch.long, device=text.device)
    for placeholder, rows in blocks.items():
        where = (ids == placeholder).nonzero().squeeze(-1)
        if where.numel() != rows.shape[0]:
            raise ValueError(f"the prompt has {where.numel()} placeholders {placeholder} for {rows.shape[0]} rows")
        text = text.index_copy(0, where, rows.to(text.dtype))
    return text[None]
