"""Crab+ export: ONNX graphs against the PyTorch reference, the engine directory, receipts, the CLI.

The module shares one fp32 export of crabplus-tiny (random weights) without a receipt: about a minute
on two CPU cores, the five graphs' dynamo exports. The exports with a receipt (every precision) and
the CLI's own export are marked slow.
"""

from __future__ import annotations

import json
import re
import shutil

import onnx
import pytest
import torch

from conftest import engine_graphs, llm_tensorrt_problems
from edgeav.engines.manifest import read_manifest, sha256_file
from edgeav.engines.manifest_schema import MANIFEST
from edgeav.errors import CheckpointError, OptionError
from edgeav.export.exporter import export_engine
from edgeav.engines.llm_io import kv_names
from edgeav.export.receipt import logit_stats
from edgeav.kernels import QuantizedILoRALinear, quantize_llm_
from edgeav.models.sam2 import sam2_config
from edgeav.preprocess.qwen_vision import patchify
from edgeav.preprocess.sam2 import sam2_pixels, sam2_prompt
from edgeav.runtime import Runtime
from edgeav.stages import StageTimer
from edgeav.systems.crabplus.checkpoints import synthesize
from edgeav.systems.crabplus.export import PRECISIONS, run_prompt
from edgeav.systems.crabplus.pipeline import build_prompt
from edgeav.systems.crabplus.inputs import decode
from edgeav.systems.crabplus.onnx_engine import OnnxCrabPlus
from edgeav.systems.crabplus.pipeline import CrabPlusPipeline
from edgeav.systems.crabplus.tasks import get_task

from test_cli import assert_user_error, cli

GRAPHS = {"audio", "vision", "llm", "sam2_encoder", "sam2_decoder"}
S4_ANSWER = "The sounding object is rect. [20,30,120,100] [50,60] [70,80] [90,70]"


@pytest.fixture(scope="module")
def tiny():
    return synthesize("crabplus-tiny", seed=1)


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    """crabplus-tiny exported to fp32 ONNX (no receipt: the tests below compare what it would)."""
    return export_engine(tiny, tmp_path_factory.mktemp("engines") / "crabplus-fp32", receipt_n=0)


def test_fp32_engine_runs_ave_as_the_torch_pipeline_does(tiny, engine, demo_clip):
    reference = Runtime(tiny).run(demo_clip, "ave", max_new_tokens=12)
    exported = Runtime.from_engine(engine).run(demo_clip, "ave", max_new_tokens=12)
    assert exported.text == reference.text and len(tiny.tokenizer.encode(reference.text)) > 3
    assert "onnx engine" in exported.model and exported.task == "ave"
    # the next-token logits of the engine, teacher-forced on the reference's answer to the same clip
    spec, inputs = get_task("ave"), decode(demo_clip, video_frames=10)
    onnx_crabplus = OnnxCrabPlus(engine)
    steps = {}
    with torch.inference_mode():
        answer = run_prompt(tiny.model, tiny.config, *build_prompt(tiny.model, tiny.config, tiny.tokenizer, spec,
                                                                    inputs), max_new_tokens=12,
                            logits_out=steps.setdefault("reference", []))
        run_prompt(onnx_crabplus.model, tiny.config, *build_prompt(onnx_crabplus.model, tiny.config,
                                                                   onnx_crabplus.tokenizer, spec, inputs),
                   forced=answer.token_ids, logits_out=steps.setdefault("engine", []))
    stats = logit_stats([torch.stack(steps["reference"])], [torch.stack(steps["engine"])])
    assert stats["steps"] == 12 and stats["max_abs_logit_diff"] <= 1e-4 and stats["top1_agreement"] == 1.0


