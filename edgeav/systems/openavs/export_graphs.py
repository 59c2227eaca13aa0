"""OpenAVS's graphs for ``edgeav export``: thin wrappers over the reference modules, their names and dynamic
axes, example inputs, the shapes the manifest's config implies and TensorRT profiles.

The graphs cover every stage of every variant:

- ``pengi_audio``: Pengi's 44.1-kHz 7-s window ``[B, samples]`` -> its audio embedding ``[B, d_proj]``;
  the whole HTSAT path is in the graph (the convolution STFT, log-mel, ``bn0``, the bicubic time stretch
  as a cubic Resize with aligned corners, the Swin stages, the projection);
- ``pengi_prompt``: CLIP ids and mask ``[B, L]`` -> the prompt embedding ``[B, d_proj]``;
- ``pengi_prefix``: the two embeddings -> GPT-2's prefix ``[B, 2 x prefix_length, n_embd]``
  (the audio embedding L2-normalised first when ``normalize_prefix`` is on, as the reference);
- ``gpt2``: GPT-2 over an explicit KV cache (:class:`GPT2Graph`); the token table beside it as
  ``gpt2_embed.npy`` gives both the token embeddings and the tied LM head;
- ``grounding``: GroundingDINO at any picture size and caption length (:data:`edgeav.export.graphs.GROUNDING`);
- ``sam_encoder`` and ``sam_decoder``: SAM pixels -> the image embedding; box prompts ``[N, 4]`` in
  model-input pixels and one image embedding -> single-mask low-res logits ``[N, 1, 4g, 4g]``;
- ``beats`` (when the checkpoint has the fine-tuned BEATs): fbank ``[1, T, 128]`` -> AudioSet
  probabilities ``[1, classes]``, T free;
- ``thinker_audio``, ``thinker_vision``, ``thinker_llm`` (when the checkpoint has the Qwen2.5-Omni thinker):
  its audio tower on one 2-s log-mel chunk, its ViT on one 224x224 slice and its LLM over an explicit KV
  cache with M-RoPE positions as an input, as Crab+ exports them (:mod:`edgeav.export.qwen_graphs`); the
  token table beside them as ``thinker_embed.npy``;
- ``sam2_encoder`` and ``sam2_decoder`` (when the checkpoint has SAM2): pixels -> the image's three
  feature maps; those and a prompt of ``P`` points with labels -> the single mask's low-res logits, IoU
  and object score. A box is the prompt :func:`~edgeav.preprocess.sam2.sam2_prompt` makes of it: its
  corners (labels 2, 3) and a padding point (-1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import OptionError
from edgeav.export.graphs import GROUNDING, GraphSpec, grounding_example_size, llm_graph
from edgeav.export.qwen_graphs import (
    AUDIO_GRAPH, SAM2_DECODER, SAM2_ENCODER, VISION_GRAPH, AudioChunkGraph, Sam2DecoderGraph, Sam2EncoderGraph,
    VisionSliceGraph, sam2_examples, sam2_profiles, sam2_shapes, tower_examples, tower_profiles, tower_shapes,
)
from edgeav.models.gpt2 import GPT2Decoder
from edgeav.models.grounding_dino import GroundingDINOConfig
from edgeav.models.pengi import Pengi, PengiConfig, pengi_preset
from edgeav.models.sam import Sam, sam_config
from edgeav.models.sam2 import sam2_config
from edgeav.systems.openavs.config import OpenAVSConfig
from edgeav.systems.openavs.onnx_engine import THINKER

if TYPE_CHECKING:
    from edgeav.systems.openavs.checkpoints import LoadedOpenAVS

PENGI_WINDOW_S = 7  # pengi_waveform's window
PENGI_AUDIO = GraphSpec(("waveform",), ("audio_embedding",),
                        {"waveform": {0: "clips"}, "audio_embedding": {0: "clips"}})
PENGI_PROMPT = GraphSpec(("input_ids", "attention_mask"), ("prompt_embedding",),
                         {"input_ids": {0: "prompts"}, "attention_mask": {0: "prompts"},
                          "prompt_embedding": {0: "prompts"}})
PENGI_PREFIX = GraphSpec(("audio_embedding", "prompt_embedding"), ("prefix",),
                         {"audio_embedding": {0: "clips"}, "prompt_embedding": {0: "clips"}, "prefix": {0: "clips"}})
# KV layout [positions, layers, 2, beams, heads, head_dim]: a position's entries are one contiguous block.
GPT2 = GraphSpec(("inputs_embeds", "past_kv"), ("hidden", "new_kv"),
                 {"inputs_embeds": {0: "beams", 1: "tokens"}, "past_kv": {0: "past", 3: "beams"},
                  "hidden": {0: "beams"}, "new_kv": {0: "tokens", 3: "beams"}})
SAM_ENCODER = GraphSpec(("pixels",), ("image_embedding",), {})
SAM_DECODER = GraphSpec(("boxes", "image_embedding"), ("low_res_logits",),
                        {"boxes": {0: "boxes"}, "low_res_logits": {0: "boxes"}})
BEATS = GraphSpec(("fbank",), ("probabilities",), {"fbank": {1: "frames"}}, free_axes=("frames",))
# Every graph's spec but the thinker LLM's, which follows its config and the engine's format (llm_graph).
SPECS = {"pengi_audio": PENGI_AUDIO, "pengi_prompt": PENGI_PROMPT, "pengi_prefix": PENGI_PREFIX, "gpt2": GPT2,
         "grounding": GROUNDING, "sam_encoder": SAM_ENCODER, "sam_decoder": SAM_DECODER, "beats": BEATS,
         "thinker_audio": AUDIO_GRAPH, "thinker_vision": VISION_GRAPH, "sam2_encoder": SAM2_ENCODER,
         "sam2_decoder": SAM2_DECODER}
GRAPH_NAMES = ("pengi_audio", "pengi_prompt", "pengi_prefix", "gpt2", "grounding", "sam_encoder", "sam_decoder",
               "beats", "thinker_audio", "thinker_vision", "thinker_llm", "sam2_encoder",
               "sam2_decoder")  # in export order
# The graphs of an optional part -> the config field (and model attribute) that holds it.
OPTIONAL = {"beats": "beats", "thinker_audio": "thinker", "thinker_vision": "thinker", "thinker_llm": "thinker",
            "sam2_encoder": "sam2", "sam2_decoder": "sam2"}
SAM2_BOX_POINTS = 3  # a box prompt: two corners and the padding point


class PengiAudioGraph(nn.Module):
    """Pengi's window ``[B, samples]`` -> the projected audio embedding ``[B, d_proj]``."""

    def __init__(self, pengi: Pengi) -> None:
        super().__init__()
        self.audio_encoder = pengi.audio_encoder

    def forward(self, waveform: Tensor) -> Tensor:
        return self.audio_encoder(waveform)


