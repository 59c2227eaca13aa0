"""How the next token is chosen: the ``Sampling`` options and the named presets.

Kept free of torch so the command line can list the presets without loading the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

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


__all__ = ["SAMPLING_PRESETS", "Sampling", "resolve_sampling"]