def test_fp32_graphs_match_the_reference(tiny, engine):
    model, exported = tiny.model, OnnxCrabPlus(engine).model
    config = tiny.config
    generator = torch.Generator().manual_seed(0)
    pairs = []
    with torch.inference_mode():
        # every task's audio cut (1, 4, 5, 10, 20 s), and lengths that end in a short chunk of 1 or 137 frames
        for frames in (100, 400, 500, 1000, 2000, 201, 737):
            mel = torch.randn(128, frames, generator=generator)
            pairs.append((f"audio {frames}", model.encode_audio(mel), exported.encode_audio(mel)))
        # an image (1 slice), videos of 4 and 10 frames (2 and 5 slices)
        for count in (1, 4, 10):
            frames = torch.randint(0, 256, (count, 224, 224, 3), generator=generator, dtype=torch.uint8).numpy()
            patches, grid = patchify(frames)
            patches = torch.from_numpy(patches)
            pairs.append((f"vision {count}", model.encode_vision(patches, grid), exported.encode_vision(patches, grid)))
        embeds = torch.randn(1, 9, config.llm.hidden_size, generator=generator)
        positions = torch.tensor([[0, 1, 2, 3, 3, 3, 53, 53, 54], [0, 1, 2, 3, 4, 4, 3, 4, 55],
                                  [0, 1, 2, 3, 3, 4, 3, 4, 56]])
        step = torch.randn(1, 1, config.llm.hidden_size, generator=generator)
        for llm in (model.llm, exported.llm):
            llm.setup_caches(1, 64)
        for name, args in (("prefill", (embeds, torch.arange(9), 9)), ("decode", (step, torch.tensor([9]), 10))):
            kwargs = {"positions": positions if name == "prefill" else torch.tensor([[57], [57], [57]])}
            want, got = model.llm(*args, **kwargs), exported.llm(*args, **kwargs)
            pairs += [(f"llm {name} logits", want[0][:, -1:], got[0]), (f"llm {name} hidden", want[1][:, -1:], got[1])]
        size = sam2_config(config.sam2).image_size
        picture = torch.randint(0, 256, (61, 83, 3), generator=generator, dtype=torch.uint8).numpy()
        pixels = sam2_pixels(picture, resolution=size)
        features = model.sam2.image_features(pixels)
        pairs += [(f"sam2 {name}", want, got) for name, want, got in
                  zip(features._fields, features, exported.sam2.image_features(pixels))]
        for box, points in (([20, 30, 120, 100], [(50, 60), (70, 80), (90, 70)]), (None, [(50, 60)])):
            prompt = sam2_prompt(box, points, space=224, resolution=size)
            pairs += [(f"sam2 predict {len(points)}", want, got) for want, got in
                      zip(model.sam2.predict(features, *prompt), exported.sam2.predict(features, *prompt))]
    for name, want, got in pairs:
        assert want.shape == got.shape, name
        assert (want - got).abs().max() <= 1e-4, name


def test_fp32_sam2_draws_the_references_mask_on_a_fixed_prompt(tiny, engine, demo_clip):
    spec = get_task("s4")
    inputs = decode(demo_clip, video_frames=None, at_fraction=2 / 5)
    reference = CrabPlusPipeline(tiny).read(spec, inputs, S4_ANSWER, StageTimer()).masks[0].mask
    exported = CrabPlusPipeline(OnnxCrabPlus(engine)).read(spec, inputs, S4_ANSWER, StageTimer()).masks[0].mask
    assert reference.shape == (240, 320) and reference.any() and not reference.all()  # a mask worth comparing
    assert (reference & exported).sum() / (reference | exported).sum() == 1.0