class PengiPromptGraph(nn.Module):
    """CLIP ids and mask ``[B, L]`` -> the projected prompt embedding ``[B, d_proj]``."""

    def __init__(self, pengi: Pengi) -> None:
        super().__init__()
        self.caption_encoder = pengi.caption_encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.caption_encoder(input_ids, attention_mask)


class PengiPrefixGraph(nn.Module):
    """The audio and prompt embeddings -> GPT-2's prefix (:meth:`Pengi.prefix`)."""

    def __init__(self, pengi: Pengi) -> None:
        super().__init__()
        self.pengi = pengi

    def forward(self, audio_embedding: Tensor, prompt_embedding: Tensor) -> Tensor:
        return self.pengi.prefix(audio_embedding, prompt_embedding)


class GPT2Graph(nn.Module):
    """One step of GPT-2 over an explicit cache; prefill (past 0) and decode share it.

    ``inputs_embeds`` ``[beams, tokens, n_embd]`` sit at positions ``past .. past + tokens - 1``. Returns the
    final-LayerNorm state of the last position ``[beams, n_embd]`` and ``new_kv``
    ``[tokens, layers, 2, beams, heads, head_dim]``. The LM head stays outside: it is tied to the token
    table, which the engine holds anyway for the embeddings, so the graph does not store it a second time.
    """

    def __init__(self, gpt: GPT2Decoder) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, inputs_embeds: Tensor, past_kv: Tensor) -> tuple[Tensor, Tensor]:
        gpt = self.gpt
        past, tokens = past_kv.shape[0], inputs_embeds.shape[1]
        positions = torch.arange(tokens, device=inputs_embeds.device) + past
        keys = torch.arange(past + tokens, device=inputs_embeds.device)
        mask = (keys[None, :] <= positions[:, None])[None, None]  # [1, 1, tokens, past + tokens]
        hidden = inputs_embeds + gpt.transformer.wpe(positions)
        new = []
        for index, block in enumerate(gpt.transformer.h):
            attention = block.attn
            q, k, v = (part.unflatten(-1, (attention.n_head, -1)).transpose(1, 2)
                       for part in attention.c_attn(block.ln_1(hidden)).chunk(3, dim=-1))
            # [past, 2, beams, heads, hd] -> [2, beams, heads, past, hd]
            past_k, past_v = past_kv[:, index].permute(1, 2, 3, 0, 4).unbind(0)
            attended = F.scaled_dot_product_attention(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2),
                                                      attn_mask=mask)
            hidden = hidden + attention.c_proj(attended.transpose(1, 2).flatten(-2))
            hidden = hidden + block.mlp(block.ln_2(hidden))
            new.append(torch.stack([k, v]))  # [2, beams, heads, tokens, hd]
        new_kv = torch.stack(new).permute(4, 0, 1, 2, 3, 5)
        return gpt.transformer.ln_f(hidden[:, -1]), new_kv


