"""Export: graphs against the reference, engine directories, quantization, receipts."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import engine_graphs, llm_tensorrt_problems
from edgeav.models.llama import Llama, RMSNorm
from edgeav.systems.crab.config import preset
from edgeav.systems.crab.checkpoints import load_converted
from edgeav.engines import MAX_THREADS
from edgeav.engines.manifest import DEFAULT_INT4_ACCURACY, check_export_options, read_manifest, sha256_file, verify_files
from edgeav.engines.manifest_schema import MANIFEST
from edgeav.systems.crab.onnx_engine import OnnxEngine
from edgeav.errors import CheckpointError, EdgeavError, OptionError
from edgeav.export.exporter import (_graph_from_cache, _graph_to_cache, _without_weight_only, cache_dir,
                                    checkpoint_digest, export_engine, graph_cache_dir, heartbeat)
from edgeav.engines.onnx import OnnxLLM
from edgeav.engines.qwen_onnx import OnnxQwenLLM
from edgeav.export.trace import export_graph
from edgeav.export.graphs import GraphSpec, LLMGraph, llm_example, llm_graph
from edgeav.export.quantize import lora_matmuls, lora_weights, quantize_weights
from edgeav.export.tensorrt import check_graph
from edgeav.runtime import DEMO_CLIP, DEMO_DIR, Runtime
from edgeav.systems.crab.engine_layout import PRECISIONS
from edgeav.systems.crab.tasks import get_task
from edgeav.tokenizer import TOKENIZER_CONFIG_FILE, TokenizerSettings


def _live_lora_llm(name: str, mrope: bool = False):
    """The preset's LLM with two layers (each layer's norms and cache meet the next's; tracing time grows with
    layers), a live LoRA and norms of their own weights; with ``mrope``, as Qwen2.5: three position streams and
    two query heads per KV head."""
    torch.manual_seed(0)
    config = preset(name)
    changes = {"mrope_section": (4, 6, 6), "num_kv_heads": 2} if mrope else {}
    llm = Llama(dataclasses.replace(config.llm, num_layers=2, **changes), config.lora)
    llm.eval()
    for module in llm.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B, std=0.05)
        if isinstance(module, RMSNorm):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return llm


# Prefill, decode, a second prompt after the cache (a follow-up turn), decode.
STEPS = (9, 1, 4, 1)


def test_llm_graph_matches_the_cached_reference_in_prefill_and_decode():
    llm = _live_lora_llm("crab-tiny")
    graphs = [LLMGraph(llm, fused=True), LLMGraph(llm, fused=False)]
    cfg = llm.cfg
    buffers = [[torch.zeros(1, cfg.num_kv_heads, 20, cfg.head_dim) for _ in range(2 * cfg.num_layers)] for _ in graphs]
    llm.setup_caches(1, 32)
    past = 0
    for tokens in STEPS:
        x = torch.randn(1, tokens, cfg.hidden_size)
        with torch.no_grad():
            ref_logits, ref_hidden = llm(x, torch.arange(past, past + tokens))
            for graph, cache in zip(graphs, buffers):
                logits, hidden, *cache[:] = graph(x, torch.tensor([past]), *cache)
                assert (logits - ref_logits[:, -1]).abs().max() < 1e-5
                assert (hidden - ref_hidden[:, -1]).abs().max() < 1e-5
        past += tokens
    # The buffers hold the reference cache's entries, heads outermost, and nothing past them.
    reference = llm.model.layers[0].self_attn.kv_cache.k_cache[:, :, :past]
    for cache in buffers:
        assert (cache[0][:, :, :past] - reference).abs().max() < 1e-5
        assert cache[0][:, :, past:].abs().max() == 0


@pytest.mark.parametrize("tracer", ["torchscript", "torch.export"])
@pytest.mark.parametrize("mrope", [False, True])
def test_both_llm_graphs_on_onnxruntime_match_torch_through_the_runtime_cache(mrope, tracer, tmp_path):
    """The onnx engine's graph (onnxruntime's GroupQueryAttention, an implementation nobody here wrote, writing
    the shared buffers in place) and the TensorRT engine's (standard ops) against the torch model, step by step
    through :class:`OnnxLLM`'s bound cache; M-RoPE included (Crab+'s LLM); from both tracers (a small LLM's
    graph comes from TorchScript's, a 7 B one's from torch.export)."""
    llm = _live_lora_llm("crab-tiny", mrope)
    cfg = llm.cfg
    sessions = {}
    for fmt in ("onnx", "tensorrt"):
        module, spec = llm_graph(llm, fmt)
        path = tmp_path / f"{fmt}.onnx"
        with torch.no_grad():
            assert export_graph(module, spec, llm_example(cfg), path, tracer=tracer) == tracer
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert ("GroupQueryAttention" in ops) == (fmt == "onnx")
        table = np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32)
        sessions[fmt] = (OnnxQwenLLM if mrope else OnnxLLM)(ort.InferenceSession(str(path)), table,
                                                            SimpleNamespace(llm=cfg))
        sessions[fmt].setup_caches(1, 24)
    assert check_graph(tmp_path / "tensorrt.onnx") == []
    llm.setup_caches(1, 24)
    past = 0
    for tokens in STEPS:
        x = torch.randn(1, tokens, cfg.hidden_size)
        positions = torch.arange(past, past + tokens)
        # M-RoPE: three streams that differ (as a picture's rows and columns do)
        extra = {"positions": torch.stack([positions, positions // 2, positions % 3])} if mrope else {}
        with torch.no_grad():
            ref_logits, ref_hidden = llm(x, positions, **extra)
        for fmt, engine in sessions.items():
            logits, hidden = engine(x, positions, **extra)
            assert (logits[:, -1] - ref_logits[:, -1]).abs().max() < 1e-4, (fmt, past)
            assert (hidden[:, -1] - ref_hidden[:, -1]).abs().max() < 1e-4, (fmt, past)
        past += tokens


class _SizeAsNumber(torch.nn.Module):
    """Divides by its input's length taken as a Python number: TorchScript's tracer freezes it."""

    def forward(self, x):
        return x / float(x.shape[1])


def test_a_trace_that_freezes_a_size_fails_its_check_and_goes_to_torch_export(tmp_path):
    spec = GraphSpec(("x",), ("y",), {"x": {1: "n"}, "y": {1: "n"}})
    example = (torch.randn(2, 5),)
    with pytest.raises(EdgeavError, match="does not generalise"):
        export_graph(_SizeAsNumber(), spec, example, tmp_path / "forced.onnx", tracer="torchscript")
    assert not (tmp_path / "forced.onnx").exists()
    assert export_graph(_SizeAsNumber(), spec, example, tmp_path / "auto.onnx") == "torch.export"


def test_both_tracers_write_the_visual_graph_the_reference_computes(tmp_path):
    """The demo's CLIP + Q-Former graph from TorchScript's tracer (what the demo's engines use) and from
    torch.export (what a checkpoint over the tracer's size limit gets), at a frame count neither traced."""
    from edgeav.systems.crab.export import VISUAL, VisualGraph

    graph = VisualGraph(load_converted(DEMO_DIR).variant("joint"))
    size = graph.model.config.vision.image_size
    pixels = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = graph(pixels)
        for tracer in ("torchscript", "torch.export"):
            path = tmp_path / f"{tracer}.onnx"
            assert export_graph(graph, VISUAL, (torch.randn(2, 3, size, size),), path, tracer=tracer) == tracer
            outputs = ort.InferenceSession(str(path)).run(None, {"pixels": pixels.numpy()})
            for want, got in zip(expected, outputs):
                assert np.abs(want.numpy() - got).max() < 1e-4, tracer


def test_fp32_engine_matches_the_reference(demo_engine):
    receipt = read_manifest(demo_engine)["receipt"]
    assert receipt["logits"]["max_abs_logit_diff"] <= 1e-4
    assert receipt["logits"]["steps"] > 50
    assert receipt["greedy_text_agreement"] == 1.0
    assert receipt["mask_iou_vs_reference"] == 1.0
    for task, pair in receipt["metrics"].items():
        assert pair["engine"] == pytest.approx(pair["reference"]), task


def test_engine_runs_like_the_reference_on_the_demo_clip(demo_engine):
    reference = Runtime.demo().run(DEMO_CLIP, "s4", at_seconds=[1])
    engine = Runtime.from_engine(demo_engine)
    result = engine.run(DEMO_CLIP, "s4", at_seconds=[1])
    assert result.text == reference.text
    assert len(result.masks) == len(reference.masks) == 1
    assert (result.masks[0].mask == reference.masks[0].mask).mean() > 0.999
    # The KV buffer is allocated once and reused by the next run.
    llm = engine.engine.variant("avs").llm
    buffer = llm._kv
    engine.run(DEMO_CLIP, "s4", at_seconds=[2])
    assert llm._kv is buffer


def test_manifest_records_what_the_issue_asks(demo_engine):
    manifest = read_manifest(demo_engine)
    assert manifest["backend"] == "onnx" and manifest["precision"] == "fp32"
    assert manifest["components"] == PRECISIONS["fp32"].components
    assert manifest["source"]["digest"] == checkpoint_digest(load_converted(DEMO_DIR))
    assert set(manifest["tools"]) >= {"torch", "onnx", "onnxruntime", "edgeav"}
    assert manifest["lora"]["merged"] is False
    graphs = {name: onnx.load(str(demo_engine / entry["file"])) for name, entry in manifest["graphs"].items()}
    assert set(graphs) == {"visual", "audio", "llm", "mask_avs", "mask_avss"}
    llm = graphs["llm"].graph
    layers = load_converted(DEMO_DIR).config.llm.num_layers
    assert [i.name for i in llm.input][:4] == ["inputs_embeds", "past_length", "past_key_0", "past_value_0"]
    assert [o.name for o in llm.output][:3] == ["logits", "hidden", "present_key_0"]
    assert len(llm.input) == len(llm.output) == 2 + 2 * layers
    assert llm.input[2].type.tensor_type.shape.dim[2].dim_param == "capacity"
    assert graphs["visual"].graph.input[0].type.tensor_type.shape.dim[0].dim_param == "frames"


def test_every_exported_graph_but_the_fused_llm_parses_in_tensorrt(demo_engine):
    assert llm_tensorrt_problems(engine_graphs(demo_engine)) == []


def test_corrupted_file_and_foreign_manifest_are_refused(demo_engine, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo_engine, broken)
    with open(broken / "llm.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="llm.onnx: its SHA-256 does not match"):
        OnnxEngine(broken)
    foreign = tmp_path / "foreign"
    shutil.copytree(demo_engine, foreign)
    manifest = json.loads((foreign / MANIFEST).read_text())
    manifest["files"]["visual.onnx"] = "0" * 64  # as if written for another export
    (foreign / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="visual.onnx"):
        OnnxEngine(foreign)
    (foreign / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        OnnxEngine(foreign)


def test_repeated_export_is_served_from_the_cache(demo_engine, tmp_path):
    """demo_engine's export stored itself in the (test) cache; the same export again is copied from there."""
    messages = []
    again = export_engine(load_converted(DEMO_DIR), tmp_path / "b", receipt_n=1, progress=messages.append)
    assert any("served from the export cache" in m for m in messages), messages
    assert read_manifest(again)["files"] == read_manifest(demo_engine)["files"]
    OnnxEngine(again)  # hashes verified
    messages.clear()
    export_engine(load_converted(DEMO_DIR), again, receipt_n=1, progress=messages.append)
    assert any("already holds this export" in m for m in messages)


def test_a_second_precision_traces_nothing(demo_engine, tmp_path):
    """demo_engine's trace kept every fp32 graph in the graph cache: int4 reuses the encoders as they are and
    quantizes the cached LLM graph, tracing nothing."""
    messages = []
    int4 = export_engine(load_converted(DEMO_DIR), tmp_path / "int4", precision="int4", receipt_n=0,
                         progress=messages.append)
    assert not any("tracing" in m for m in messages), messages
    graphs = read_manifest(int4)["graphs"]
    assert sorted(m.split(":")[0] for m in messages if "reused from the graph cache" in m) == sorted(graphs)
    fp32_files, int4_files = read_manifest(demo_engine)["files"], read_manifest(int4)["files"]
    kept = [g["file"] for g in graphs.values() if g["precision"] == "fp32"]
    assert kept and all(int4_files[f] == fp32_files[f] for f in kept)
    assert graphs["llm"]["precision"] == "int4" and int4_files["llm.onnx"] != fp32_files["llm.onnx"]


def test_a_damaged_cached_graph_is_dropped_and_traced_again(tmp_path):
    graph = tmp_path / "made" / "audio.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"graph bytes")
    _graph_to_cache("k" * 32, graph)
    copy = tmp_path / "copy" / "audio.onnx"
    copy.parent.mkdir()
    assert _graph_from_cache("k" * 32, copy) and copy.read_bytes() == b"graph bytes"
    (graph_cache_dir() / ("k" * 32) / "audio.onnx").write_bytes(b"graph bytez")
    copy.unlink()
    assert not _graph_from_cache("k" * 32, copy)
    assert not copy.exists() and not (graph_cache_dir() / ("k" * 32)).exists()


def test_a_long_step_says_it_is_still_running():
    messages = []
    with heartbeat(messages.append, "llm: tracing (fp32)", every=0.05):
        time.sleep(0.3)
    assert messages[0] == "llm: tracing (fp32)"
    assert len(messages) >= 3 and all(re.fullmatch(r"llm: tracing \(fp32\), \d+ s so far", m) for m in messages[1:])


@pytest.mark.parametrize("bits, kl_limit", [(4, 0.05), (8, 1e-3)])
def test_weight_only_bits_quantize_the_base_weights_and_keep_the_lora(demo_engine, tmp_path, bits, kl_limit):
    """int4 and the int8 row's LLM (int8w): every base projection and the LM head in MatMulNBits of ``bits``."""
    loaded = load_converted(DEMO_DIR)
    source = demo_engine / "llm.onnx"
    assert len(lora_matmuls(onnx.load(str(source)), lora_weights(loaded.model.llm))) == 4 * 7 * 3
    target = tmp_path / f"llm_{bits}bit.onnx"
    quantize_weights(source, target, bits, 32, loaded.model.llm, DEFAULT_INT4_ACCURACY)
    model = onnx.load(str(target))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 7 + 1  # every projection and the LM head
    attributes = {(a.name, a.i) for n in nbits for a in n.attribute if a.name in ("accuracy_level", "bits")}
    assert attributes == {("accuracy_level", DEFAULT_INT4_ACCURACY), ("bits", bits)}
    assert len(lora_matmuls(model, lora_weights(loaded.model.llm))) == 4 * 7 * 3  # the LoRA stays fp32 MatMuls
    # The quantized graph gives nearly the same next-token distribution on a real (text-only) prompt.
    ids = torch.tensor(loaded.tokenizer.encode_chat(get_task("ave").instruction()))
    with torch.no_grad():
        embeds = loaded.model.llm.embed(ids[None]).numpy()
    table = np.zeros((loaded.config.llm.vocab_size, loaded.config.llm.hidden_size), np.float32)

    def prefill(path: Path) -> np.ndarray:
        llm = OnnxLLM(ort.InferenceSession(str(path)), table, loaded.config)
        llm.setup_caches(1, len(ids))
        return llm(torch.from_numpy(embeds), torch.arange(len(ids)))[0][:, -1].numpy()

    ref, out = prefill(source), prefill(target)
    p, q = torch.tensor(ref).log_softmax(-1), torch.tensor(out).log_softmax(-1)
    assert float((p.exp() * (p - q)).sum()) < kl_limit
    assert ref.argmax() == out.argmax()
    # TensorRT's parser cannot read com.microsoft ops: the table offers int4 for onnx only, and a TensorRT
    # engine of the int8 row keeps its LLM fp32.
    assert any("MatMulNBits" in problem for problem in check_graph(model))
    with pytest.raises(OptionError, match="not offered for --format tensorrt"):
        check_export_options("tensorrt", "int4")
    assert _without_weight_only(PRECISIONS["int8"]).components["llm"] == "fp32"


def test_export_options_are_checked():
    with pytest.raises(OptionError, match="--precision 'int2'"):
        check_export_options("onnx", "int2")
    with pytest.raises(OptionError, match="--block-size 48: expected one of 32, 64, 128"):
        check_export_options("onnx", "int4", 48)
    with pytest.raises(OptionError, match="--format 'tflite'"):
        check_export_options("tflite", "fp32")
    with pytest.raises(OptionError, match=r"--accuracy-level 5: expected one of 1 \(fp32\), 2 \(fp16\), 3 \(bf16\), 4"):
        check_export_options("onnx", "int4", 32, 5)


def test_tensorrt_export_fails_fast_without_tensorrt(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed")
    with pytest.raises(OptionError, match="tensorrt"):
        export_engine(load_converted(DEMO_DIR), tmp_path / "trt", fmt="tensorrt", precision="fp16")
    assert not (tmp_path / "trt").exists()


def test_readme_precision_table_is_the_code_table():
    from edgeav.engines.manifest import precision_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert precision_table(PRECISIONS) in readme


@pytest.mark.slow  # 40 s: two more quantized exports of the visual and mask graphs
def test_int8_and_fp16_graphs_parse_in_tensorrt_and_stay_close(demo_engine, tmp_path):
    from edgeav.export.trace import Float16IO, export_graph
    from edgeav.systems.crab.export import MASK, MaskGraph, calibration_inputs, quantize_int8
    from edgeav.systems.crab.export import examples as _examples

    loaded = load_converted(DEMO_DIR)
    int8 = tmp_path / "mask_int8.onnx"
    quantize_int8(demo_engine / "mask_avs.onnx", int8, "mask_avs", loaded)
    model = onnx.load(str(int8))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) > 10
    assert check_graph(model) == []
    fp16 = tmp_path / "mask_fp16.onnx"
    export_graph(Float16IO(MaskGraph(loaded.variant("avs").seg)), MASK, _examples(loaded)["mask"], fp16)
    assert check_graph(fp16) == []
    feeds = calibration_inputs(loaded, "mask_avs", 1)[0]
    (ref,) = ort.InferenceSession(str(demo_engine / "mask_avs.onnx")).run(None, feeds)
    for path in (int8, fp16):
        (out,) = ort.InferenceSession(str(path)).run(None, feeds)
        agree = ((out > 0) == (ref > 0)).mean()
        assert agree > 0.97, (path.name, agree)


# -- what an engine reads: listed, inside its directory, hashed ------------------------------------


def _tampered(demo_engine, folder, change) -> Path:
    """A copy of the demo engine whose manifest ``change(manifest, folder)`` edited (files may be added too)."""
    shutil.copytree(demo_engine, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest, folder)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def _unlisted_graph(manifest, folder):
    shutil.copy(folder / "visual.onnx", folder / "visual_b.onnx")
    manifest["graphs"]["visual"]["file"] = "visual_b.onnx"


def _unlisted_tokenizer(manifest, folder):
    shutil.copy(folder / manifest["tokenizer"], folder / "other.model")
    manifest["tokenizer"] = "other.model"


def _unlisted_tokenizer_config(manifest, folder):
    shutil.copy(folder / manifest["tokenizer_config"], folder / "other.json")
    manifest["tokenizer_config"] = "other.json"


def _unlisted_table(manifest, folder):
    shutil.copy(folder / manifest["variants"]["joint"]["embed"], folder / "embed_b.npy")
    manifest["variants"]["joint"]["embed"] = "embed_b.npy"


def _graph_up_a_level(manifest, folder):
    shutil.copy(folder / "visual.onnx", folder.parent / "outside.onnx")
    manifest["graphs"]["visual"]["file"] = "../outside.onnx"


def _graph_up_a_level_and_listed(manifest, folder):
    _graph_up_a_level(manifest, folder)
    manifest["files"]["../outside.onnx"] = manifest["files"]["visual.onnx"]


def _graph_at_an_absolute_path(manifest, folder):
    shutil.copy(folder / "visual.onnx", folder.parent / "outside.onnx")
    absolute = str((folder.parent / "outside.onnx").resolve())
    manifest["graphs"]["visual"]["file"] = absolute
    manifest["files"][absolute] = manifest["files"]["visual.onnx"]


def _graph_linked_from_outside(manifest, folder):
    outside = folder.parent / "outside.onnx"
    shutil.copy(folder / "visual.onnx", outside)
    (folder / "visual.onnx").unlink()
    (folder / "visual.onnx").symlink_to(outside.resolve())


def _external_data(location):
    def change(manifest, folder):
        graph = onnx.load(str(folder / "audio.onnx"))
        target = folder / "audio_moved.onnx"
        onnx.save_model(graph, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin")
        if location != "weights.bin":  # point the tensors elsewhere, as a hand-edited graph could
            moved = onnx.load(str(target), load_external_data=False)
            for tensor in moved.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = location
            onnx.save_model(moved, str(target))
            shutil.copy(folder / "weights.bin", folder.parent / "weights.bin")
        os.replace(target, folder / "audio.onnx")
        manifest["files"]["audio.onnx"] = sha256_file(folder / "audio.onnx")  # the graph itself verifies
    return change


@pytest.mark.parametrize("change, needle", [
    (_unlisted_graph, "graphs.visual.file 'visual_b.onnx' is not listed in files"),
    (_unlisted_tokenizer, "tokenizer 'other.model' is not listed in files"),
    (_unlisted_tokenizer_config, "tokenizer_config 'other.json' is not listed in files"),
    (_unlisted_table, "variants.joint.embed 'embed_b.npy' is not listed in files"),
    (_graph_up_a_level, "graphs.visual.file '../outside.onnx' is not a file name inside the engine directory"),
    (_graph_up_a_level_and_listed, "files entry '../outside.onnx' is not a file name inside the engine directory"),
    (_graph_at_an_absolute_path, "is not a file name inside the engine directory"),
    (_graph_linked_from_outside, "outside the engine directory"),
    (_external_data("weights.bin"), "reads external data 'weights.bin', which manifest.json does not list"),
    (_external_data("../weights.bin"), "reads external data '../weights.bin'"),
], ids=["unlisted-graph", "unlisted-tokenizer", "unlisted-tokenizer-config", "unlisted-table", "dotdot", "dotdot-listed", "absolute", "symlink",
        "external-data", "external-data-dotdot"])
def test_every_file_an_engine_reads_is_listed_inside_and_hashed(demo_engine, tmp_path, change, needle):
    """Each way around the hash check is refused in one line before anything is loaded."""
    folder = _tampered(demo_engine, tmp_path / "engine", change)
    with pytest.raises(CheckpointError, match=re.escape(needle)) as refused:
        OnnxEngine(folder)
    assert "\n" not in str(refused.value) and "export the engine again" in str(refused.value)


def _set_config(section, key, value):
    return lambda manifest, folder: manifest["config"][section].update({key: value})


@pytest.mark.parametrize("change, needle", [
    (_set_config("llm", "num_layers", 5), "it needs a 'past_key_4' input or output the graph lacks"),
    (_set_config("llm", "num_layers", 3), "the graph has a 'past_key_3' input or output the config does not give"),
    (_set_config("llm", "num_kv_heads", 2), "past_key_0 is [1, 4, ?, 32], the config needs [1, 2, ?, 32]"),
    (_set_config("llm", "hidden_size", 256), "visual_tokens is [?, 8, 128], the config needs [?, ?, 256]"),
    (_set_config("llm", "base_vocab_size", 500), "logits is [1, 529], the config needs [1, 517]"),
    (_set_config("vision", "hidden_size", 64), "mask_low is [?, 96, 8, 8], the config needs [?, 64, 8, 8]"),
    (_set_config("seg", "out_res", 112), "mask_logits is [1, 1, 224, 224], the config needs [1, ?, 112, 112]"),
], ids=["more-layers", "fewer-layers", "kv-heads", "hidden", "vocab", "vision-width", "mask-size"])
def test_manifest_config_that_disagrees_with_the_graphs_is_refused_at_load(demo_engine, tmp_path, change, needle):
    """The manifest is not hashed: an edited config is caught against the graphs' declared shapes, in one
    line, before ONNX Runtime runs anything (it used to fail mid-run with an invalid-dimensions traceback)."""
    folder = _tampered(demo_engine, tmp_path / "engine", change)
    with pytest.raises(CheckpointError, match=re.escape(needle)) as refused:
        OnnxEngine(folder)
    message = str(refused.value)
    assert "\n" not in message and "the manifest's config does not match its graphs" in message
    assert message.endswith("export the engine again")


def test_embedding_table_of_another_shape_is_refused_at_load(demo_engine, tmp_path):
    def swap_table(manifest, folder):
        np.save(folder / "embed_joint.npy", np.zeros((529, 64), np.float32))
        manifest["files"]["embed_joint.npy"] = sha256_file(folder / "embed_joint.npy")
    folder = _tampered(demo_engine, tmp_path / "engine", swap_table)
    with pytest.raises(CheckpointError, match=re.escape("embedding table [529, 64], the config needs [529, 128]")):
        verify_files(folder, read_manifest(folder))


def test_listed_external_data_inside_the_engine_loads(demo_engine, tmp_path):
    """The same external-data layout, listed and hashed, is accepted and runs (so the refusals above are
    about the listing, not the layout)."""
    def listed(manifest, folder):
        _external_data("weights.bin")(manifest, folder)
        manifest["files"]["weights.bin"] = sha256_file(folder / "weights.bin")
    engine = OnnxEngine(_tampered(demo_engine, tmp_path / "engine", listed))
    tokens = engine.variant("joint").encode_audio(torch.zeros(1, 98, 128))
    assert tokens.shape[0] == 1 and torch.isfinite(tokens).all()


def _set(path: str, value):
    def change(manifest, folder):
        *parents, key = path.split(".")
        target = manifest
        for parent in parents:
            target = target[parent]
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value
    return change


_DELETE = object()
MALFORMED = [
    (_set("graphs", _DELETE), "graphs is missing"),
    (_set("graphs", []), "graphs must be an object, not list"),
    (_set("graphs.visual", "visual.onnx"), "graphs.visual must be an object, not str"),
    (_set("graphs.visual.component", "vision"), "graphs.visual.component 'vision' is not one of"),
    (_set("variants.joint", _DELETE), "variants has no joint entry"),
    (_set("variants.joint.llm", "nope"), "variants.joint.llm 'nope' names no llm graph in graphs"),
    (_set("tokenizer", None), "tokenizer must be a string, not null"),
    (_set("tokenizer_config", 5), "tokenizer_config must be a string, not int"),
    (lambda manifest, folder: manifest["files"].update({"visual.onnx": 5}), "files.visual.onnx must be a SHA-256"),
    (_set("format_version", "1"), "engine format version '1'"),
    (_set("format_version", True), "engine format version True"),
    (_set("precision", "int3"), "precision 'int3' is not one of"),
    (_set("backend", "tflite"), "backend 'tflite' is not one of"),
    (_set("components.llm", "int4"), "components"),
    (_set("config.vision", _DELETE), "config.vision is missing"),
    (_set("config.llm.hidden_size", "128"), "config.llm.hidden_size must be a whole number >= 0, not str"),
    (_set("config.llm.num_layers", -1), "config.llm.num_layers must be a whole number >= 0"),
    (_set("config.vision.mask_layers", [1]), "config.vision.mask_layers must be a list of 2"),
    (_set("config.llm.colour", 3), "config.llm.colour is not a model config field"),
    (_set("receipt.logits", []), "receipt.logits must be an object, not list"),
    (_set("receipt.metrics.ave.engine", {}), "receipt.metrics.ave must hold the same metrics"),
    (_set("tools", "torch"), "tools must be an object, not str"),
]


@pytest.mark.parametrize("change, needle", MALFORMED, ids=[needle.split(" ")[0] + f"-{i}" for i, (_, needle)
                                                             in enumerate(MALFORMED)])
def test_a_malformed_manifest_is_refused_in_one_line(demo_engine, tmp_path, change, needle):
    folder = _tampered(demo_engine, tmp_path / "engine", change)
    with pytest.raises(CheckpointError, match=re.escape(needle)) as refused:
        OnnxEngine(folder)
    assert "\n" not in str(refused.value)


def test_a_manifest_that_is_not_an_object_is_refused(demo_engine, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(demo_engine, folder)
    (folder / MANIFEST).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object; export the engine again"):
        OnnxEngine(folder)
    (folder / MANIFEST).write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not an edgeav engine manifest"):
        OnnxEngine(folder)


def test_editing_an_engine_in_place_leaves_the_cache_and_other_engines_intact(demo_engine, tmp_path):
    """Engines served from the export cache are copies: corrupting one breaks neither the cache nor its
    siblings (hard links shared the bytes)."""
    first = export_engine(load_converted(DEMO_DIR), tmp_path / "first", receipt_n=1)
    second = export_engine(load_converted(DEMO_DIR), tmp_path / "second", receipt_n=1)
    cached = cache_dir() / read_manifest(first)["cache_key"]
    with open(first / "llm.onnx", "r+b") as f:  # an in-place edit, as an editor or a bad disk would do
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="llm.onnx: its SHA-256 does not match"):
        OnnxEngine(first)
    for intact in (second, cached, demo_engine):
        verify_files(intact, read_manifest(intact))
    OnnxEngine(second)


# -- the tokenizer's settings: in the export cache key, listed and hashed in the engine ---------------------------


def _demo_with_tokenizer_config(folder, **settings):
    """A copy of the demo checkpoint with a tokenizer_config.json of ``settings`` beside its tokenizer.model."""
    shutil.copytree(DEMO_DIR, folder, ignore=shutil.ignore_patterns("*.mp4"))
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **settings}))
    return folder


def test_checkpoints_differing_only_in_legacy_have_different_digests(tmp_path):
    """The digest keys the export cache: a legacy=False checkpoint must never be served a legacy=True engine."""
    legacy = load_converted(_demo_with_tokenizer_config(tmp_path / "legacy", legacy=True))
    modern = load_converted(_demo_with_tokenizer_config(tmp_path / "modern", legacy=False))
    instruction = get_task("ave").instruction()
    assert legacy.tokenizer.encode_chat(instruction) != modern.tokenizer.encode_chat(instruction)
    assert checkpoint_digest(legacy) != checkpoint_digest(modern)
    # The demo has no tokenizer_config.json, which means legacy=True: the same tokenizer, the same digest.
    assert checkpoint_digest(legacy) == checkpoint_digest(load_converted(DEMO_DIR))


def test_engine_lists_and_hashes_the_tokenizer_settings(demo_engine):
    manifest = read_manifest(demo_engine)
    name = manifest["tokenizer_config"]
    assert name == TOKENIZER_CONFIG_FILE and manifest["files"][name] == sha256_file(demo_engine / name)
    assert (demo_engine / name).read_bytes() == load_converted(DEMO_DIR).tokenizer.files()[name]


def test_engine_reads_its_listed_tokenizer_settings(demo_engine, tmp_path):
    """A listed legacy=False config is used; edited after the export, it is refused."""
    def modern(manifest, folder):
        config = json.loads((folder / TOKENIZER_CONFIG_FILE).read_text())
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps({**config, "legacy": False}))
        manifest["files"][TOKENIZER_CONFIG_FILE] = sha256_file(folder / TOKENIZER_CONFIG_FILE)
    folder = _tampered(demo_engine, tmp_path / "engine", modern)
    assert OnnxEngine(folder).tokenizer.settings.legacy is False
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"legacy": True}))
    with pytest.raises(CheckpointError, match=f"{TOKENIZER_CONFIG_FILE}: its SHA-256 does not match") as refused:
        OnnxEngine(folder)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("beside", ["{not json", json.dumps({"legacy": False})])