def _input_axes(folder) -> dict[str, dict[str, list[str]]]:
    manifest = read_manifest(folder)
    graphs = {name: onnx.load(str(folder / entry["file"])) for name, entry in manifest["graphs"].items()}
    return {name: {value.name: [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
                   for value in graph.graph.input} for name, graph in graphs.items()}


def test_manifest_names_the_system_its_graphs_and_their_axes(engine):
    manifest = read_manifest(engine)
    assert manifest["system"] == "crabplus" and manifest["precision"] == "fp32"
    assert manifest["components"] == PRECISIONS["fp32"].components and set(manifest["graphs"]) == GRAPHS
    assert _input_axes(engine) == {
        "audio": {"mel": ["frames"]}, "vision": {"patches": []},
        "llm": {"inputs_embeds": ["tokens"], "past_length": [], "positions": ["tokens"],
                **{name: ["capacity"] for name in kv_names(manifest["config"]["llm"]["num_layers"])[0]}},
        "sam2_encoder": {"pixels": []},
        "sam2_decoder": {"image_embed": [], "feat_s0": [], "feat_s1": [], "points": ["points"], "labels": ["points"]}}
    for key in ("embed", "tokenizer", "tokenizer_config"):
        assert manifest[key] in manifest["files"], key
    assert manifest["tokenizer"] == "tokenizer.json"


def test_every_fp32_graph_but_the_fused_llm_parses_in_tensorrt(engine):
    assert llm_tensorrt_problems(engine_graphs(engine)) == []


def test_info_prints_the_engine(engine, capsys):
    r = cli(capsys, "info", engine)
    assert r.rc == 0, r.err
    assert "system     crabplus" in r.out and "hashes match" in r.out and "no fidelity receipt" in r.out
    for graph in GRAPHS:
        assert f"\n{graph} " in r.out


@pytest.mark.parametrize("change, needle", [
    (lambda m: m["config"]["llm"].update(num_kv_heads=1), "past_key_0 is [1, 2, ?, 16], the config needs "
                                                          "[1, 1, ?, 16]"),
    (lambda m: m["config"].update(sam2="sam2.1_hiera_tiny"), "pixels is [1, 3, 256, 256], the config needs "
                                                             "[1, 3, 1024, 1024]"),
    (lambda m: m["config"]["audio"].update(output_dim=32), "audio_tokens is [?, 64], the config needs [?, 32]"),
    (lambda m: m.update(embed="other.npy"), "embed 'other.npy' is not listed in files"),
    (lambda m: m.update(tokenizer="vocab.json"), "tokenizer 'vocab.json' is not listed in files"),
    (lambda m: m["graphs"].pop("sam2_decoder"), "graphs has no sam2_decoder graph"),
    (lambda m: m.update(receipt={"clips": 1}), "receipt.tasks is missing"),
], ids=["layers", "sam2-preset", "audio-width", "embed", "tokenizer", "decoder", "receipt"])
def test_an_edited_manifest_is_refused_in_one_line(engine, tmp_path, change, needle):
    folder = tmp_path / "engine"
    shutil.copytree(engine, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=re.escape(needle)) as refused:
        OnnxCrabPlus(folder)
    assert "\n" not in str(refused.value)


def test_an_engine_holding_vocab_and_merges_reads_the_same_tokenizer(tiny, engine, tmp_path):
    """Qwen's tokenizer may come as vocab.json + merges.txt: the manifest then lists both."""
    folder = tmp_path / "engine"
    shutil.copytree(engine, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    bpe = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (folder / "merges.txt").write_text("".join(" ".join(pair) + "\n" for pair in bpe["merges"]))
    (folder / "tokenizer.json").unlink()
    del manifest["files"]["tokenizer.json"]
    for name in ("vocab.json", "merges.txt"):
        manifest["files"][name] = sha256_file(folder / name)
    manifest["tokenizer"] = "vocab.json"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="tokenizer_merges is missing"):
        OnnxCrabPlus(folder)
    manifest["tokenizer_merges"] = "merges.txt"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    text = "The answer is yes. <|im_end|>"
    assert OnnxCrabPlus(folder).tokenizer.encode(text) == tiny.tokenizer.encode(text)


def test_the_engine_refuses_frames_its_vit_was_not_exported_for(engine):
    exported = OnnxCrabPlus(engine).model
    with pytest.raises(OptionError, match=r"grid \(1, 32, 32\) is not of 224x224 frames"):
        exported.encode_vision(torch.zeros(1024, 1176), (1, 32, 32))
    with pytest.raises(OptionError, match="too few for one token"):
        exported.encode_audio(torch.zeros(128, 2))


def test_options_crabplus_does_not_take_are_refused_before_exporting(tiny, tmp_path, capsys):
    with pytest.raises(OptionError, match="keep the I-LoRA routed"):
        export_engine(tiny, tmp_path / "e", merge_lora=True)
    with pytest.raises(OptionError, match="one set of weights"):
        export_engine(tiny, tmp_path / "e", variants=("avs",))
    assert_user_error(cli(capsys, "export", "crabplus-tiny", "-o", tmp_path / "e", "--merge-lora"), "--merge-lora",
                      "routed")
    assert not (tmp_path / "e").exists()


def test_weight_only_int4_keeps_qwens_projection_biases():
    loaded = synthesize("crabplus-tiny", seed=2)
    llm = loaded.model.llm
    with torch.no_grad():
        for layer in llm.model.layers:  # biases that matter, so dropping one would show
            for name in ("q_proj", "k_proj", "v_proj"):
                torch.nn.init.normal_(getattr(layer.self_attn, name).bias, std=0.5)
    embeds = torch.randn(1, 7, loaded.config.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = llm(embeds, torch.arange(7))[1]
        biases = [layer.self_attn.q_proj.bias for layer in llm.model.layers]
        quantize_llm_(llm, "int4", 32)
        got = llm(embeds, torch.arange(7))[1]
    q_proj = llm.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedILoRALinear) and q_proj.bias is biases[0]
    assert llm.model.layers[0].self_attn.o_proj.bias is None
    assert (want - got).abs().max() < 0.05 * want.abs().max()


@pytest.mark.slow  # about two minutes each: a whole export with its calibration and a one-clip receipt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_exports_carry_a_receipt_run_and_load(tiny, demo_clip, tmp_path, precision, capsys):
    folder = export_engine(tiny, tmp_path / precision, precision=precision, receipt_n=1)
    manifest = read_manifest(folder)
    assert manifest["components"] == PRECISIONS[precision].components
    receipt = manifest["receipt"]
    logits = receipt["logits"]
    assert receipt["clips"] == 1 and receipt["tasks"] == ["ave", "emotion", "s4"]
    assert logits["steps"] == 3 * receipt["max_new_tokens"]  # random weights never write <|im_end|>
    assert receipt["reference_entropy_ratio"] > 0.99  # random weights: near-flat next-token distributions
    graphs = {name: onnx.load(str(folder / entry["file"])) for name, entry in manifest["graphs"].items()}
    ops = {name: {node.op_type for node in graph.graph.node} for name, graph in graphs.items()}
    # near-flat logits part greedy texts at near-ties, so below fp32 the KL and the logit error are checked
    if precision == "fp32":
        assert logits["max_abs_logit_diff"] <= 1e-4 and logits["top1_agreement"] == 1.0
        assert receipt["greedy_text_agreement"] == 1.0 and receipt["mask_iou_vs_reference"] == 1.0
        r = cli(capsys, "info", folder)
        assert r.rc == 0, r.err
        assert "1 generated clip x 3 tasks (ave, emotion, s4)" in r.out and "identical in 100% of runs" in r.out
        assert "IoU 1.000" in r.out and "near-flat logits" in r.out
    if precision == "fp16":
        assert logits["max_abs_logit_diff"] < 1e-2 and logits["kl_mean"] < 1e-6
        assert receipt["mask_iou_vs_reference"] > 0.9 and all("Cast" in found for found in ops.values())
    if precision == "int8":
        assert all("DequantizeLinear" in ops[name] for name in GRAPHS - {"llm"})
        assert "DequantizeLinear" not in ops["llm"] and logits["kl_mean"] < 1e-3
        assert receipt["mask_iou_vs_reference"] is not None
    llm_problems = llm_tensorrt_problems(graphs)
    if precision in ("int8", "int4"):  # the LLM's weights in 8 or 4 bits
        nbits = [node for node in graphs["llm"].graph.node if node.op_type == "MatMulNBits"]
        assert len(nbits) == 7 * tiny.config.llm.num_layers + 1  # every projection and the LM head, not the LoRA
        assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"} == {
            8 if precision == "int8" else 4}
        assert logits["kl_mean"] < 1e-3 and logits["max_abs_logit_diff"] < 1.0
        assert any("MatMulNBits" in problem for problem in llm_problems)
    result = Runtime.from_engine(folder).run(demo_clip, "ave", max_new_tokens=4)
    assert result.text and precision in result.model


@pytest.mark.slow  # an export of crabplus-tiny by the CLI, about two minutes
def test_cli_exports_a_preset_and_runs_s4_with_the_engine(tmp_path, demo_clip, capsys):
    r = cli(capsys, "export", "crabplus-tiny", "-o", tmp_path / "engine", "--receipt-n", "0")
    assert r.rc == 0, r.err
    r = cli(capsys, "run", demo_clip, "--engine", tmp_path / "engine", "--task", "s4", "--at", "2",
            "--max-new-tokens", "4", "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    reference = Runtime.from_preset("crabplus-tiny", random_weights=True).run(demo_clip, "s4", at_seconds=[2],
                                                                              max_new_tokens=4)
    assert result["text"] == reference.text and result["task"] == "s4" and "onnx engine" in result["model"]
