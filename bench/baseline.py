"""The baseline a user would otherwise pick: the same weights run the way the original Crab runs them.

transformers' ``LlamaForCausalLM`` built from our config with our LLM's base weights (our module
names mirror Hugging Face's), fp32, eager attention, the I-LoRA as separate modules wrapped around
HF's projections (one shared A, one B per head, the router; the term computed as
:class:`~edgeav.models.llama.ILoRALinear` computes it), generation by HF ``generate`` (greedy),
and edgeav's reference encoders for the visual and audio tokens. The media path (PyAV decode,
Crab's frame sampling and audio cut, CLIP pixels, fbank) is the runtime's own
(:func:`edgeav.inputs.decode`), so the prompt is the runtime's to the last embedding.

    model = BaselineCrab(loaded)                    # loaded: a LoadedCrab (its joint weights)
    run = model.run("clip.mp4", "ave", new_tokens=32)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeav.systems.crab.checkpoints import LoadedCrab
from edgeav.errors import OptionError
from edgeav.systems.crab.inputs import decode
from edgeav.systems.crab.model import CrabModel
from edgeav.models.ilora import ILoRALinear
from edgeav.preprocess.fbank import crab_fbank_batch
from edgeav.tasks import Event
from edgeav.systems.crab.tasks import get_task


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise OptionError("the baseline row needs transformers; pip install 'edgeav[dev]' (or transformers)") from None
    return transformers


class SeparateILoRA(nn.Module):
    """A Hugging Face projection with Crab's I-LoRA beside it as separate modules, as PEFT-style Crab runs it:
    ``y = base(x) + sum_i softmax(route(x))_i * B_i(A(x)) * scale``, router softmax in fp32."""

    def __init__(self, base: nn.Linear, layer: ILoRALinear) -> None:
        super().__init__()
        self.base = base
        self.scale = layer.scale
        self.lora_A = nn.Linear(layer.in_features, layer.rank, bias=False)
        self.lora_route = nn.Linear(layer.in_features, layer.heads, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(layer.rank, layer.out_features, bias=False) for _ in range(layer.heads))
        with torch.no_grad():
            self.lora_A.weight.copy_(layer.lora_A)
            self.lora_route.weight.copy_(layer.lora_route)
            for head, weight in zip(self.lora_B, layer.lora_B.split(layer.rank, dim=1)):
                head.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = torch.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(x.dtype)
        low_rank = self.lora_A(x)
        out = self.base(x)
        for i, head in enumerate(self.lora_B):
            out = out + route[..., i : i + 1] * head(low_rank) * self.scale
        return out


def hf_llama(model: CrabModel) -> nn.Module:
    """transformers' LlamaForCausalLM with ``model.llm``'s weights (fp32, eager attention, I-LoRA wrapped)."""
    transformers = import_transformers()
    llm = model.llm
    cfg = llm.cfg
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    base = {key: tensor.float() for key, tensor in llm.state_dict().items()
            if key.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "lora_route")}
    hf.load_state_dict(base, strict=True)
    for ours, theirs in zip(llm.model.layers, hf.model.layers):
        for block in ("self_attn", "mlp"):
            for name, module in getattr(ours, block).named_children():
                if isinstance(module, ILoRALinear):
                    parent = getattr(theirs, block)
                    setattr(parent, name, SeparateILoRA(getattr(parent, name), module.float()))
    return hf


@dataclass
class Prompt:
    """A run's prompt embeddings and the stage times (ms) it took to make them."""

    embeds: torch.Tensor  # [1, L, D]
    timings_ms: dict[str, float] = field(default_factory=dict)
    pixels: np.ndarray | None = None  # [F, 3, 224, 224], for counting the visual stage's work
    fbank: np.ndarray | None = None  # [S, T, 128]