def test_engine_without_listed_settings_never_reads_a_config_beside_its_tokenizer(demo_engine, tmp_path, beside):
    """An engine exported before the settings were kept: the defaults, whatever file lies beside the model."""
    def old_engine(manifest, folder):
        del manifest["tokenizer_config"], manifest["files"][TOKENIZER_CONFIG_FILE]
        (folder / TOKENIZER_CONFIG_FILE).write_text(beside)
    engine = OnnxEngine(_tampered(demo_engine, tmp_path / "engine", old_engine))
    assert engine.tokenizer.settings == TokenizerSettings()


def test_audio_graph_runs_every_piece_length_of_the_tensorrt_profile(demo_engine):
    """The audio graph's frame axis is dynamic: the authors' cut (78..201 fbank frames) runs as the reference does,
    and every exported graph accepts the TensorRT profile of its component."""
    from edgeav.export.tensorrt import _check_profiles
    from edgeav.systems.crab.export import SECOND_FBANK_FRAMES, audio_frame_range, profiles_for

    model = load_converted(DEMO_DIR).variant("joint")
    session = ort.InferenceSession(str(demo_engine / "audio.onnx"))
    torch.manual_seed(0)
    for frames in sorted({*audio_frame_range(), SECOND_FBANK_FRAMES}):
        fbank = torch.randn(3, frames, 128)
        (tokens,) = session.run(None, {"fbank": fbank.numpy()})
        with torch.no_grad():
            reference = model.encode_audio(fbank)
        assert np.abs(tokens - reference.numpy()).max() < 1e-4, frames
    manifest = read_manifest(demo_engine)
    config = load_converted(DEMO_DIR).config
    for entry in manifest["graphs"].values():
        path = demo_engine / entry["file"]
        _check_profiles(profiles_for(entry["component"], config), onnx.load(str(path), load_external_data=False), path)


