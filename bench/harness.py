"""Crab's ``edgeav bench`` (its System record's ``bench``): every format x precision on one 10-s AVE clip,
against the original way of running Crab.

    report = run_bench(BenchOptions(preset="crab-small", random_weights=True))
    report.to_dict()                       # every number, JSON-ready
    write_plot(report, "bench.png")        # bars of end-to-end latency and decode tokens/s

Rows, in order:

1. the baseline (:mod:`edgeav.bench.baseline`): transformers' Llama, fp32, eager attention,
   the I-LoRA as separate modules, HF ``generate``, edgeav's encoders;
2. ``torch`` (the reference engine) in each precision: fp32, bf16 and fp16 cast the whole model,
   int8 and int4 store the LLM's projections weight-only (``Runtime(llm_weights=...)``, edgeav.kernels);
3. ``onnx`` engines exported by :func:`edgeav.export.exporter.export_engine` (served from the
   export cache when the same weights were exported before);
4. ``tensorrt``: reported as skipped, with the reason (never pretended).

Every row runs the same clip with generation teacher-forced on the same ``tokens`` tokens (the
baseline: ``min_new_tokens`` = ``max_new_tokens``), so each decodes exactly as many tokens. Warm-up
runs are excluded; stage times are p50/p95 over the ``repeats`` runs that follow. The mask decoder
(which AVE does not use) is timed on its own, on one frame's CLIP features. A row that cannot run
says why in its status and the others go on.

``edgeav bench --llm-only`` (``make_options(llm_only=True)``) runs the LLM alone against llama.cpp instead:
:mod:`edgeav.bench.llm_bench`.

Here: the run (:func:`run_bench`). Its options: :mod:`edgeav.bench.options`; measuring:
:mod:`edgeav.bench.measure`; the rows: :mod:`edgeav.bench.rows`; tables, JSON and the plot:
:mod:`edgeav.bench.report`.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from edgeav.bench import roofline
from edgeav.bench.baseline import build_prompt
from edgeav.bench.timing import device_peak_bandwidth, hardware_info, tensor_bytes, tool_versions
from edgeav.bench.options import BASELINE, CLIP_SECONDS, CLIP_SEED, TASK, BenchOptions, Progress, parse_choices
from edgeav.bench import llm_bench
from edgeav.bench.report import TABLE_WIDTH, BenchReport, Row, write_plot
from edgeav.bench.report import footer as clip_footer, tables as clip_tables
from edgeav.bench.rows import RowContext, run_row
from edgeav.systems.crab.checkpoints import LoadedCrab, load_converted, synthesize
from edgeav.errors import OptionError
from edgeav.runtime import DEMO_DIR


def _load(options: BenchOptions) -> tuple[LoadedCrab, str]:
    if options.demo_weights:
        if not (DEMO_DIR / "model.safetensors").is_file():
            raise OptionError(f"{DEMO_DIR}: the demo model is not installed; pass --random-weights")
        loaded = load_converted(DEMO_DIR)
        loaded.source = "edgeav demo model"
        return loaded, f"{loaded.source} (crab-tiny)"
    return synthesize(options.preset, 0), f"{options.preset}, random weights (seed 0)"


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """Parameters without requires_grad for a while (torch's FLOP counter hooks every tensor that wants grads)."""
    wanted = [p for p in module.parameters() if p.requires_grad]
    for param in wanted:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in wanted:
            param.requires_grad_(True)


def _reference_flops(loaded: LoadedCrab, pixels: np.ndarray, fbank: np.ndarray, hidden: torch.Tensor) -> dict:
    """FLOPs of the encoders and the mask decoder at this run's shapes, counted by torch's FLOP counter on the
    fp32 reference modules (matmuls, convolutions, attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math attention path: the counter does not see the fused CPU attention kernel's matmuls.
    math_attention = sdpa_kernel(SDPBackend.MATH)
    model = loaded.variant("joint")
    counts = {}
    with torch.no_grad(), _frozen(model), math_attention:
        for stage, call in (("visual", lambda: model.encode_frames(torch.from_numpy(pixels))),
                            ("audio", lambda: model.encode_audio(torch.from_numpy(fbank)))):
            with FlopCounterMode(display=False) as counter:
                call()
            counts[stage] = float(counter.get_total_flops())
    if "avs" in loaded.variants:
        avs = loaded.variant("avs")
        with torch.no_grad(), _frozen(avs), sdpa_kernel(SDPBackend.MATH):
            features = avs.encode_frames(torch.from_numpy(pixels[:1]))
            with FlopCounterMode(display=False) as counter:
                avs.mask_logits(hidden, features)
            counts["mask"] = float(counter.get_total_flops())
        loaded.variant("joint")
    return counts


LLM_ONLY = True  # ``edgeav bench --llm-only``: :mod:`edgeav.bench.llm_bench`


def make_options(*, checkpoint: Path | None = None, preset: str | None = None, llm_only: bool = False,
                 **values) -> BenchOptions | llm_bench.LLMBenchOptions:
    """:class:`BenchOptions` from ``edgeav bench``'s options (None: the default), refusing what Crab's bench
    cannot take; with ``llm_only``, those of the LLM-only bench."""
    if llm_only:
        return llm_bench.make_options(checkpoint=checkpoint, preset=preset, **values)
    if checkpoint is not None:
        raise OptionError(f"--checkpoint {checkpoint}: Crab's bench runs the demo model or a preset's random weights "
                          "(--preset NAME --random-weights); drop --checkpoint")
    given = {name: value for name, value in values.items() if value is not None}
    return BenchOptions(**({"preset": preset} if preset is not None else {}), **given)


def run_bench(options: BenchOptions | llm_bench.LLMBenchOptions,
              progress: Progress = lambda message: None) -> BenchReport | llm_bench.LLMReport:
    """Measure every row (see the module docstring) and return the report."""
    if isinstance(options, llm_bench.LLMBenchOptions):
        return llm_bench.run_llm_bench(options, progress)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device cuda: torch {torch.__version__} sees no CUDA device; drop --device cuda "
                          "or install a CUDA build of torch")
    if options.threads:
        torch.set_num_threads(options.threads)
    threads = torch.get_num_threads()
    from edgeav.bench import world

    progress(f"loading {'the demo model' if options.demo_weights else options.preset}")
    loaded, model_name = _load(options)
    cfg = loaded.config
    with tempfile.TemporaryDirectory(prefix="edgeav-bench-") as folder:
        workdir = Path(folder)
        clip = world.write_clip(world.sample_clip(CLIP_SEED, TASK, duration_s=CLIP_SECONDS), workdir / "ave.mp4")
        prompt = build_prompt(loaded.variant("joint"), loaded.tokenizer, clip, TASK)
        prompt_tokens = prompt.embeds.shape[1]
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(cfg.seg.num_mask_tokens, cfg.llm.hidden_size, generator=generator)
        flops = _reference_flops(loaded, prompt.pixels, prompt.fbank, hidden)
        steps = options.tokens  # the runtime's forced decode runs one forward pass per forced token
        flops["prefill"] = float(roofline.llm_prefill_flops(cfg.llm, cfg.lora, prompt_tokens))
        flops["per_token"] = float(roofline.llm_flops_per_token(
            cfg.llm, cfg.lora, round(roofline.mean_decode_context(prompt_tokens, steps))))
        forced = (loaded.tokenizer.encode("the time range is") * options.tokens)[: options.tokens]
        ctx = RowContext(options, loaded, clip, forced, prompt_tokens, prompt.pixels[:1], hidden, flops, device,
                         workdir, progress)
        progress("measuring the peak memory bandwidth")
        peak = device_peak_bandwidth(device)
        rows = [Row("baseline: transformers fp32 eager", BASELINE, "fp32")]
        rows += [Row(f"{fmt} {precision}", fmt, precision) for fmt in options.formats for precision in options.precisions]
        for row in rows:
            run_row(row, ctx)
    _compare(rows, peak["bytes_per_s"])
    report = BenchReport(options, model_name, f"world clip seed {CLIP_SEED}, {CLIP_SECONDS} s {TASK}, 320x240",
                         prompt_tokens, hardware_info(device, threads), tool_versions(), peak, flops, rows)
    if options.project:
        spec = roofline.device_spec(options.project)
        report.projection_device = {"key": options.project, "name": spec.name, "bandwidth_bytes_per_s": spec.bandwidth,
                                    "peak_ops_per_s": spec.peak_flops, "sources": spec.sources}
        for row in rows:
            if not row.ok:
                continue
            row.not_projected = roofline.projection_refusal(row.stage_work["per_token"]["bytes"], spec)
            if row.not_projected is None:
                row.projection = project_row(row, spec)
    return report


def _compare(rows: list[Row], peak_bandwidth: float) -> None:
    """Speed-ups over the baseline (when it ran) and achieved bandwidth, for every row that ran."""
    base = rows[0] if rows and rows[0].ok else None
    for row in rows:
        if not row.ok:
            continue
        if row.bytes_per_token and row.decode_tokens_per_s:
            row.achieved_bandwidth = row.bytes_per_token * row.decode_tokens_per_s
            row.bandwidth_share = row.achieved_bandwidth / peak_bandwidth
        if base is not None:
            row.speedup_end_to_end = base.end_to_end_s["p50"] / row.end_to_end_s["p50"]
            if base.decode_tokens_per_s and row.decode_tokens_per_s:
                row.speedup_decode = row.decode_tokens_per_s / base.decode_tokens_per_s


def tables(report: BenchReport | llm_bench.LLMReport) -> list:
    return llm_bench.tables(report) if isinstance(report, llm_bench.LLMReport) else clip_tables(report)


def footer(report: BenchReport | llm_bench.LLMReport) -> list[str]:
    return llm_bench.footer(report) if isinstance(report, llm_bench.LLMReport) else clip_footer(report)


def project_row(row: Row, device: roofline.DeviceSpec) -> dict:
    """The roofline projection of ``row``'s stages on ``device`` (a lower bound, not a measurement)."""
    stages = {}
    for stage, work in row.stage_work.items():
        stages[stage] = roofline.project(roofline.StageWork(work["bytes"], work["flops"], work["compute"]), device)
    per_token = stages["per_token"]["seconds"]
    steps = row.decode_steps or 0
    model_s = sum(stages[s]["seconds"] for s in ("visual", "audio", "prefill")) + steps * per_token
    return {"stages": stages, "decode_tokens_per_s": 1 / per_token if per_token else None,
            "ttft_model_s": sum(stages[s]["seconds"] for s in ("visual", "audio", "prefill")),
            "end_to_end_model_s": model_s,
            "excludes": "media decode (a hardware decoder's job there) and host overheads"}


__all__ = ["TABLE_WIDTH", "BenchOptions", "BenchReport", "Row", "footer", "make_options", "parse_choices", "project_row",
           "run_bench", "tables", "tensor_bytes", "write_plot"]
