"""The token loop, whatever arrays the LLM computes in: prefill, then one step per token until EOS, the
token limit or a loop, keeping the states that wrote mask tokens.

:func:`decode` drives :class:`LLMSteps`, an LLM in its own array type: torch tensors on the model's
device (:func:`edgeav.generate.generate`) or numpy arrays on the host (:func:`generate_numpy`, the
exported engines). The rules (when to stop, which states to keep, where feature blocks go in a prompt)
live here once. This module imports no torch, so an engine decodes with numpy and ONNX Runtime alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeav.errors import OptionError
from edgeav.sampling import SAMPLING_PRESETS, Sampling, next_token_numpy

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
    # u-LLaVA's [SEG]): [n, D] in the LLM's array type, or None when none (or fewer than asked) were generated.
    mask_hidden: Any
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


def kept_states(states: list, n_mask_tokens: int | None) -> list | None:
    """The mask-token states a generation hands back: the last ``n_mask_tokens`` (None when fewer were
    written), or all of them with ``None`` (None when there is none)."""
    kept = states if n_mask_tokens is None else states[-n_mask_tokens:] if n_mask_tokens else []
    if not kept or (n_mask_tokens is not None and len(kept) != n_mask_tokens):
        return None
    return kept


def ensure_cache(llm, length: int, context: int) -> None:
    """Grow ``llm``'s KV cache to hold ``length`` positions (at least 256, at most the model's ``context``);
    later runs that fit reuse it."""
    if length > llm.max_seq_len:
        llm.setup_caches(1, min(max(length, 256), context))


def splice_order(token_ids: list[int], placeholders) -> list[slice | int]:
    """Where a prompt's rows come from once each placeholder id (one of ``placeholders``) is replaced by its
    block: in order, a slice of the token rows, or the placeholder whose block goes there."""
    order: list[slice | int] = []
    start = 0
    for position, token in enumerate(token_ids):
        if token in placeholders:
            order += [slice(start, position), token]
            start = position + 1
    order.append(slice(start, len(token_ids)))
    return order


def splice_rows(text: np.ndarray, token_ids: list[int], blocks: dict[int, np.ndarray]) -> np.ndarray:
    """Token embeddings [L, D] with each placeholder row replaced by its block's rows -> [1, L', D] (numpy;
    the torch twin is :func:`edgeav.generate.splice_blocks`)."""
    pieces = [text[part] if isinstance(part, slice) else np.asarray(blocks[part], text.dtype)
              for part in splice_order(token_ids, blocks)]
    return np.concatenate(pieces)[None]


class LLMSteps(Protocol):
    """One prompt's LLM as :func:`decode` drives it, in the LLM's own array type."""

    def prefill(self) -> tuple[Any, Any]:
        """Run the prompt -> the next-token logits [1, V] and the hidden state [D] of its last position."""

    def step(self, token, position: int) -> tuple[Any, Any]:
        """Feed ``token`` at ``position`` -> the next-token logits [1, V] and the hidden state [D]."""

    def pick(self, logits):
        """The next token (greedy or sampled) from logits [1, V], in the form :meth:`step` takes."""

    def token(self, token_id: int):
        """A forced token id in the form :meth:`step` takes."""

    def kept_logits(self, logits):
        """What ``logits_out`` keeps of a step's logits: the fp32 row [V]."""

    def stack(self, states: list):
        """Hidden states [D] stacked to [n, D]."""