class SamEncoderGraph(nn.Module):
    """SAM pixels ``[1, 3, I, I]`` (resized, normalised, padded) -> the image embedding ``[1, C, g, g]``."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, pixels: Tensor) -> Tensor:
        return self.sam.encode_image(pixels)


class SamBoxDecoderGraph(nn.Module):
    """Boxes ``[N, 4]`` (x0, y0, x1, y1 in model-input pixels) and one image embedding -> single-mask low-res
    logits ``[N, 1, 4g, 4g]``, as SAM's predictor runs a box prompt."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, boxes: Tensor, image_embedding: Tensor) -> Tensor:
        sparse, dense = self.sam.prompt_embeddings(boxes=boxes)
        low_res, _ = self.sam.decode_masks(image_embedding, sparse, dense, multimask_output=False)
        return low_res


class BeatsGraph(nn.Module):
    """Normalised fbank ``[1, T, mel_bins]`` -> AudioSet probabilities ``[1, classes]``."""

    def __init__(self, beats: nn.Module) -> None:
        super().__init__()
        self.beats = beats

    def forward(self, fbank: Tensor) -> Tensor:
        return self.beats.classify(fbank)


def graphs(loaded: LoadedOpenAVS, fmt: str) -> dict[str, tuple[nn.Module, GraphSpec]]:
    """Graph name -> (wrapper, spec) for an engine of format ``fmt``, in export order (``beats``, the
    thinker's and SAM2's only when the checkpoint has them)."""
    model = loaded.model
    pengi = model.pengi
    found = {"pengi_audio": PengiAudioGraph(pengi), "pengi_prompt": PengiPromptGraph(pengi),
             "pengi_prefix": PengiPrefixGraph(pengi), "gpt2": GPT2Graph(pengi.caption_decoder.gpt),
             "grounding": model.grounding.eval(), "sam_encoder": SamEncoderGraph(model.sam),
             "sam_decoder": SamBoxDecoderGraph(model.sam)}
    if model.beats is not None:
        found["beats"] = BeatsGraph(model.beats)
    if model.thinker is not None:
        found.update(thinker_audio=AudioChunkGraph(model.thinker), thinker_vision=VisionSliceGraph(model.thinker))
    if model.sam2 is not None:
        found.update(sam2_encoder=Sam2EncoderGraph(model), sam2_decoder=Sam2DecoderGraph(model))
    paired = {name: (module, SPECS[name]) for name, module in found.items()}
    if model.thinker is not None:
        paired["thinker_llm"] = llm_graph(model.thinker.llm, fmt)
    return {name: paired[name] for name in GRAPH_NAMES if name in paired}


def held_graphs(model) -> tuple[str, ...]:
    """The graphs a model (the reference's or an engine's) has the parts for, in export order."""
    return tuple(name for name in GRAPH_NAMES if name not in OPTIONAL or getattr(model, OPTIONAL[name]) is not None)


