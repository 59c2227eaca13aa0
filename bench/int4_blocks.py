"""onnx int4 decode at every MatMulNBits block size against llama.cpp Q4_0, in rounds that take turns.

    python -m edgeav.bench.int4_blocks --preset crab-1b --rounds 5 --threads 2

The LLM-only bench (:mod:`edgeav.bench.llm_bench`) times one row after another; on a shared machine whose
speed drifts over minutes, a few percent between block sizes hides in that drift. Here every contender
is loaded at once (crab-1b: about 2 GB of weights in all) and each round runs all of them, one after the
other: the prompt (128 tokens, on an empty cache), then 16 greedy steps, timed. The graphs and the GGUF
file come from the LLM-only bench's cache (built on first use); llama.cpp runs as that bench runs it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="crab-1b", help="Crab preset, random weights (default crab-1b)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every contender (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every contender (default 2)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    from edgeav.bench.llm_bench import LLMBenchOptions, _Context, _load, _peer_settings, _token_ids
    from edgeav.bench.llm_peers import (REPACKED_Q4_0, LlamaCppLLM, OnnxRuntimeLLM, gguf_file, onnx_graph,
                                        weights_key)
    from edgeav.engines.manifest import INT4_BLOCK_SIZES

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    options = LLMBenchOptions(preset=args.preset, random_weights=True, threads=args.threads)
    llm, tokenizer, model_name = _load(options)
    ctx = _Context(options, llm, tokenizer, _token_ids(tokenizer, options.prompt_tokens), [], args.threads, progress,
                   weights=weights_key(llm, tokenizer))
    table = llm.model.embed_tokens.weight.detach().float().numpy()
    contenders = {f"onnx int4, blocks of {block}": OnnxRuntimeLLM(
        onnx_graph(llm, ctx.weights, "int4", progress, block), table, llm.cfg, options.context, args.threads)
        for block in INT4_BLOCK_SIZES}
    repack = _peer_settings(ctx)
    contenders["llama.cpp Q4_0"] = LlamaCppLLM(
        gguf_file(llm, tokenizer, ctx.weights, "int4", progress), llm.cfg.vocab_size, options.context, args.threads,
        extra_buffers=repack is None, repack=None if repack is None else REPACKED_Q4_0)

    step_s: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(args.rounds):
        progress(f"round {round_index + 1} of {args.rounds}")
        for name, contender in contenders.items():
            token = int(np.argmax(contender.prefill(ctx.prompt)))
            start = time.perf_counter()
            for _ in range(options.new_tokens):
                token = int(np.argmax(contender.step(token)))
            step_s[name].append((time.perf_counter() - start) / options.new_tokens)
    for contender in contenders.values():
        contender.close()

    peer = statistics.median(step_s["llama.cpp Q4_0"])
    print(f"{model_name}; {args.threads} threads; {options.new_tokens} decode steps after {options.prompt_tokens} "
          f"tokens; median of {args.rounds} rounds")
    for name, times in step_s.items():
        median = statistics.median(times)
        print(f"{name:26s} {1 / median:7.2f} tok/s   {peer / median:5.2f}x llama.cpp Q4_0   "
              f"(ms a step by round: {' '.join(f'{1000 * t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
