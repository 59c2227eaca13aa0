"""``edgeav bench``: the table, JSON and plot it writes, the baseline it compares against, and its arithmetic.

Fast: crab-tiny (the demo model), one timed run per row, no ONNX export (the onnx rows are in a
``slow`` test). No assertion reads a time: only that times exist and relate as defined.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
import traceback

import pytest
import torch

from edgeav.bench import roofline
from edgeav.bench.harness import Row, project_row, tensor_bytes
from edgeav.cli import main
from edgeav.systems.crab.config import preset
from edgeav.models.ilora import ILoRALinear
from edgeav.models.llama import Llama


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except Exception:
        rc = 1
        sys.stderr.write(traceback.format_exc())
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr must be one line, got {err!r}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not named in {lines[0]!r}"
    assert rc == 2, (rc, err)


# -- the command ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One fast `edgeav bench` on the demo model: baseline, torch fp32, int8 and int4, tensorrt, the Orin Nano
    projection (module-scoped, so stdout and stderr are captured by hand rather than with capsys)."""
    folder = tmp_path_factory.mktemp("bench")
    json_path, png_path = folder / "bench.json", folder / "bench.png"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["bench", "--formats", "torch,tensorrt", "--precisions", "fp32,int8,int4", "--repeats", "1",
                   "--warmup", "0", "--tokens", "4", "--eval-n", "1", "--project", "orin-nano",
                   "--json", str(json_path), "--plot", str(png_path)])
    return rc, out.getvalue(), err.getvalue(), json_path, png_path


def test_bench_writes_table_json_and_png_with_the_baseline_first(bench_run):
    rc, out, err, json_path, png_path = bench_run
    assert rc == 0, err
    report = json.loads(json_path.read_text())
    rows = report["rows"]
    assert rows[0]["format"] == "baseline" and rows[0]["status"] == "ok", rows[0]
    names = [row["name"] for row in rows]
    assert names[1:] == ["torch fp32", "torch int8", "torch int4", "tensorrt fp32", "tensorrt int8", "tensorrt int4"]
    # The table lists the rows in the same order, baseline first, and says warm-up is excluded.
    positions = [out.index(name) for name in ("baseline", "torch fp32", "tensorrt fp32")]
    assert positions == sorted(positions), out
    assert "warm-up run(s) excluded" in " ".join(out.split())
    assert "versions:" in out and "hardware:" in out
    torch_row = rows[1]
    assert torch_row["status"] == "ok"
    for stage in ("decode", "visual", "audio", "prefill", "per_token", "mask"):
        assert torch_row["stages_ms"][stage]["p50"] > 0, stage
    assert torch_row["speedup_end_to_end"] == pytest.approx(
        rows[0]["end_to_end_s"]["p50"] / torch_row["end_to_end_s"]["p50"])
    assert torch_row["real_time_factor"] == pytest.approx(torch_row["end_to_end_s"]["p50"] / 10)
    assert torch_row["achieved_bandwidth"] == pytest.approx(
        torch_row["bytes_per_token"] * torch_row["decode_tokens_per_s"])
    assert 0 <= torch_row["metric"] <= 1  # the demo suite's AVE accuracy on the demo model
    assert torch_row["device_peak_bytes"] is None  # CPU: n/a
    # Every row decodes the same number of tokens: the baseline's steps after the prefill, the runtime's forced ones.
    assert rows[0]["decode_steps"] == 3 and torch_row["decode_steps"] == 4
    if importlib.util.find_spec("tensorrt") is None:
        assert rows[4]["status"] == "skipped: TensorRT not installed"
    # TensorRT builds fp32, fp16 and int8 here: an int4 row says so, whether TensorRT is installed or not.
    assert rows[6]["status"] == "skipped: TensorRT builds here offer fp32, fp16, int8; int4 is not one of them"
    # torch's weight-only rows are refused on a CPU, where they would decode slower than fp32.
    assert rows[2]["status"].startswith("skipped: torch's weight-only int8 dequantizes on every call on a CPU")


def test_bench_table_fits_100_columns_and_points_to_its_footnotes(bench_run):
    rc, out, _, json_path, _ = bench_run
    assert max(len(line) for line in out.splitlines()) <= 100, out
    lines = out.splitlines()
    # One line per row: the status is short and its footnote says why.
    assert any(line.split()[:3] == ["tensorrt", "int4", "skip"] for line in lines), out
    assert "tensorrt int4: skipped: TensorRT builds here offer fp32, fp16, int8" in " ".join(lines)
    report = json.loads(json_path.read_text())
    assert report["rows"][1]["stages_ms"]["prefill"]["p95"] > 0  # the p95s the table leaves to the JSON


