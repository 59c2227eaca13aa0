"""Prefill then KV-cached decode of a torch LLM, greedy or sampled, capturing the mask hidden states.

The LLM is anything with ``forward(inputs_embeds [B, T, D], input_pos [T], kv_len) ->
(logits [B, T, V], last_hidden [B, T, D])``, ``embed(ids)`` and a KV cache of
``max_seq_len`` positions set up beforehand (the reference :mod:`edgeav.models.llama` and the exported
engines share this interface). The loop and its rules are :func:`edgeav.decoding.decode`'s, shared with
the numpy loop exported engines run without torch (:func:`edgeav.decoding.generate_numpy`); this module
holds their torch side.
"""

from __future__ import annotations

import torch

from edgeav.decoding import Generation, decode, kept_states, splice_order
from edgeav.errors import OptionError
from edgeav.sampling import SAMPLING_PRESETS, Sampling


def token_probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a sampled token is drawn from, for logits [B, V]: temperature, then top-k, then
    top-p (nucleus) -> probabilities [B, V]."""
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
    return logits.softmax(dim=-1)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token from logits [B, V] -> [B]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(token_probabilities(logits, sampling), 1, generator=generator).squeeze(-1)


class TorchSteps:
    """:class:`~edgeav.decoding.LLMSteps` of a torch LLM: tokens stay [1] tensors on its device, read back
    once per step by the loop's EOS test."""

    def __init__(self, llm, inputs_embeds: torch.Tensor, sampling: Sampling) -> None:
        self.llm, self.inputs_embeds, self.sampling = llm, inputs_embeds, sampling
        self.device = inputs_embeds.device
        self.generator = None
        if not sampling.greedy:
            self.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_len = self.inputs_embeds.shape[1]
        logits, hidden = self.llm(self.inputs_embeds, torch.arange(prompt_len, device=self.device), prompt_len)
        return logits[:, -1], hidden[0, -1]

    def step(self, token: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.tensor([position], device=self.device)
        logits, hidden = self.llm(self.llm.embed(token.view(1, 1)), pos, position + 1)
        return logits[:, -1], hidden[0, -1]

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        return next_token(logits, self.sampling, self.generator)

    def token(self, token_id: int) -> torch.Tensor:
        return torch.tensor([token_id], device=self.device)

    def kept_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[0].float()

    def stack(self, states: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(states)


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

    ``stop_repeats``: stop as soon as the answer ends in a loop (:func:`~edgeav.decoding.repetition`), keeping the
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
    return decode(TorchSteps(llm, inputs_embeds, sampling), prompt_len=inputs_embeds.shape[1],
                  max_seq_len=llm.max_seq_len, max_new_tokens=max_new_tokens, eos_id=eos_id,
                  mask_token_ids=mask_token_ids, n_mask_tokens=n_mask_tokens, forced=forced, logits_out=logits_out,
                  stop_repeats=stop_repeats)


def kept_mask_states(states: list[torch.Tensor], n_mask_tokens: int | None) -> torch.Tensor | None:
    """The mask-token states a generation hands back: the last ``n_mask_tokens`` ([n, D], None when fewer
    were written), or all of them with ``None`` (None when there is none)."""
    kept = kept_states(states, n_mask_tokens)
    return None if kept is None else torch.stack(kept)


def splice_blocks(text: torch.Tensor, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Token embeddings [L, D] with each placeholder row replaced by its block's rows -> [1, L', D]."""
    pieces = [text[part] if isinstance(part, slice) else blocks[part].to(text.dtype)
              for part in splice_order(token_ids, blocks)]
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


__all__ = ["TorchSteps", "fill_placeholders", "generate", "kept_mask_states", "next_token", "splice_blocks",
           "token_probabilities"]