def decode_inputs(source: str | Path, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Crab's frames and audio pieces of a video+audio task's clip, exactly what the runtime feeds its
    encoders (:func:`edgeav.inputs.decode`): (CLIP pixels [F, 3, 224, 224], waveforms [S, samples])."""
    spec = get_task(task)
    if not spec.video_frames or spec.image_frame:
        raise OptionError(f"task {task!r}: the baseline runs video+audio tasks without a frame to ground "
                          "(ave, avvp, avqa)")
    inputs = decode(source, spec)
    return inputs.video_pixels, inputs.audio[None]


def build_prompt(model: CrabModel, tokenizer, source: str | Path, task: str, *, question: str | None = None,
                 device: torch.device | str = "cpu") -> Prompt:
    """Media decode, both encoders and the prompt embeddings of one run, each stage timed."""
    spec = get_task(task)
    times: dict[str, float] = {}
    start = time.perf_counter()
    pixels, windows = decode_inputs(source, task)
    times["decode"] = (time.perf_counter() - start) * 1000
    with torch.inference_mode():
        start = time.perf_counter()
        video = model.encode_frames(torch.from_numpy(pixels).to(device))
        times["visual"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        fbank = crab_fbank_batch(windows)
        audio = model.encode_audio(torch.from_numpy(fbank).to(device)).flatten(0, 1)
        times["audio"] = (time.perf_counter() - start) * 1000
        blocks = {tokenizer.token_id("<video>"): video.tokens.flatten(0, 1), tokenizer.token_id("<audio>"): audio}
        embeds = model.embed_prompt(tokenizer.encode_chat(spec.instruction(question=question)), blocks)
    return Prompt(embeds, times, pixels, fbank)


@dataclass
class BaselineRun:
    """One baseline run: generated ids (EOS dropped), the parsed events, stage times in ms."""

    token_ids: list[int]
    text: str
    events: list[Event]
    timings_ms: dict[str, float]
    decode_steps: int  # forward passes after the prefill
    prompt_tokens: int


class _StepClock:
    """A logits processor that only notes when each step's logits arrive (the first: end of prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class BaselineCrab:
    """The original way of running Crab on ``loaded``'s joint weights (see the module docstring)."""

    def __init__(self, loaded: LoadedCrab, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.loaded = loaded
        self.model = loaded.variant("joint")
        self.tokenizer = loaded.tokenizer
        self.hf = hf_llama(self.model).to(self.device)
        if next(self.model.parameters()).device != self.device:
            raise OptionError(f"BaselineCrab: the encoders sit on {next(self.model.parameters()).device}, the run "
                              f"asks for {self.device}; move the checkpoint first (loaded.to(device, dtype))")

    def generate(self, embeds: torch.Tensor, *, new_tokens: int | None, max_new_tokens: int) -> tuple[list[int], list[float]]:
        """HF greedy generation from prompt embeddings; ``new_tokens`` forces that many (EOS suppressed)."""
        transformers = import_transformers()
        clock = _StepClock()
        options = dict(max_new_tokens=new_tokens or max_new_tokens, do_sample=False, num_beams=1,
                       eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.eos_id,
                       logits_processor=transformers.LogitsProcessorList([clock]))
        if new_tokens:
            options["min_new_tokens"] = new_tokens
        attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        with torch.inference_mode():
            output = self.hf.generate(inputs_embeds=embeds.float(), attention_mask=attention, **options)
        ids = output[0].tolist()
        if self.tokenizer.eos_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_id)]
        return ids, clock.times

    def run(self, source: str | Path, task: str = "ave", *, new_tokens: int | None = None,
            question: str | None = None) -> BaselineRun:
        """One run: media decode, encoders, prompt, HF ``generate``, parsed text; stage times as the runtime's."""
        spec = get_task(task)
        start = time.perf_counter()
        prompt = build_prompt(self.model, self.tokenizer, source, task, question=question, device=self.device)
        generate_start = time.perf_counter()
        ids, steps = self.generate(prompt.embeds, new_tokens=new_tokens, max_new_tokens=spec.max_new_tokens)
        end = time.perf_counter()
        timings = dict(prompt.timings_ms)
        first = steps[0] if steps else end
        timings["prefill"] = (first - generate_start) * 1000
        # From the first step's logits to the last's: exactly the decode forward passes.
        timings["decode_tokens"] = (steps[-1] - first) * 1000 if steps else 0.0
        timings["ttft"] = (first - start) * 1000
        text = self.tokenizer.decode(ids)
        return BaselineRun(ids, text, list(spec.parse(text).events), timings, max(len(steps) - 1, 0),
                           prompt.embeds.shape[1])


__all__ = ["BaselineCrab", "BaselineRun", "SeparateILoRA", "build_prompt", "decode_inputs", "hf_llama"]
