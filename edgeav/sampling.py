"""How the next token is chosen: the ``Sampling`` options, the named presets, and the numpy sampler
that exported engines decode with.

Kept free of torch: the command line lists the presets without loading the model stack, and an engine
samples without torch (the torch twin is :func:`edgeav.generate.next_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeav.errors import OptionError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0 means greedy (the default)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise OptionError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OptionError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Crab's sampling: Llama-2-chat's generation config (temperature 0.6, top-p 0.9)
# on top of transformers' default top-k of 50, seed 42 as in Crab's scripts.
SAMPLING_PRESETS = {
    "greedy": Sampling(),
    "crab": Sampling(temperature=0.6, top_p=0.9, top_k=50, seed=42),
}

def resolve_sampling(sampling: str | Sampling) -> Sampling:
    """A preset name or a :class:`Sampling` -> the :class:`Sampling`; an unknown name is refused."""
    if isinstance(sampling, Sampling):
        return sampling
    if sampling not in SAMPLING_PRESETS:
        raise OptionError(f"unknown sampling {sampling!r}; expected one of {', '.join(SAMPLING_PRESETS)}")
    return SAMPLING_PRESETS[sampling]


def token_probabilities_numpy(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution a sampled token is drawn from, for logits [V]: temperature, then top-k, then top-p
    (nucleus) -> float32 probabilities [V]. The steps of :func:`edgeav.generate.token_probabilities`, in numpy."""
    logits = np.asarray(logits, np.float32) / np.float32(sampling.temperature)
    if sampling.top_k:
        k = min(sampling.top_k, logits.shape[-1])
        kth = np.partition(logits, logits.shape[-1] - k)[logits.shape[-1] - k]
        logits = np.where(logits < kth, np.float32(-np.inf), logits)
    if sampling.top_p < 1:
        order = np.argsort(logits, kind="stable")
        cumulative = np.cumsum(_softmax(logits[order]), dtype=np.float64).astype(np.float32)
        drop = cumulative <= 1 - sampling.top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.copy()
        logits[order[drop]] = -np.inf
    return _softmax(logits)


def next_token_numpy(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None) -> int:
    """The next token from logits [V]: the argmax (greedy; the first of equal maxima, as torch's) or a draw
    from :func:`token_probabilities_numpy` with ``rng``. Seeded draws repeat, but they are numpy's, so a
    sampled answer differs from the torch reference's at the same seed."""
    if sampling.greedy:
        return int(np.argmax(logits))
    probabilities = token_probabilities_numpy(logits, sampling)
    cumulative = np.cumsum(probabilities, dtype=np.float64)
    # The first token whose cumulative probability passes the draw: a token of probability 0 never is.
    token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(token, int(np.flatnonzero(probabilities)[-1]))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


__all__ = ["SAMPLING_PRESETS", "Sampling", "next_token_numpy", "resolve_sampling", "token_probabilities_numpy"]
