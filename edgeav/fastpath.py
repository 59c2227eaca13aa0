"""The decode loop for accelerators: no host synchronisation per token, one CUDA graph per decode step.

:func:`edgeav.generate.generate` reads every token back to the host (``int(token)``) to test it
for EOS before it launches the next step; on a GPU each such read drains the queue, so the device
idles while Python launches the next step's few hundred kernels. :class:`FastGenerator` keeps the
whole loop on the device instead:

- the chosen tokens and the post-norm hidden state that chose each of them go into device
  buffers indexed by sequence position; the next step reads its input token from there;
- greedy argmax runs on the device, and so does sampling (the same :func:`edgeav.generate.next_token`
  and the same seeded generator as the reference loop, so seeded runs agree token for token);
- the host reads the tokens once every ``chunk`` steps, tests them for EOS and trims the answer at
  the first one; the steps already launched after it only wrote cache positions and buffer
  slots that no later read depends on;
- on CUDA one decode step is captured in a :class:`torch.cuda.CUDAGraph` and replayed per token.

Why a hand-captured graph and not ``torch.compile(mode="reduce-overhead")``: the step has fixed
shapes once attention spans the whole cache (``kv_len=None``; the causal-mask row picked by the
device tensor ``input_pos`` hides the positions not yet written), so a plain capture already removes
the per-kernel launch cost; it needs no compiler at run time, costs a few steps of warm-up instead of
tens of seconds of compilation on the first request, never recompiles when the prompt length
changes, and works on every model the eager path runs, quantized linears included. Fusing kernels
is left to kernels/.

The graph reads the weights, the KV cache and the buffers at the addresses they had at capture. A
model whose tensors moved (``.to()``, a cache grown by ``setup_caches``, the runtime swapping
weight variants by ``.data``) gets a new capture; up to :data:`MAX_GRAPHS` captures are kept, one
per set of addresses, so switching between a few weight variants does not capture again each time.

Without CUDA the same chunked loop runs eagerly. By default it then passes ``kv_len`` as the
reference loop does, so its output is bit for bit that of :func:`edgeav.generate.generate`;
``full_cache=True`` runs exactly the step the graph holds, so CPU tests cover it too.

:func:`generate_fast` is what the runtime calls: this loop where it gives the reference loop's answer
(a torch model, no teacher forcing, no logits kept), the reference loop otherwise.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch
from torch import Tensor, nn

from edgeav.errors import OptionError
from edgeav.decoding import Generation, repetition
from edgeav.generate import generate, kept_mask_states, next_token
from edgeav.sampling import SAMPLING_PRESETS, Sampling

__all__ = ["DEFAULT_CHUNK", "MAX_GRAPHS", "FastGenerator", "fast_generator", "generate_fast"]

log = logging.getLogger("edgeav")

DEFAULT_CHUNK = 16  # tokens between EOS checks: at most chunk - 1 wasted steps, one host read per chunk
MAX_GRAPHS = 4  # captured decode steps kept per generator (one per weight variant the runtime swaps in)
_WARMUP_STEPS = 2  # eager steps on a side stream before capture, as torch.cuda's graph notes ask


class FastGenerator:
    """Chunked, host-sync-free decoding of one Crab LLM (:class:`edgeav.models.llama.Llama`).

    ``chunk``: decode steps between host reads of the generated tokens (the EOS check).
    ``cuda_graph``: replay one captured decode step per token; default: when the model is on CUDA.
    ``full_cache``: attend over the whole cache with fixed shapes, as the graph must; default: when
    capturing. Without it each step attends over the written positions only (``kv_len``), as
    :func:`edgeav.generate.generate` does.

    The model's caches must be set up (:meth:`Llama.setup_caches`) before :meth:`generate`; the
    model's own dtype and device are used. Only a weak reference to the model is held, so a
    generator cached for a model never keeps it alive.
    """

    def __init__(self, llm: nn.Module, *, chunk: int = DEFAULT_CHUNK, cuda_graph: bool | None = None,
                 full_cache: bool | None = None) -> None:
        if chunk < 1:
            raise OptionError(f"FastGenerator: chunk {chunk} must be at least 1 (decode steps between EOS checks)")
        on_cuda = _device_of(llm).type == "cuda"
        if cuda_graph is None:
            cuda_graph = on_cuda
        if cuda_graph and not on_cuda:
            raise OptionError(f"FastGenerator: cuda_graph=True needs the model on a CUDA device; it is on "
                              f"{_device_of(llm)}; move it with .to('cuda') or leave cuda_graph unset")
        if full_cache is None:
            full_cache = cuda_graph
        if cuda_graph and not full_cache:
            raise OptionError("FastGenerator: a captured decode step has fixed shapes and attends over the whole "
                              "cache; full_cache=False needs cuda_graph=False")
        self._llm_ref = weakref.ref(llm)
        self.chunk, self.cuda_graph, self.full_cache = chunk, cuda_graph, full_cache
        self.host_reads = 0  # device-to-host reads of the last generate(): one per chunk checked
        self._tokens: Tensor | None = None  # [max_seq_len] token at each sequence position
        self._hiddens: Tensor | None = None  # [max_seq_len, D] post-norm state that chose the token at each position
        self._input_pos: Tensor | None = None  # [1] position of the token a decode step consumes
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    @property
    def captured_graphs(self) -> int:
        """Decode steps captured and kept (one per set of model tensor addresses seen)."""
        return len(self._graphs)

    @property
    def llm(self) -> nn.Module:
        llm = self._llm_ref()
        if llm is None:
            raise RuntimeError("FastGenerator: the model it was built for has been freed; build one for the new model")
        return llm

    @torch.inference_mode()
    def generate(
        self,
        inputs_embeds: Tensor,
        *,
        max_new_tokens: int,
        eos_id: int,
        mask_token_ids: tuple[int, ...] = (),
        n_mask_tokens: int | None = 6,
        sampling: Sampling = SAMPLING_PRESETS["greedy"],
        stop_repeats: bool = True,
    ) -> Generation:
        """Generate from one prompt of embeddings [1, T, D]; the same result as :func:`edgeav.generate.generate`.

        A loop (``stop_repeats``) is looked for when a chunk is read back, at each of its tokens, so the
        answer stops at the same token as the reference loop's.

        Warm-up and graph capture (first call, or after the model's tensors moved) are not counted in
        ``prefill_s``; ``prefill_s`` ends when the first token is on the device, ``decode_s`` when the
        last chunk has been read back.
        """
        llm = self.llm
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
            raise OptionError(f"generate takes one prompt [1, T, D], got {tuple(inputs_embeds.shape)}")
        if getattr(llm, "causal_mask", None) is None:
            raise OptionError("FastGenerator.generate: the model has no KV cache; call "
                              "llm.setup_caches(1, max_seq_len) first")
        prompt_len = inputs_embeds.shape[1]
        room = llm.max_seq_len - prompt_len
        if room <= 0:
            raise OptionError(f"the prompt has {prompt_len} tokens; the KV cache holds {llm.max_seq_len}")
        max_new_tokens = max(0, min(max_new_tokens, room))
        device = inputs_embeds.device
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        graph = self._prepare(llm, inputs_embeds)
        self.host_reads = 0

        _synchronize(device)
        start = time.perf_counter()
        logits, hidden = llm(inputs_embeds, torch.arange(prompt_len, device=device), prompt_len)
        self._tokens[prompt_len:prompt_len + 1].copy_(next_token(logits[:, -1], sampling, generator))
        self._hiddens[prompt_len].copy_(hidden[0, -1])
        _synchronize(device)
        prefill_s = time.perf_counter() - start

        decode_start = time.perf_counter()
        token_ids, stopped_by, repeated = self._decode_chunks(llm, graph, prompt_len, max_new_tokens, eos_id,
                                                              sampling, generator, stop_repeats)
        mask_steps = [i for i, token in enumerate(token_ids) if token in mask_token_ids]
        # Stacked: a copy out of the buffer, which the next generation overwrites.
        mask_hidden = kept_mask_states([self._hiddens[prompt_len + i] for i in mask_steps], n_mask_tokens)
        _synchronize(device)
        decode_s = time.perf_counter() - decode_start
        return Generation(token_ids=token_ids, mask_hidden=mask_hidden, prefill_s=prefill_s, decode_s=decode_s,
                          stopped_by=stopped_by, repeated=repeated)

    def _decode_chunks(self, llm: nn.Module, graph, prompt_len: int, max_new_tokens: int, eos_id: int,
                       sampling: Sampling, generator: torch.Generator | None,
                       stop_repeats: bool = True) -> tuple[list[int], str, list[int] | None]:
        """Launch ``chunk`` steps, read their tokens back once, stop at the first EOS or loop; answer index i
        sits at sequence position ``prompt_len + i``, the prefill's token at index 0."""
        token_ids: list[int] = []
        produced = 1 if max_new_tokens else 0  # answer tokens already on the device
        checked = 0
        while checked < max_new_tokens:
            end = min(checked + self.chunk, max_new_tokens)
            while produced < end:
                self._decode_step(llm, graph, prompt_len + produced - 1, sampling, generator)
                produced += 1
            chunk = self._tokens[prompt_len + checked:prompt_len + end].tolist()  # the one host read per chunk
            self.host_reads += 1
            answer = chunk[:chunk.index(eos_id)] if eos_id in chunk else chunk
            for token in answer:
                token_ids.append(token)
                repeated = repetition(token_ids) if stop_repeats else None
                if repeated is not None:
                    return token_ids, "repetition", repeated
            if eos_id in chunk:
                return token_ids, "eos", None
            checked = end
        return token_ids, "max_new_tokens", None

    def _decode_step(self, llm: nn.Module, graph, pos: int, sampling: Sampling,
                     generator: torch.Generator | None) -> None:
        """Consume the token at ``pos``; write the next token and the state that chose it at ``pos + 1``."""
        self._input_pos.fill_(pos)  # in place: the captured graph reads this very tensor
        if graph is not None:
            captured, logits = graph
            captured.replay()
        else:
            logits = self._step(llm, None if self.full_cache else pos + 1)
        if not sampling.greedy:  # replaces the argmax the step wrote
            self._tokens[pos + 1:pos + 2].copy_(next_token(logits, sampling, generator))

    def _step(self, llm: nn.Module, kv_len: int | None) -> Tensor:
        """One decode step from the static buffers; the body of the CUDA graph. Returns the next-token logits [1, V]."""
        token = self._tokens.index_select(0, self._input_pos)
        logits, hidden = llm(llm.embed(token.view(1, 1)), self._input_pos, kv_len)
        chosen_at = self._input_pos + 1
        self._hiddens.index_copy_(0, chosen_at, hidden[0])
        self._tokens.index_copy_(0, chosen_at, logits[0].argmax(-1))
        return logits[:, -1]

    def _prepare(self, llm: nn.Module, inputs_embeds: Tensor):
        """(Re)allocate the buffers for this cache and dtype; return the captured step for the model's current
        tensors (capturing it if new), or None when stepping eagerly."""
        shape = (llm.max_seq_len, inputs_embeds.shape[-1])
        if (self._hiddens is None or tuple(self._hiddens.shape) != shape or self._hiddens.dtype != inputs_embeds.dtype
                or self._hiddens.device != inputs_embeds.device):
            self._graphs.clear()  # they write into the buffers being replaced
            self._tokens = torch.zeros(shape[0], dtype=torch.long, device=inputs_embeds.device)
            self._hiddens = torch.zeros(shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
            self._input_pos = torch.zeros(1, dtype=torch.long, device=inputs_embeds.device)
        if not self.cuda_graph:
            return None
        if inputs_embeds.device.type != "cuda":
            raise OptionError(f"FastGenerator: the prompt is on {inputs_embeds.device}; this generator replays a "
                              "CUDA graph: pass the embeddings on the model's CUDA device")
        key = tuple(t.data_ptr() for t in (*llm.parameters(), *llm.buffers()))
        if key not in self._graphs:
            if len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))  # the oldest capture
            self._graphs[key] = self._capture(llm, inputs_embeds.device)
        return self._graphs[key]

    def _capture(self, llm: nn.Module, device: torch.device) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm the step up on a side stream, then capture it (torch.cuda's documented capture sequence).

        Warm-up and capture run at position 0 before the prefill, which rewrites that cache slot and
        buffer entry 1 is rewritten before any step reads it.
        """
        start = time.perf_counter()
        with torch.cuda.device(device):
            self._input_pos.fill_(0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_STEPS):
                    self._step(llm, None)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a stream's encoder thread keeps using the GPU while this thread captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = self._step(llm, None)
            torch.cuda.synchronize()
        log.info("captured the decode step in a CUDA graph in %.0f ms", (time.perf_counter() - start) * 1000)
        return graph, logits


_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_generator(llm: nn.Module, *, chunk: int = DEFAULT_CHUNK) -> FastGenerator:
    """The :class:`FastGenerator` of ``llm`` (made on first use and kept while the model lives, so its
    captured graphs are reused across calls)."""
    generator = _GENERATORS.get(llm)
    on_cuda = _device_of(llm).type == "cuda"
    if generator is None or generator.chunk != chunk or generator.cuda_graph != on_cuda:
        generator = _GENERATORS[llm] = FastGenerator(llm, chunk=chunk)
    return generator


def generate_fast(llm, inputs_embeds: Tensor, *, fast: bool = True, forced: list[int] | None = None,
                  logits_out: list[Tensor] | None = None, **options) -> Generation:
    """:func:`edgeav.generate.generate` (same arguments, same tokens and mask states), decoded by
    :func:`fast_generator` where it can be.

    ``fast`` (the runtime passes it on CUDA): use the chunked loop, with the step replayed from a CUDA
    graph when the model is on CUDA. ``fast=False``, teacher forcing (``forced``), ``logits_out`` and
    models that are not torch modules (exported engines) keep the reference loop.
    """
    if fast and forced is None and logits_out is None and isinstance(llm, nn.Module):
        return fast_generator(llm).generate(inputs_embeds, **options)
    return generate(llm, inputs_embeds, forced=forced, logits_out=logits_out, **options)


def _device_of(llm: nn.Module) -> torch.device:
    return next(llm.parameters()).device


def _synchronize(device: torch.device) -> None:
    """Wait for queued work so wall-clock stage times are real; CPU work is already done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