def window_samples(pengi: PengiConfig) -> int:
    """Samples of the window :func:`~edgeav.preprocess.pengi_audio.pengi_waveform` gives HTSAT (7 s): the graph
    is traced at that length, which fixes the bicubic stretch of its log-mel."""
    return PENGI_WINDOW_S * pengi.htsat.sample_rate


def gpt2_kv_shape(pengi: PengiConfig, positions: int, beams: int) -> tuple[int, ...]:
    """The GPT-2 cache of ``positions`` positions and ``beams`` rows (the :data:`GPT2` layout)."""
    gpt2 = pengi.gpt2
    return (positions, gpt2.n_layer, 2, beams, gpt2.n_head, gpt2.n_embd // gpt2.n_head)


def examples(loaded: LoadedOpenAVS) -> dict[str, tuple[Tensor, ...]]:
    """One example input per graph, for tracing (two or more of each dynamic axis: a size-1 axis would be
    specialised by the exporter)."""
    config = loaded.config
    pengi = loaded.model.pengi.config
    sam = sam_config(config.sam)
    grid = sam.image_embedding_size
    ids, mask = loaded.clip_tokenizer.encode_prompts(["generate audio caption", "this is a sound of"],
                                                     pengi.enc_text_len)
    height, width = grounding_example_size(loaded.model.grounding.config)
    caption = torch.from_numpy(loaded.grounding_tokenizer.encode("red square . blue circle").input_ids)
    found = {
        "pengi_audio": (0.1 * torch.randn(2, window_samples(pengi)),),
        "pengi_prompt": (ids, mask),
        "pengi_prefix": (torch.randn(2, pengi.d_proj), torch.randn(2, pengi.d_proj)),
        "gpt2": (torch.randn(3, 2, pengi.gpt2.n_embd), torch.zeros(gpt2_kv_shape(pengi, 5, 3))),
        "grounding": (torch.randn(1, 3, height, width), torch.ones(1, height, width, dtype=torch.long), caption,
                      torch.ones_like(caption), torch.zeros_like(caption)),
        "sam_encoder": (torch.randn(1, 3, sam.img_size, sam.img_size),),
        "sam_decoder": (torch.tensor([[4.0, 6.0, 30.0, 40.0], [10.0, 2.0, 50.0, 20.0]]) * sam.img_size / 64,
                        torch.randn(1, sam.prompt_embed_dim, grid, grid)),
    }
    if loaded.model.beats is not None:
        found["beats"] = (torch.randn(1, 98, config.beats.mel_bins),)
    if loaded.model.thinker is not None:
        towers = tower_examples(config.thinker)
        found.update({THINKER + name: example for name, example in towers.items()})
    if loaded.model.sam2 is not None:
        sam2 = sam2_examples(loaded.model.sam2, [2, 3, -1])
        found.update(sam2_encoder=sam2["encoder"], sam2_decoder=sam2["decoder"])
    return found


def _part(config: OpenAVSConfig, component: str):
    """The config of the optional part ``component`` belongs to, refusing a graph the config has no part for."""
    part = getattr(config, OPTIONAL[component])
    if part is None:
        raise OptionError(f"the manifest's config has no {OPTIONAL[component]}, yet the engine has a {component} "
                          "graph")
    return part


def expected_shapes(component: str, config: OpenAVSConfig) -> dict[str, tuple]:
    """The input/output shapes a component's graph has under ``config`` (None: a dynamic or free axis)."""
    pengi, sam = pengi_preset(config.pengi), sam_config(config.sam)
    width, grid = pengi.gpt2.n_embd, sam.image_embedding_size
    if component == "pengi_audio":
        return {"waveform": (None, window_samples(pengi)), "audio_embedding": (None, pengi.d_proj)}
    if component == "pengi_prompt":
        ids = (None, pengi.enc_text_len)
        return {"input_ids": ids, "attention_mask": ids, "prompt_embedding": (None, pengi.d_proj)}
    if component == "pengi_prefix":
        return {"audio_embedding": (None, pengi.d_proj), "prompt_embedding": (None, pengi.d_proj),
                "prefix": (None, 2 * pengi.prefix_length, width)}
    if component == "gpt2":
        kv = (None, pengi.gpt2.n_layer, 2, None, pengi.gpt2.n_head, width // pengi.gpt2.n_head)
        return {"inputs_embeds": (None, None, width), "past_kv": kv, "hidden": (None, width), "new_kv": kv}
    if component == "grounding":
        grounding = GroundingDINOConfig.from_preset(config.grounding)
        text = {name: (1, None) for name in GROUNDING.inputs[2:]}
        return {"pixel_values": (1, 3, None, None), "pixel_mask": (1, None, None), **text,
                "pred_logits": (1, grounding.num_queries, grounding.max_text_len),
                "pred_boxes": (1, grounding.num_queries, 4)}
    if component == "sam_encoder":
        return {"pixels": (1, 3, sam.img_size, sam.img_size), "image_embedding": (1, sam.prompt_embed_dim, grid, grid)}
    if component == "sam_decoder":
        return {"boxes": (None, 4), "image_embedding": (1, sam.prompt_embed_dim, grid, grid),
                "low_res_logits": (None, 1, sam.low_res_size, sam.low_res_size)}
    if component == "beats":
        return {"fbank": (1, None, _part(config, component).mel_bins), "probabilities": (1, config.beats_classes)}
    if component.startswith(THINKER):
        return tower_shapes(component.removeprefix(THINKER), _part(config, component))
    if component.startswith("sam2_"):
        return sam2_shapes(component.removeprefix("sam2_"), sam2_config(_part(config, component)))
    raise ValueError(f"no graph shapes for component {component!r}")


def profiles_for(component: str, config: OpenAVSConfig) -> dict[str, tuple]:
    """TensorRT optimization profiles: one clip and one prompt at a time, GPT-2's prefill (batch 1) and beam
    decode (3 rows), up to eight boxes per picture, a BEATs second (about 98 frames) up to ten, the thinker's
    audio chunk, vision slice and LLM as Crab+'s, one SAM2 box prompt (three points) at a time."""
    pengi, shapes = pengi_preset(config.pengi), expected_shapes(component, config)
    if component == "pengi_audio":
        return {"waveform": ((1, window_samples(pengi)),) * 3}
    if component == "pengi_prompt":
        ids = (1, pengi.enc_text_len)
        return {"input_ids": (ids,) * 3, "attention_mask": (ids,) * 3}
    if component == "pengi_prefix":
        return {name: ((1, pengi.d_proj),) * 3 for name in PENGI_PREFIX.inputs}
    if component == "gpt2":
        width, longest = pengi.gpt2.n_embd, 2 * pengi.prefix_length + 32
        kv = gpt2_kv_shape(pengi, 0, 1)
        return {"inputs_embeds": ((1, 1, width), (3, 1, width), (3, longest, width)),
                "past_kv": (kv, (longest - 1, *kv[1:3], 3, *kv[4:]), (longest - 1, *kv[1:3], 3, *kv[4:]))}
    if component == "grounding":
        short, longest = config.grounding_size
        least = min(256, short)
        low, opt, top = (1, least, least), (1, short, short * 4 // 3), (1, longest + 2, longest + 2)
        text = ((1, 2), (1, 8), (1, GroundingDINOConfig.from_preset(config.grounding).max_text_len))
        return {"pixel_values": tuple((s[0], 3, *s[1:]) for s in (low, opt, top)), "pixel_mask": (low, opt, top),
                **{name: text for name in GROUNDING.inputs[2:]}}
    if component == "sam_encoder":
        return {"pixels": (shapes["pixels"],) * 3}
    if component == "sam_decoder":
        return {"boxes": ((1, 4), (1, 4), (8, 4)), "image_embedding": (shapes["image_embedding"],) * 3}
    if component == "beats":
        mels = config.beats.mel_bins
        return {"fbank": ((1, 16, mels), (1, 98, mels), (1, 998, mels))}
    if component.startswith(THINKER):
        return tower_profiles(component.removeprefix(THINKER), _part(config, component))
    if component.startswith("sam2_"):
        return sam2_profiles(component.removeprefix("sam2_"), sam2_config(_part(config, component)),
                             points=SAM2_BOX_POINTS)
    raise OptionError(f"no TensorRT profile for component {component!r}")


__all__ = ["BEATS", "GPT2", "GPT2Graph", "PENGI_AUDIO", "PENGI_PREFIX", "PENGI_PROMPT", "SAM_DECODER", "SAM_ENCODER",
           "SPECS", "examples", "expected_shapes", "gpt2_kv_shape", "graphs", "profiles_for", "window_samples"]