class _Exporting(Exception):
    """Raised by a progress callback at the first graph, to stop an export that was not served from the cache."""


@pytest.mark.slow  # about a minute: one export of the demo's joint weights, and the start of a second
def test_export_keeps_legacy_false_and_never_serves_it_to_a_legacy_checkpoint(tmp_path):
    modern = load_converted(_demo_with_tokenizer_config(tmp_path / "modern", legacy=False))
    engine = OnnxEngine(export_engine(modern, tmp_path / "engine", receipt_n=0, variants=()))
    assert engine.tokenizer.settings.legacy is False
    instruction = get_task("ave").instruction()
    assert engine.tokenizer.encode_chat(instruction) == modern.tokenizer.encode_chat(instruction)

    def stop_at_the_first_graph(message):
        assert "cache" not in message and "already holds" not in message, message
        raise _Exporting(message)
    # The same options from the legacy=True demo: a cache hit would hand it the legacy=False engine.
    with pytest.raises(_Exporting, match="visual"):
        export_engine(load_converted(DEMO_DIR), tmp_path / "engine", receipt_n=0, variants=(),
                      progress=stop_at_the_first_graph)
    assert OnnxEngine(tmp_path / "engine").tokenizer.settings.legacy is False


def test_threads_are_bounded():
    with pytest.raises(OptionError, match=rf"--threads 100000: expected 1\.\.{MAX_THREADS}"):
        OnnxEngine("no-such-engine", threads=100_000)
    with pytest.raises(OptionError, match="--threads 0"):
        OnnxEngine("no-such-engine", threads=0)