def decode(steps: LLMSteps, *, prompt_len: int, max_seq_len: int, max_new_tokens: int, eos_id: int,
           mask_token_ids: tuple[int, ...] = (), n_mask_tokens: int | None = 6, forced: list[int] | None = None,
           logits_out: list | None = None, stop_repeats: bool = True) -> Generation:
    """Generate from one prompt of ``prompt_len`` tokens until EOS, ``max_new_tokens`` or a loop (the arguments
    are :func:`edgeav.generate.generate`'s; ``max_seq_len`` is the KV cache's length). Each token is read
    back (``int``) to test it before the next step."""
    room = max_seq_len - prompt_len
    if room <= 0:
        raise OptionError(f"the prompt has {prompt_len} tokens; the KV cache holds {max_seq_len}")
    max_new_tokens = min(max_new_tokens, room)
    if forced is not None:
        max_new_tokens = min(len(forced), room - 1)

    start = time.perf_counter()
    logits, hidden = steps.prefill()
    token = steps.pick(logits)
    prefill_s = time.perf_counter() - start
    if logits_out is not None:
        logits_out.append(steps.kept_logits(logits))

    tokens: list[int] = []
    mask_hidden: list = []
    stopped_by, repeated = "max_new_tokens", None
    decode_start = time.perf_counter()
    for step in range(max_new_tokens):
        if forced is not None:
            token = steps.token(forced[step])
        token_id = int(token)
        if token_id == eos_id:
            stopped_by = "eos"
            break
        tokens.append(token_id)
        if token_id in mask_token_ids:
            mask_hidden.append(hidden)  # the state that produced this <mask_i>
        if stop_repeats and forced is None:
            repeated = repetition(tokens)
            if repeated is not None:
                stopped_by = "repetition"
                break
        if step == max_new_tokens - 1 and forced is None:
            break
        logits, hidden = steps.step(token, prompt_len + step)
        token = steps.pick(logits)
        if logits_out is not None:
            logits_out.append(steps.kept_logits(logits))
    decode_s = time.perf_counter() - decode_start
    kept = kept_states(mask_hidden, n_mask_tokens)
    return Generation(token_ids=tokens, mask_hidden=None if kept is None else steps.stack(kept), prefill_s=prefill_s,
                      decode_s=decode_s, stopped_by=stopped_by, repeated=repeated)


class NumpySteps:
    """:class:`LLMSteps` of an LLM with numpy in and out (an exported engine's
    :class:`~edgeav.engines.onnx.OnnxLLM`: ``step(inputs_embeds [1, T, D], past) -> (logits [1, V],
    hidden [1, D])`` and ``embed_ids(ids) -> [n, D]``); tokens are ints."""

    def __init__(self, llm, inputs_embeds: np.ndarray, sampling: Sampling) -> None:
        self.llm, self.inputs_embeds, self.sampling = llm, inputs_embeds, sampling
        self.rng = None if sampling.greedy else np.random.default_rng(sampling.seed)

    def prefill(self) -> tuple[np.ndarray, np.ndarray]:
        logits, hidden = self.llm.step(self.inputs_embeds, 0)
        return logits, hidden[0]

    def step(self, token: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        logits, hidden = self.llm.step(self.llm.embed_ids([token])[None], position)
        return logits, hidden[0]

    def pick(self, logits: np.ndarray) -> int:
        return next_token_numpy(logits[0], self.sampling, self.rng)

    def token(self, token_id: int) -> int:
        return token_id

    def kept_logits(self, logits: np.ndarray) -> np.ndarray:
        return logits[0]

    def stack(self, states: list) -> np.ndarray:
        return np.stack(states)


def generate_numpy(llm, inputs_embeds: np.ndarray, *, max_new_tokens: int, eos_id: int,
                   mask_token_ids: tuple[int, ...] = (), n_mask_tokens: int | None = 6,
                   sampling: Sampling = SAMPLING_PRESETS["greedy"], forced: list[int] | None = None,
                   logits_out: list | None = None, stop_repeats: bool = True) -> Generation:
    """:func:`edgeav.generate.generate` for an LLM with numpy in and out (:class:`NumpySteps`): the same loop and
    rules, so greedy decoding gives the same tokens from the same logits. ``mask_hidden`` and ``logits_out``'s
    rows are numpy arrays; sampled tokens are drawn by numpy (:func:`edgeav.sampling.next_token_numpy`)."""
    inputs_embeds = np.ascontiguousarray(inputs_embeds, np.float32)
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
        raise OptionError(f"generate takes one prompt [1, T, D], got {tuple(inputs_embeds.shape)}")
    return decode(NumpySteps(llm, inputs_embeds, sampling), prompt_len=inputs_embeds.shape[1],
                  max_seq_len=llm.max_seq_len, max_new_tokens=max_new_tokens, eos_id=eos_id,
                  mask_token_ids=mask_token_ids, n_mask_tokens=n_mask_tokens, forced=forced, logits_out=logits_out,
                  stop_repeats=stop_repeats)


__all__ = ["Generation", "LLMSteps", "NumpySteps", "REPEAT_MAX_NGRAM", "REPEAT_MIN_TOKENS", "decode",
           "ensure_cache", "generate_numpy", "kept_states", "repetition", "splice_order", "splice_rows"]
