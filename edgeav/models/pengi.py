"""Pengi (config ``base``): an audio clip and a text prompt -> a caption, decoded by GPT-2.

    waveform --HTSAT--> 768 --Projection--> 1024 --L2 norm--> audio mapper --> 40 prefix tokens -+
    prompt --CLIP text--> pooled 512 --text_projection--> 512 --Projection--> 1024 --> text mapper --> 40 --+
                                                                           GPT-2 beam search over the 80 <-+

Module names mirror Pengi's checkpoint (``base.pth``'s ``model`` dict): ``audio_encoder.base``
(:class:`~edgeav.models.htsat.HTSAT`), ``audio_encoder.projection``, ``caption_encoder.base`` (CLIP's
text transformer), ``caption_encoder.clip_text_projection``, ``caption_encoder.projection``,
``caption_decoder.gpt`` (GPT-2 with its LM head), ``caption_decoder.audio_project`` and
``caption_decoder.text_project`` (:class:`~edgeav.models.pengi_mapper.PrefixMapper`). The causal-mask
and position-index buffers older transformers (Pengi pinned 4.28.1) also saved are dropped on load.

Prefixes follow Pengi's wrapper, which is what produced its published captions: with
``normalize_prefix`` the audio embedding is L2-normalised before its mapper; the prompt embedding is
not (Pengi's training forward normalised both; its wrapper never does it for the prompt).

The config ``base_no_text_enc`` (GPT-2 token embeddings of the prompt instead of CLIP) is not built.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from edgeav.errors import CheckpointError, OptionError
from edgeav.models.clip_text import CLIP_TEXT_PRESETS, CLIPTextConfig, CLIPTextTower
from edgeav.models.gpt2 import GPT2_PRESETS, GPT2Config, GPT2Decoder
from edgeav.models.htsat import HTSAT, HTSAT_PRESETS, HTSATConfig
from edgeav.models.pengi_mapper import PrefixMapper, Projection, beam_search
from edgeav.weight_files import read_pickle

__all__ = ["PENGI_PRESETS", "Pengi", "PengiConfig", "beam_search", "pengi_preset", "read_pengi_checkpoint",
           "write_pengi_checkpoint"]

# GPT-2's lone-space token "Ġ": the first id of the wrapper's stop string " <|endoftext|>"
# (edgeav.bpe_tokenizers.GPT2BPE.stop_token_id computes it from the vocabulary).
GPT2_STOP_TOKEN_ID = 220


@dataclass(frozen=True)
class PengiConfig:
    """Pengi's shapes. The defaults are ``configs/base.yml`` as its code builds it.

    ``text_embed_dim``: base.yml's ``transformer_embed_dim``, the width of CLIP's text projection.
    ``mapper_layers``: the layers each prefix mapper really has; base.yml's ``num_layers`` 8 is halved
    by Pengi's decoder. ``enc_text_len``: prompt tokens (truncated or padded) given to CLIP.
    ``stop_token_id``: where beam search stops (see :data:`GPT2_STOP_TOKEN_ID`).
    """

    name: str = "pengi-base"
    htsat: HTSATConfig = field(default_factory=lambda: HTSAT_PRESETS["pengi"])
    clip_text: CLIPTextConfig = field(default_factory=lambda: CLIP_TEXT_PRESETS["clip-vit-b-16"])
    gpt2: GPT2Config = field(default_factory=lambda: GPT2_PRESETS["gpt2"])
    text_embed_dim: int = 512
    d_proj: int = 1024
    prefix_length: int = 40
    clip_length: int = 40
    mapper_layers: int = 4
    mapper_heads: int = 8
    mapper_mlp_ratio: float = 2.0
    normalize_prefix: bool = True
    enc_text_len: int = 40
    stop_token_id: int = GPT2_STOP_TOKEN_ID

    def __post_init__(self) -> None:
        if self.gpt2.n_embd % self.mapper_heads:
            raise OptionError(f"Pengi config: the mapper's {self.mapper_heads} heads do not divide GPT-2's width "
                              f"{self.gpt2.n_embd}; choose sizes that divide")
        if self.enc_text_len > self.clip_text.max_position_embeddings:
            raise OptionError(f"Pengi config: enc_text_len {self.enc_text_len} exceeds CLIP's "
                              f"{self.clip_text.max_position_embeddings} positions; use at most that many")
        if not 0 <= self.stop_token_id < self.gpt2.vocab_size:
            raise OptionError(f"Pengi config: stop_token_id {self.stop_token_id} is outside GPT-2's vocabulary "
                              f"(0..{self.gpt2.vocab_size - 1})")

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "htsat": self.htsat.to_dict(), "clip_text": self.clip_text.to_dict(),
                "gpt2": self.gpt2.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> PengiConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OptionError(f"Pengi config: unknown field {unknown[0]!r}; expected some of "
                              f"{', '.join(sorted(known))}")
        parts = {"htsat": HTSATConfig, "clip_text": CLIPTextConfig, "gpt2": GPT2Config}
        return cls(**{key: parts[key].from_dict(value) if key in parts else value for key, value in data.items()})


PENGI_PRESETS: dict[str, PengiConfig] = {
    "pengi-base": PengiConfig(),
    # Spec section 9's tiny towers; the prefix lengths differ so a mix-up of the two shows.
    "tiny": PengiConfig(name="tiny", htsat=HTSAT_PRESETS["tiny"], clip_text=CLIP_TEXT_PRESETS["tiny"],
                        gpt2=GPT2_PRESETS["tiny"], text_embed_dim=24, d_proj=48, prefix_length=6, clip_length=5,
                        mapper_layers=2, mapper_heads=8),
}


def pengi_preset(name: str) -> PengiConfig:
    """The named preset; an unknown name gets the list and the closest match."""
    if name in PENGI_PRESETS:
        return PENGI_PRESETS[name]
    close = difflib.get_close_matches(name, PENGI_PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown Pengi preset {name!r}; expected one of {', '.join(PENGI_PRESETS)}.{hint}")


class PengiAudioEncoder(nn.Module):
    def __init__(self, cfg: PengiConfig):
        super().__init__()
        self.base = HTSAT(cfg.htsat)
        self.projection = Projection(cfg.htsat.num_features, cfg.d_proj)

    def forward(self, waveform: Tensor) -> Tensor:
        return self.projection(self.base(waveform)["embedding"])


class PengiTextEncoder(nn.Module):
    def __init__(self, cfg: PengiConfig):
        super().__init__()
        self.base = CLIPTextTower(cfg.clip_text)
        self.clip_text_projection = nn.Linear(cfg.clip_text.hidden_size, cfg.text_embed_dim, bias=False)
        self.projection = Projection(cfg.text_embed_dim, cfg.d_proj)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.projection(self.clip_text_projection(self.base(input_ids, attention_mask)[1]))


class PengiCaptionDecoder(nn.Module):
    def __init__(self, cfg: PengiConfig):
        super().__init__()
        self.gpt = GPT2Decoder(cfg.gpt2)
        mapper = dict(d_in=cfg.d_proj, width=cfg.gpt2.n_embd, prefix_length=cfg.prefix_length,
                      clip_length=cfg.clip_length, num_layers=cfg.mapper_layers, num_heads=cfg.mapper_heads,
                      mlp_ratio=cfg.mapper_mlp_ratio)
        self.audio_project = PrefixMapper(**mapper)
        self.text_project = PrefixMapper(**mapper)


class Pengi(nn.Module):
    """Pengi ``base``: audio and prompt embeddings, the GPT-2 prefix, and the wrapper's captioning."""

    def __init__(self, config: PengiConfig):
        super().__init__()
        self.config = config
        self.audio_encoder = PengiAudioEncoder(config)
        self.caption_encoder = PengiTextEncoder(config)
        self.caption_decoder = PengiCaptionDecoder(config)

    @classmethod
    def from_preset(cls, name: str) -> Pengi:
        """A randomly initialised model of a named preset (see :data:`PENGI_PRESETS`)."""
        return cls(pengi_preset(name))

    @property
    def gpt(self):
        """GPT-2, as :func:`describe` drives it."""
        return self.caption_decoder.gpt

    def audio_embedding(self, waveform: Tensor) -> Tensor:
        """``waveform`` [B, samples] at ``config.htsat.sample_rate`` -> projected embedding [B, d_proj]."""
        if waveform.dim() != 2:
            raise OptionError(f"Pengi waveform: expected shape [clips, samples], got {list(waveform.shape)}; "
                              "pass mono audio, one row per clip")
        return self.audio_encoder(waveform)

    def prompt_embedding(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Prompt ids and mask [B, L] (:meth:`edgeav.bpe_tokenizers.CLIPBPE.encode_prompts`) -> [B, d_proj]."""
        if input_ids.shape != attention_mask.shape:
            raise OptionError(f"Pengi prompt: ids {list(input_ids.shape)} and mask {list(attention_mask.shape)} "
                              "differ in shape; pass both from CLIPBPE.encode_prompts")
        return self.caption_encoder(input_ids, attention_mask)

    def prefix(self, audio_embed: Tensor, prompt_embed: Tensor) -> Tensor:
        """GPT-2's input prefix [B, 2 x prefix_length, n_embd]: the audio tokens, then the prompt tokens."""
        if self.config.normalize_prefix:
            audio_embed = audio_embed / audio_embed.norm(2, -1, keepdim=True)
        decoder = self.caption_decoder
        return torch.cat((decoder.audio_project(audio_embed), decoder.text_project(prompt_embed)), dim=1)

    def describe(self, waveform: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, *, beam_size: int = 3,
                 max_len: int = 30, temperature: float = 1.0) -> list[list[int]]:
        """See :func:`describe`."""
        return describe(self, waveform, prompt_ids, prompt_mask, beam_size=beam_size, max_len=max_len,
                        temperature=temperature)


@torch.no_grad()
def describe(pengi, waveform: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, *, beam_size: int = 3,
             max_len: int = 30, temperature: float = 1.0) -> list[list[int]]:
    """The captions of one clip [1, samples] for each prompt [P, L]: per prompt the best beam's GPT-2 ids
    without the stop token (decode them with :class:`edgeav.bpe_tokenizers.GPT2BPE`). The audio is encoded
    once for every prompt. ``pengi`` is :class:`Pengi` or an engine with its ``audio_embedding``,
    ``prompt_embedding``, ``prefix``, ``caption_decoder.gpt``-like ``gpt`` and ``config``."""
    if waveform.shape[0] != 1:
        raise OptionError(f"Pengi describe: one clip at a time, got {waveform.shape[0]}; call it once per clip")
    audio = pengi.audio_embedding(waveform)
    prompts = pengi.prompt_embedding(prompt_ids, prompt_mask)
    stop = pengi.config.stop_token_id
    captions = []
    for row in range(prompts.shape[0]):
        prefix = pengi.prefix(audio, prompts[row:row + 1])
        best = beam_search(pengi.gpt, prefix, stop_token_id=stop, beam_size=beam_size, max_len=max_len,
                           temperature=temperature)[0].ids
        captions.append(list(best[:-1] if best and best[-1] == stop else best))
    return captions


def read_pengi_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The ``model`` state dict of a Pengi checkpoint (``{"model": state_dict, ...}``), read weights-only;
    a ``module.`` prefix (a model saved from DataParallel) is stripped as Pengi's loader does."""
    path = Path(path)
    data = read_pickle(path)
    state = data.get("model")
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: is not a Pengi checkpoint (expected a dict whose 'model' entry is a state "
                              f"dict of tensors; found entries {sorted(map(str, data))[:5]}); pass base.pth itself")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def write_pengi_checkpoint(model: Pengi, path: str | Path) -> Path:
    """Save ``model`` as Pengi's files are laid out, ``{"model": state_dict}`` (synthetic checkpoints)."""
    path = Path(path)
    torch.save({"model": model.state_dict()}, path)
    return path