def test_bench_does_not_project_a_model_whose_weights_do_not_dominate(bench_run):
    rc, out, _, json_path, png_path = bench_run
    report = json.loads(json_path.read_text())
    projection = report["projection"]
    assert "NOT a measurement" in projection["kind"] and projection["device"]["bandwidth_bytes_per_s"] == 68e9
    # The demo model's LLM reads a few MB a step: launch overhead, not bandwidth, would set its speed.
    assert projection["rows"] == {}
    assert set(projection["not_projected"]) == {row["name"] for row in report["rows"] if row["status"] == "ok"}
    reason = projection["not_projected"]["torch fp32"]
    assert reason.startswith("not projected: a decode step reads") and "kernel launches" in reason
    assert "PROJECTION, NOT A MEASUREMENT" not in out
    assert "--project orin-nano: nothing projected: a decode step reads" in " ".join(out.split())
    from PIL import Image

    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_projection_needs_weights_that_dominate_a_decode_step():
    nano = roofline.DEVICES["orin-nano"]
    # crab-7b: 6.7 B parameters, about 3.4 GB in int4; crab-tiny's LLM: under 5 MB in fp32.
    assert roofline.projection_refusal(3.4e9, nano) is None
    assert roofline.projection_refusal(13.5e9, roofline.DEVICES["thor"]) is None
    small = roofline.projection_refusal(4.7e6, nano)
    assert small is not None and "0.07 ms at 68 GB/s" in small
    # The line sits at MIN_PROJECTED_STEP_S of memory time on the device.
    edge = roofline.MIN_PROJECTED_STEP_S * nano.bandwidth
    assert roofline.projection_refusal(edge, nano) is None and roofline.projection_refusal(edge * 0.99, nano)


def test_projection_table_of_projected_rows_fits_100_columns():
    from rich.console import Console

    from edgeav.bench.harness import BenchOptions, BenchReport, footer, tables

    device = roofline.DEVICES["orin-nano"]
    row = Row("torch int4", "torch", "int4", decode_steps=32, size_bytes=3_400_000_000, size_kind="memory",
              stage_work={stage: {"bytes": 3.4e9, "flops": 1e12, "compute": "fp16"}
                          for stage in ("visual", "audio", "prefill", "per_token")})
    row.projection = project_row(row, device)
    skipped = Row("onnx bf16", "onnx", "bf16", status="skipped: onnx engines offer fp32, fp16, int8, int4 " * 3)
    report = BenchReport(BenchOptions(random_weights=True, preset="crab-7b", project="orin-nano"), "crab-7b", "clip",
                         700, {"cpu": "cpu", "cores": 2, "threads": 2, "gpu": None}, {"torch": "x"},
                         {"bytes_per_s": 1e10, "how": "measured: host memcpy"}, {}, [row, skipped],
                         {"name": device.name, "bandwidth_bytes_per_s": device.bandwidth})
    console = Console(width=100, record=True)
    for table in tables(report):
        console.print(table)
    for line in footer(report):
        console.print(line, highlight=False)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "PROJECTION, NOT A MEASUREMENT" in text
    assert f"{row.projection['decode_tokens_per_s']:.0f}" in text  # 3.4 GB at 68 GB/s: 20 tokens/s
    assert "[1] onnx bf16: skipped: onnx engines offer" in " ".join(text.split())


def test_baseline_generates_the_runtimes_greedy_tokens():
    """The baseline runs the same model: on the demo clip its greedy tokens are the runtime's, token for token."""
    pytest.importorskip("transformers")
    from edgeav.bench.baseline import BaselineCrab
    from edgeav.systems.crab.checkpoints import load_converted
    from edgeav.runtime import DEMO_CLIP, DEMO_DIR, Runtime
    from edgeav.stages import Trace

    loaded = load_converted(DEMO_DIR)
    trace = Trace()
    result = Runtime(loaded).run(DEMO_CLIP, "ave", trace=trace)
    run = BaselineCrab(loaded).run(DEMO_CLIP, "ave")
    assert len(trace.tokens[0]) > 5
    assert run.token_ids == trace.tokens[0]
    assert run.text == result.text


