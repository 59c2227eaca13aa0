"""``edgeav bench --llm-only``: the LLM alone, each format against llama.cpp at the same bits, in one run.

    edgeav bench --preset crab-1b --random-weights --formats torch,onnx,llama.cpp --precisions fp32,int8,int4 \\
        --llm-only --json llm.json

Every contender runs the same base LLaMA (the preset's LLM with its I-LoRA dropped, since llama.cpp has no
routed LoRA: :func:`edgeav.export.gguf.base_llm`), the same token ids and the same number of threads
(torch, ONNX Runtime intra-op, llama.cpp ``n_threads`` and ``n_threads_batch``). Rows, in the report's order
(they are timed precision by precision, each beside its llama.cpp peer):

1. the baseline: transformers' ``LlamaForCausalLM`` fp32 on the very same tensors;
2. ``torch``: edgeav's reference LLM (fp32, bf16, fp16; the weight-only int8/int4 rows are skipped on a CPU,
   as in Crab's bench);
3. ``onnx``: edgeav's exported LLM graph on ONNX Runtime: fp32, fp16, and int8 and int4 as edgeav's
   exports hold the LLM (MatMulNBits with 8 or 4 bits, blocks of ``--block-size``, int8 activations);
4. ``llama.cpp``, the peer: a GGUF file (fp32 F32, fp16 F16, bf16 BF16, int8 Q8_0, int4 Q4_0) on
   llama-cpp-python; without it the rows are skipped, saying how to install it, and the rest go on.

Measured per row, warm-up runs excluded, p50 of the kept runs: prefill tokens/s (one prompt of
``prefill_tokens`` on an empty cache) and decode tokens/s (``new_tokens`` one-token steps after a
``prompt_tokens`` prompt, greedy). ``speedup_vs_peer``: those two over llama.cpp's at the same precision.
``greedy_match``: the greedy tokens (the prompt's next token and one per step) equal the reference's:
torch fp32, or llama.cpp fp32 where torch fp32 did not run. The contenders: :mod:`edgeav.bench.llm_peers`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeav.bench.llm_peers import (LLAMA_CPP_INSTALL, REPACKED_Q4_0, LlamaCppLLM, OnnxRuntimeLLM,
                                    TorchLLM, TransformersLLM, cache_root, gguf_file, gguf_weight_bytes,
                                    import_llama_cpp, llama_cpp_buffers, onnx_graph, package_version, weights_key)
from edgeav.bench.options import (BASELINE, PRECISIONS, Progress, check_output_path, check_preset, options_json,
                                  parse_choices)
from edgeav.bench.timing import PeakMemory, RowSkipped, hardware_info, percentiles, run_row, tensor_bytes, timed_runs
from edgeav.bench.timing import tool_versions
from edgeav.engines import check_threads
from edgeav.engines.manifest import DEFAULT_BLOCK_SIZE, INT4_BLOCK_SIZES
from edgeav.errors import OptionError

PEER = "llama.cpp"
FORMATS = ("torch", "onnx", PEER, "tensorrt")
DEFAULT_FORMATS = ("torch", "onnx", PEER)
DEFAULT_PRECISIONS = ("fp32", "int8", "int4")
PROMPT_TOKENS, NEW_TOKENS, PREFILL_TOKENS = 128, 16, 720
CPU = torch.device("cpu")


@dataclass(frozen=True)
class LLMBenchOptions:
    """What ``edgeav bench --llm-only`` measures; checked on creation, before any model loads.

    ``threads``: of every contender (None: torch's current setting). ``row_budget_s``: seconds of timed runs
    after which a row keeps no more (at least one)."""

    preset: str = "crab-tiny"
    random_weights: bool = False
    formats: tuple[str, ...] = DEFAULT_FORMATS
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    repeats: int = 3
    warmup: int = 1
    row_budget_s: float = 60.0
    prompt_tokens: int = PROMPT_TOKENS
    new_tokens: int = NEW_TOKENS
    prefill_tokens: int = PREFILL_TOKENS
    threads: int | None = None
    json_path: Path | None = None
    block_size: int = DEFAULT_BLOCK_SIZE  # of the onnx rows' 8- and 4-bit weights (Q4_0 and Q8_0: always 32)

    def __post_init__(self) -> None:
        from edgeav.systems.crab.config import PRESETS

        object.__setattr__(self, "formats", parse_choices(self.formats, FORMATS, "--formats"))
        object.__setattr__(self, "precisions", parse_choices(self.precisions, PRECISIONS, "--precisions"))
        check_preset(self.preset, self.random_weights)
        for name, value, least in (("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0),
                                   ("--tokens", self.new_tokens, 1), ("prompt_tokens", self.prompt_tokens, 1),
                                   ("prefill_tokens", self.prefill_tokens, 1)):
            if value < least:
                raise OptionError(f"{name} must be at least {least}, got {value}")
        context = PRESETS[self.preset].llm.max_seq_len
        if max(self.prefill_tokens, self.prompt_tokens + self.new_tokens + 1) > context:
            raise OptionError(f"--tokens {self.new_tokens}: {self.preset}'s LLM holds {context} positions; the "
                              f"{self.prompt_tokens}-token prompt and the new tokens must fit; ask for fewer")
        if self.row_budget_s <= 0:
            raise OptionError(f"--row-budget must be positive, got {self.row_budget_s}")
        check_threads(self.threads)
        check_output_path(self.json_path, "--json")
        if self.block_size not in INT4_BLOCK_SIZES:
            raise OptionError(f"--block-size {self.block_size}: expected one of "
                              f"{', '.join(map(str, INT4_BLOCK_SIZES))}")

    @property
    def context(self) -> int:
        """KV-cache positions every contender holds."""
        return max(self.prefill_tokens, self.prompt_tokens + self.new_tokens + 1)


def make_options(*, checkpoint: Path | None = None, preset: str | None = None, device: str = "cpu",
                 project: str | None = None, plot_path: Path | None = None, tokens: int | None = None,
                 eval_n: int | None = None, formats=None, precisions=None, **values) -> LLMBenchOptions:
    """:class:`LLMBenchOptions` from ``edgeav bench --llm-only``'s options (None: the default); ``eval_n`` has no
    use here (``greedy_match`` is the quality column)."""
    if checkpoint is not None:
        raise OptionError(f"--checkpoint {checkpoint}: the LLM-only bench runs the demo model or a preset's random "
                          "weights (--preset NAME --random-weights); drop --checkpoint")
    if device != "cpu":
        raise OptionError(f"--device {device}: the LLM-only bench measures on the CPU (llama.cpp's CPU build, ONNX "
                          "Runtime's CPU provider); drop --device")
    if project is not None:
        raise OptionError(f"--project {project}: the LLM-only bench has no roofline projection; drop --project")
    if plot_path is not None:
        raise OptionError("--plot: the LLM-only bench draws no plot (the table and --json hold every number); "
                          "drop --plot")
    given = {name: value for name, value in values.items() if value is not None}
    given.update({k: v for k, v in (("preset", preset), ("new_tokens", tokens), ("formats", formats),
                                    ("precisions", precisions)) if v is not None})
    return LLMBenchOptions(**given)


# -- rows and the report -----------------------------------------------------------------------------------


@dataclass
class LLMRow:
    """One contender at one precision. Times in seconds; None: not measured (see ``status``)."""

    name: str
    format: str
    precision: str
    status: str = "ok"
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None
    speedup_vs_peer: dict | None = None  # decode, prefill: this row's tokens/s over the peer's; peer: its name
    greedy_match: bool | None = None
    greedy_agree: int | None = None  # leading greedy tokens equal to the reference's
    greedy_reference: str | None = None
    greedy_ids: list[int] = field(default_factory=list)
    weight_bytes: int | None = None  # weights one decode step reads (of the embedding, one row)
    size_bytes: int | None = None
    size_kind: str = ""  # "memory" (tensors torch holds) or "disk" (the graph or GGUF file and the table)
    decode_s: dict | None = None  # p50, p95 of the new_tokens steps
    prefill_s: dict | None = None  # p50, p95 of the prefill_tokens prompt
    prompt_prefill_s: dict | None = None  # p50, p95 of the prompt_tokens prompt before decoding
    build_s: float | None = None
    peak_rss_bytes: int | None = None
    runs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class LLMReport:
    options: LLMBenchOptions
    model: str
    hardware: dict
    versions: dict
    llama_cpp: dict  # the peer's settings
    rows: list[LLMRow]

    def to_dict(self) -> dict:
        o = self.options
        return {
            "benchmark": f"edgeav bench --llm-only: decode = {o.new_tokens} greedy one-token steps after a "
                         f"{o.prompt_tokens}-token prompt, prefill = one {o.prefill_tokens}-token prompt; p50/p95 of "
                         f"up to {o.repeats} runs after {o.warmup} warm-up run(s); speedup_vs_peer: tokens/s over "
                         f"llama.cpp's at the same bits (fp32 F32, fp16 F16, bf16 BF16, int8 Q8_0, int4 Q4_0)",
            "options": options_json(self.options), "model": self.model, "hardware": self.hardware,
            "versions": self.versions, "llama_cpp": self.llama_cpp, "rows": [asdict(row) for row in self.rows],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


@dataclass
class _Context:
    options: LLMBenchOptions
    llm: torch.nn.Module
    tokenizer: object
    prompt: list[int]
    prefill: list[int]
    threads: int
    progress: Progress
    weights: str = ""  # digest of the weights, the key of every cached file
    llama_cpp: dict = field(default_factory=dict)
    device: torch.device = CPU


def _load(options: LLMBenchOptions):
    """(the base LLM, its tokenizer, the model's name); the rest of the checkpoint is let go."""
    from edgeav.export.gguf import base_llm
    from edgeav.runtime import DEMO_DIR
    from edgeav.systems.crab.checkpoints import load_converted, synthesize

    if options.preset == "crab-tiny" and not options.random_weights:
        if not (DEMO_DIR / "model.safetensors").is_file():
            raise OptionError(f"{DEMO_DIR}: the demo model is not installed; pass --random-weights")
        loaded, name = load_converted(DEMO_DIR), "edgeav demo model (crab-tiny)"
    else:
        loaded, name = synthesize(options.preset, 0), f"{options.preset}, random weights (seed 0)"
    llm = base_llm(loaded.variant("joint").llm)
    return llm, loaded.tokenizer, f"{name}: its LLM without the I-LoRA"


def _token_ids(tokenizer, count: int) -> list[int]:
    """BOS then the synthetic corpus's text (every task's prompt and answer), repeated to ``count`` ids."""
    from edgeav.systems.crab.checkpoints import synthetic_corpus

    text = tokenizer.encode(" ".join(synthetic_corpus()))
    return [tokenizer.bos_id, *(text * (count // len(text) + 1))][:count]


def _measure(row: LLMRow, contender, ctx: _Context) -> None:
    """Timed runs of ``contender`` (each: the long prefill, then the prompt and the greedy steps) into ``row``."""
    steps = ctx.options.new_tokens

    def once() -> dict:
        start = time.perf_counter()
        contender.prefill(ctx.prefill)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        token = int(np.argmax(contender.prefill(ctx.prompt)))
        prompt_s = time.perf_counter() - start
        ids = [token]
        start = time.perf_counter()
        for _ in range(steps):
            token = int(np.argmax(contender.step(token)))
            ids.append(token)
        return {"prefill_s": prefill_s, "prompt_prefill_s": prompt_s, "decode_s": time.perf_counter() - start,
                "ids": ids}

    try:
        with PeakMemory(CPU).watch() as memory:
            runs = timed_runs(once, ctx.options, CPU)
    finally:
        contender.close()
    row.peak_rss_bytes = memory.peak_rss
    row.greedy_ids = runs[0]["ids"]
    if any(run["ids"] != row.greedy_ids for run in runs):
        row.notes.append("the greedy tokens differ between runs")
    row.runs = [{k: v for k, v in run.items() if k != "ids"} for run in runs]
    if len(runs) < ctx.options.repeats:
        row.notes.append(f"{len(runs)} of {ctx.options.repeats} timed runs: the row budget ran out")
    for key in ("decode_s", "prefill_s", "prompt_prefill_s"):
        setattr(row, key, percentiles([run[key] for run in runs]))
    row.decode_tok_s = steps / row.decode_s["p50"]
    row.prefill_tok_s = ctx.options.prefill_tokens / row.prefill_s["p50"]


def _baseline_row(row: LLMRow, ctx: _Context) -> None:
    try:
        import transformers
    except ImportError:
        raise RowSkipped("transformers not installed (pip install transformers)") from None
    contender = TransformersLLM(ctx.llm, ctx.options.context)
    row.size_bytes, row.size_kind = tensor_bytes(ctx.llm), "memory"
    row.weight_bytes = tensor_bytes(ctx.llm, embedding="model.embed_tokens.weight")
    row.notes.append(f"transformers {transformers.__version__} LlamaForCausalLM fp32 on torch fp32's tensors, "
                     f"{contender.attention} attention, DynamicCache, the last position's logits only")
    _measure(row, contender, ctx)


def _torch_row(row: LLMRow, ctx: _Context) -> None:
    if row.precision in ("int8", "int4"):
        raise RowSkipped(f"torch's weight-only {row.precision} dequantizes on every call on a CPU and decodes "
                         "slower than fp32; the onnx and llama.cpp rows measure int8 and int4")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[row.precision]
    llm = ctx.llm if dtype == torch.float32 else copy.deepcopy(ctx.llm).to(dtype)
    row.size_bytes, row.size_kind = tensor_bytes(llm), "memory"
    row.weight_bytes = tensor_bytes(llm, embedding="model.embed_tokens.weight")
    row.notes.append("edgeav's reference Llama; its prefill computes the LM head at every position")
    _measure(row, TorchLLM(llm, ctx.options.context), ctx)


def _onnx_row(row: LLMRow, ctx: _Context) -> None:
    from edgeav.engines.manifest import DEFAULT_INT4_ACCURACY, PRECISIONS as EXPORT_PRECISIONS, WEIGHT_ONLY_BITS
    from edgeav.engines.spec import ROLE_LLM

    if row.precision not in EXPORT_PRECISIONS:
        raise RowSkipped(f"onnx engines offer {', '.join(EXPORT_PRECISIONS)}")
    llm_precision = EXPORT_PRECISIONS[row.precision].components[ROLE_LLM]
    if llm_precision in ("fp32", "fp16") and llm_precision != row.precision:
        row.notes.append(f"LLM stays {llm_precision} in onnx {row.precision}: edgeav's {row.precision} export "
                         f"quantizes the encoders and decoders only, so this is the onnx {llm_precision} graph")
    start = time.perf_counter()
    graph = onnx_graph(ctx.llm, ctx.weights, llm_precision, ctx.progress, ctx.options.block_size)
    row.build_s = time.perf_counter() - start
    table = ctx.llm.model.embed_tokens.weight.detach().float().numpy()
    graph_bytes = sum(p.stat().st_size for p in (graph, graph.with_name(graph.name + ".data")) if p.exists())
    row.size_bytes, row.size_kind = graph_bytes + table.nbytes, "disk"
    row.weight_bytes = graph_bytes + table.shape[1] * table.itemsize
    if llm_precision in WEIGHT_ONLY_BITS:
        row.notes.append(f"LLM weights {WEIGHT_ONLY_BITS[llm_precision]}-bit (MatMulNBits, symmetric blocks of "
                         f"{ctx.options.block_size}, accuracy level {DEFAULT_INT4_ACCURACY}: int8 activations); embedding fp32")
    contender = OnnxRuntimeLLM(graph, table, ctx.llm.cfg, ctx.options.context, ctx.threads)
    _measure(row, contender, ctx)


def _peer_row(row: LLMRow, ctx: _Context) -> None:
    from edgeav.export.gguf import GGML_TYPES

    if row.precision not in GGML_TYPES:
        raise RowSkipped(f"GGUF files here are {', '.join(GGML_TYPES)}")
    missing = [name for name, module in (("llama-cpp-python", "llama_cpp"), ("gguf", "gguf")) if not _importable(module)]
    if missing:
        raise RowSkipped(f"{' and '.join(missing)} not installed; {LLAMA_CPP_INSTALL}")
    ggml_type = GGML_TYPES[row.precision][0]
    cfg = ctx.llm.cfg
    if ggml_type in ("Q8_0", "Q4_0") and (cfg.hidden_size % 32 or cfg.intermediate_size % 32):
        raise RowSkipped(f"{ggml_type} quantizes rows in blocks of 32; this LLM's widths (hidden {cfg.hidden_size}, "
                         f"intermediate {cfg.intermediate_size}) are not multiples of 32")
    start = time.perf_counter()
    path = gguf_file(ctx.llm, ctx.tokenizer, ctx.weights, row.precision, ctx.progress)
    row.build_s = time.perf_counter() - start
    row.size_bytes, row.size_kind = path.stat().st_size, "disk"
    row.weight_bytes = gguf_weight_bytes(path)
    repack = _peer_settings(ctx)
    contender = LlamaCppLLM(path, ctx.llm.cfg.vocab_size, ctx.options.context, ctx.threads,
                            extra_buffers=repack is None,
                            repack=REPACKED_Q4_0 if repack is not None and ggml_type == "Q4_0" else None)
    row.notes.append(f"GGUF {ggml_type} (every matrix, the embedding and LM head included; norms F32)")
    _measure(row, contender, ctx)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _peer_settings(ctx: _Context) -> str | None:
    """The peer's settings (recorded in the report) and whether its default weight buffers run here: None when
    they do, else the pattern of what goes on CPU_REPACK (:func:`edgeav.bench.llm_peers.llama_cpp_buffers`)."""
    if "buffers" not in ctx.llama_cpp:
        probe = _probe_gguf(ctx)
        repack, note = llama_cpp_buffers(probe)
        llama_cpp = import_llama_cpp()
        ctx.llama_cpp.update({
            "version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "n_threads": ctx.threads, "n_threads_batch": ctx.threads,
            "n_ctx": ctx.options.context, "n_batch": 2048, "n_ubatch": 512,
            "flash_attention": "auto (llama.cpp's default)", "kv_cache": "F16 (llama.cpp's default)",
            "buffers": note, "repack": repack})
    return ctx.llama_cpp["repack"]


def _probe_gguf(ctx: _Context) -> Path:
    """A small Q4_0 GGUF (one layer at 256 wide, the tokenizer's vocabulary) for the buffer probe."""
    from edgeav.export.gguf import write_gguf
    from edgeav.models.llama import Llama

    cfg = dataclasses.replace(ctx.llm.cfg, hidden_size=256, num_layers=1, num_heads=2, num_kv_heads=2,
                              intermediate_size=512)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        probe = Llama(cfg, ctx.llm.lora)
    target = cache_root() / f"probe-{cfg.vocab_size}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(probe, ctx.tokenizer, target, precision="int4")
    return target


def _tensorrt_row(row: LLMRow, ctx: _Context) -> None:
    raise RowSkipped("edgeav has no TensorRT runtime backend yet")


BUILDERS = {BASELINE: _baseline_row, "torch": _torch_row, "onnx": _onnx_row, PEER: _peer_row,
            "tensorrt": _tensorrt_row}


def _row_name(fmt: str, precision: str) -> str:
    from edgeav.export.gguf import GGML_TYPES

    if fmt == PEER and precision in GGML_TYPES:
        return f"llama.cpp {GGML_TYPES[precision][0]}"
    return f"{fmt} {precision}"


def run_llm_bench(options: LLMBenchOptions, progress: Progress = lambda message: None) -> LLMReport:
    """Measure every row (see the module docstring) and return the report."""
    if options.threads:
        torch.set_num_threads(options.threads)
    threads = torch.get_num_threads()
    progress(f"loading {'the demo model' if options.preset == 'crab-tiny' and not options.random_weights else options.preset}")
    llm, tokenizer, model_name = _load(options)
    ctx = _Context(options, llm, tokenizer, _token_ids(tokenizer, options.prompt_tokens),
                   _token_ids(tokenizer, options.prefill_tokens), threads, progress)
    if any(fmt in options.formats for fmt in ("onnx", PEER)):
        progress("hashing the weights (the key of the cached graphs and GGUF files)")
        ctx.weights = weights_key(llm, tokenizer)
    rows = [LLMRow("baseline: transformers fp32", BASELINE, "fp32")]
    rows += [LLMRow(_row_name(fmt, p), fmt, p) for fmt in options.formats for p in options.precisions]
    for row in _measuring_order(rows, options.precisions):
        run_row(row, ctx, BUILDERS)
    _compare(rows)
    versions = {**tool_versions(), "llama_cpp": package_version("llama_cpp_python"), "gguf": package_version("gguf")}
    return LLMReport(options, model_name, hardware_info(CPU, threads), versions, ctx.llama_cpp, rows)


def _measuring_order(rows: list[LLMRow], precisions: tuple[str, ...]) -> list[LLMRow]:
    """The baseline, then precision by precision, so that each row is timed right before or after its
    llama.cpp peer: the shared machine's speed drifts over minutes, and a ratio of rows timed back to back
    drifts least. The report shows them by format."""
    return sorted(rows, key=lambda row: -1 if row.format == BASELINE else precisions.index(row.precision))


def _compare(rows: list[LLMRow]) -> None:
    """Speed-ups over the peer at the same precision, and greedy tokens against the reference."""
    peers = {row.precision: row for row in rows if row.format == PEER and row.ok}
    by_name = {row.name: row for row in rows if row.ok}
    reference = by_name.get("torch fp32") or peers.get("fp32")
    for row in rows:
        if not row.ok:
            continue
        peer = peers.get(row.precision)
        if peer is not None:
            row.speedup_vs_peer = {"decode": row.decode_tok_s / peer.decode_tok_s,
                                   "prefill": row.prefill_tok_s / peer.prefill_tok_s, "peer": peer.name}
        if reference is not None:
            row.greedy_reference = reference.name
            row.greedy_match = row.greedy_ids == reference.greedy_ids
            agree = 0
            for mine, theirs in zip(row.greedy_ids, reference.greedy_ids):
                if mine != theirs:
                    break
                agree += 1
            row.greedy_agree = agree


# -- presenting --------------------------------------------------------------------------------------------


def _shown(row: LLMRow) -> str:
    return "baseline (HF fp32)" if row.format == BASELINE else row.name


def _statuses(report: LLMReport) -> dict[str, int]:
    numbered: dict[str, int] = {}
    for row in report.rows:
        if not row.ok and row.status not in numbered:
            numbered[row.status] = len(numbered) + 1
    return numbered


def tables(report: LLMReport) -> list:
    """One rich table within 100 columns; every other number is in the JSON."""
    from rich import box
    from rich.table import Table

    o = report.options
    table = Table(title=f"edgeav bench --llm-only: {report.model}; {report.hardware['threads']} threads; decode: "
                        f"{o.new_tokens} steps after {o.prompt_tokens} tokens; prefill: {o.prefill_tokens} tokens; "
                        f"p50 of up to {o.repeats} runs",
                  box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    for n, column in enumerate(("row", "status", "dec tok/s", "pre tok/s", "dec x", "pre x", "greedy", "MB/tok",
                                "GB/s")):
        table.add_column(column, justify="left" if n == 0 else "right", no_wrap=n == 0)
    footnotes = _statuses(report)
    for row in report.rows:
        if not row.ok:
            kind = row.status.split(":")[0].replace("skipped", "skip")
            table.add_row(_shown(row), f"{kind} [{footnotes[row.status]}]", *["-"] * 7)
            continue
        speedup = row.speedup_vs_peer or {}
        greedy = ("ref" if row.greedy_reference == row.name else "-" if row.greedy_match is None
                  else "=" if row.greedy_match else f"{row.greedy_agree}/{len(row.greedy_ids)}")
        table.add_row(_shown(row), "ok", f"{row.decode_tok_s:.2f}", f"{row.prefill_tok_s:.1f}",
                      f"{speedup['decode']:.2f}x" if speedup else "-", f"{speedup['prefill']:.2f}x" if speedup else "-",
                      greedy, f"{row.weight_bytes / 1e6:.0f}" if row.weight_bytes else "-",
                      f"{row.weight_bytes * row.decode_tok_s / 1e9:.2f}" if row.weight_bytes else "-")
    return [table]


def footer(report: LLMReport) -> list[str]:
    """Why rows did not run, what the columns mean, the notes of each row, the machine and the versions."""
    hw, versions, peer = report.hardware, report.versions, report.llama_cpp
    lines = [f"[{n}] {', '.join(_shown(r) for r in report.rows if r.status == status)}: {status}"
             for status, n in _statuses(report).items()]
    reference = next((r.greedy_reference for r in report.rows if r.greedy_reference), None)
    lines += [
        "dec x, pre x: decode and prefill tokens/s over llama.cpp's at the same bits (fp32 F32, int8 Q8_0, int4 "
        f"Q4_0); greedy: '=' all {report.options.new_tokens + 1} greedy tokens equal {reference or 'the reference'}'s "
        "(ref), else how many lead alike; MB/tok: weights one decode step reads; GB/s: MB/tok x dec tok/s",
    ]
    lines += [f"{_shown(row)}: {note}" for row in report.rows if row.ok for note in row.notes]
    onnx_fp32, torch_fp32 = ({r.name: r for r in report.rows if r.ok}.get(n) for n in ("onnx fp32", "torch fp32"))
    if onnx_fp32 and torch_fp32 and onnx_fp32.greedy_ids != torch_fp32.greedy_ids:
        lines.append("onnx fp32's greedy tokens differ from torch fp32's, which they should equal")
    if peer:
        lines.append(f"llama.cpp (llama-cpp-python {peer['version']}): n_threads = n_threads_batch = {peer['n_threads']}, "
                     f"flash attention {peer['flash_attention']}, KV cache {peer['kv_cache']}; {peer['buffers']}")
    lines += [f"hardware: {hw['cpu']}, {hw['cores']} cores, {hw['threads']} threads for every contender",
              "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return lines


__all__ = ["DEFAULT_FORMATS", "DEFAULT_PRECISIONS", "FORMATS", "LLMBenchOptions", "LLMReport", "LLMRow", "PEER",
           "footer", "make_options", "run_llm_bench", "tables"]