def test_separate_ilora_computes_what_ilora_linear_computes():
    from edgeav.bench.baseline import SeparateILoRA

    layer = ILoRALinear(24, 16, rank=4, heads=3, scale=2.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        layer.lora_route.normal_(std=0.5)
    base = torch.nn.Linear(24, 16, bias=False)
    base.weight = torch.nn.Parameter(layer.weight.detach().clone())
    x = torch.randn(2, 5, 24)
    wrapped = SeparateILoRA(base, layer)
    assert len(wrapped.lora_B) == 3
    torch.testing.assert_close(wrapped(x), layer(x), atol=1e-5, rtol=1e-5)


# -- bytes, FLOPs and the projection ------------------------------------------------------------------------


def test_decode_bytes_per_token_count_every_weight_once_and_the_cache():
    cfg = preset("crab-tiny")
    llm = Llama(cfg.llm, cfg.lora)
    llm.setup_caches(1, 64)  # cache buffers, rope tables and the mask are not weights
    # Independent count: every parameter, less the embedding table but one row of it, four bytes each.
    params = sum(p.numel() for p in llm.parameters())
    expected_weights = 4 * (params - cfg.llm.vocab_size * cfg.llm.hidden_size + cfg.llm.hidden_size)
    weights = tensor_bytes(llm, embedding="model.embed_tokens.weight")
    assert weights == expected_weights
    context = 50
    kv = 2 * cfg.llm.num_layers * cfg.llm.num_kv_heads * (cfg.llm.hidden_size // cfg.llm.num_heads) * 4 * context
    assert roofline.decode_bytes_per_token(weights, cfg.llm, 4, context) == expected_weights + kv
    assert roofline.mean_decode_context(100, 4) == 102.5  # steps attend to 101 .. 104 positions


def test_llm_flops_per_token_match_torchs_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset("crab-tiny")
    llm = Llama(cfg.llm, cfg.lora).eval().requires_grad_(False)
    llm.setup_caches(1, 64)
    context = 40
    # The math attention path: the counter does not see the fused CPU attention kernel's matmuls.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        llm(torch.randn(1, 1, cfg.llm.hidden_size), torch.tensor([context - 1]), context)
    assert roofline.llm_flops_per_token(cfg.llm, cfg.lora, context) == counter.get_total_flops()


def test_roofline_projection_of_a_hand_computed_case():
    device = roofline.DeviceSpec("test board", bandwidth=100e9, peak_flops={"fp32": 1e12, "fp16": 4e12}, sources="-")
    # 2 GB at 100 GB/s = 20 ms; 1 TFLOP at 1 TFLOP/s = 1 s: compute bound.
    heavy = roofline.project(roofline.StageWork(2e9, 1e12, "fp32"), device)
    assert heavy["seconds"] == pytest.approx(1.0) and heavy["bound"] == "compute"
    assert heavy["memory_s"] == pytest.approx(0.02)
    # The same bytes with 1 GFLOP in fp16: 0.25 ms of compute, 20 ms of memory: memory bound.
    light = roofline.project(roofline.StageWork(2e9, 1e9, "fp16"), device)
    assert light["seconds"] == pytest.approx(0.02) and light["bound"] == "memory"

    row = Row("hand", "torch", "fp32", decode_steps=10, stage_work={
        "visual": {"bytes": 1e9, "flops": 5e11, "compute": "fp32"},   # max(10 ms, 500 ms) = 0.5 s
        "audio": {"bytes": 5e9, "flops": 1e10, "compute": "fp32"},    # max(50 ms, 10 ms) = 0.05 s
        "prefill": {"bytes": 1e9, "flops": 2e11, "compute": "fp16"},  # max(10 ms, 50 ms) = 0.05 s
        "per_token": {"bytes": 2e8, "flops": 1e9, "compute": "fp16"},  # max(2 ms, 0.25 ms) = 2 ms
    })
    projected = project_row(row, device)
    assert projected["end_to_end_model_s"] == pytest.approx(0.5 + 0.05 + 0.05 + 10 * 0.002)
    assert projected["ttft_model_s"] == pytest.approx(0.6)
    assert projected["decode_tokens_per_s"] == pytest.approx(500)


def test_jetson_specs_are_the_published_bandwidths():
    assert roofline.DEVICES["orin-nano"].bandwidth == 68e9
    assert roofline.DEVICES["orin-agx"].bandwidth == 204.8e9
    assert roofline.DEVICES["thor"].bandwidth == 273e9


# -- bad options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["--precisions", "fp32,fp33"], ["--precisions", "fp33", "fp32"]),
    (["--formats", "torch,onnnx"], ["--formats", "onnnx", "onnx"]),
    (["--project", "orin-mini"], ["orin-mini"]),
    (["--json", "{missing}/out.json"], ["--json", "does not exist"]),
    (["--plot", "{tmp}/chart.jpg"], ["--plot", ".png"]),
    (["--preset", "crab-small"], ["crab-small", "--random-weights"]),
])
def test_bad_options_end_with_one_line_and_exit_2(capsys, tmp_path, args, needles):
    args = [a.format(missing=tmp_path / "no-such-folder", tmp=tmp_path) for a in args]
    rc, _, err = cli(capsys, "bench", *args)
    assert_one_line_error(rc, err, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_device_cuda_without_a_gpu_is_a_user_error(capsys):
    rc, _, err = cli(capsys, "bench", "--device", "cuda")
    assert_one_line_error(rc, err, "--device cuda")


# -- the onnx rows (an export: slow) -------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_rows_run_from_an_export(tmp_path):
    from edgeav.bench.harness import BenchOptions, run_bench

    report = run_bench(BenchOptions(formats=("onnx",), precisions=("fp32", "bf16"), repeats=1, warmup=0, tokens=4,
                                    eval_n=1))
    onnx_fp32, onnx_bf16 = report.rows[1:]
    assert onnx_fp32.status == "ok" and onnx_fp32.size_kind == "disk" and onnx_fp32.size_bytes > 0
    assert onnx_fp32.stages_ms["mask"]["p50"] > 0 and onnx_fp32.bytes_per_token > 0
    assert onnx_bf16.status.startswith("skipped: onnx engines offer")
