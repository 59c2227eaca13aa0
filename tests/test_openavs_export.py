"""OpenAVS export: the engine (Pengi's graphs and GPT-2, GroundingDINO, SAM, BEATs, the Qwen2.5-Omni thinker
and SAM2) against the PyTorch reference, its receipt, manifest and refusals, and runs of the lite, edge and
default variants and of SAM2 through the CLI.

One fp32 export of openavs-tiny (with a two-clip receipt) is shared by the module; it takes minutes on two
cores (GroundingDINO's dynamic picture size makes its export slow), so every test that needs it is marked
slow. An engine without the thinker and SAM2 is that export's copy with its manifest as an export of a
checkpoint without them writes it (the parts' graphs, keys and config fields gone), not a second export.
The fast test drives the reference's beam search through an exported GPT-2 alone.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from edgeav.engines.manifest import read_manifest
from edgeav.errors import CheckpointError, OptionError
from edgeav.export.exporter import export_engine
from edgeav.export.trace import export_graph
from edgeav.media import synth
from edgeav.models.pengi import beam_search
from edgeav.runtime import Runtime
from edgeav.systems.openavs.checkpoints import synthesize
from edgeav.systems.openavs.export import PRECISIONS, TRANSLATOR_PROMPTS, teacher_forced_logits
from edgeav.systems.openavs.export_graphs import GPT2, GPT2Graph, gpt2_kv_shape
from edgeav.systems.openavs.checkpoints import TOKENIZER_CONFIG, TOKENIZER_FILES
from edgeav.systems.openavs.onnx_engine import OnnxGPT2, OnnxOpenAVS
from edgeav.systems.openavs.translator import prompt_hashes

from test_cli import cli

GRAPHS = {"pengi_audio", "pengi_prompt", "pengi_prefix", "gpt2", "grounding", "sam_encoder", "sam_decoder", "beats",
          "thinker_audio", "thinker_vision", "thinker_llm", "sam2_encoder", "sam2_decoder"}
THINKER_GRAPHS = {"thinker_audio", "thinker_vision", "thinker_llm"}


@pytest.fixture(scope="module")
def loaded():
    return synthesize("openavs-tiny", seed=7)


@pytest.fixture(scope="module")
def engine(loaded, tmp_path_factory):
    """openavs-tiny (random weights) exported to fp32 ONNX with a receipt over two generated clips."""
    return export_engine(loaded, tmp_path_factory.mktemp("engines") / "openavs-fp32", receipt_n=2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 2-s clip with sound, 160x120."""
    path = tmp_path_factory.mktemp("clips") / "avs.mp4"
    synth.write_clip(path, duration_s=2.0, width=160, height=120)
    return path


def test_the_reference_beam_search_runs_through_the_exported_gpt2(loaded, tmp_path):
    gpt = loaded.model.pengi.caption_decoder.gpt
    pengi = loaded.model.pengi.config
    example = (torch.randn(3, 2, pengi.gpt2.n_embd), torch.zeros(gpt2_kv_shape(pengi, 5, 3)))
    path = tmp_path / "gpt2.onnx"
    with torch.no_grad():
        export_graph(GPT2Graph(gpt), GPT2, example, path)
    table = gpt.transformer.wte.weight.detach().numpy()
    exported = OnnxGPT2(ort.InferenceSession(str(path)), table, pengi.gpt2)
    torch.manual_seed(0)
    prefix = torch.randn(1, 2 * pengi.prefix_length, pengi.gpt2.n_embd)
    with torch.inference_mode():
        want = beam_search(gpt, prefix, stop_token_id=pengi.stop_token_id, beam_size=3, max_len=12)
        got = beam_search(exported, prefix, stop_token_id=pengi.stop_token_id, beam_size=3, max_len=12)
        caption = list(want[0].ids)
        forced = (teacher_forced_logits(loaded.model.pengi, prefix, caption),
                  teacher_forced_logits(_EnginePengi(exported, loaded.model.pengi.config), prefix, caption))
    assert [beam.ids for beam in got] == [beam.ids for beam in want] and len(want[0].ids) > 3
    assert np.allclose([beam.score for beam in got], [beam.score for beam in want], atol=1e-5)
    assert forced[0].shape == (len(caption), pengi.gpt2.vocab_size)
    assert (forced[0] - forced[1]).abs().max() <= 1e-4
    assert len({beam.ids for beam in want}) == 3  # the beams differ, so reordering the cache rows mattered


class _EnginePengi:
    """An engine-side Pengi with only its GPT-2 (what teacher forcing reads)."""

    def __init__(self, gpt, config) -> None:
        self.gpt, self.config = gpt, config


def test_options_openavs_does_not_take_are_refused_before_exporting(loaded, tmp_path):
    with pytest.raises(OptionError, match="no LoRA to merge"):
        export_engine(loaded, tmp_path / "e", merge_lora=True)
    with pytest.raises(OptionError, match="one set of weights"):
        export_engine(loaded, tmp_path / "e", variants=("lite",))
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_fp32_receipt_matches_the_reference(engine):
    receipt = read_manifest(engine)["receipt"]
    pengi = receipt["pengi"]
    assert receipt["clips"] == 2 and len(pengi["prompts"]) == 3
    assert pengi["logits"]["max_abs_logit_diff"] <= 1e-4 and pengi["logits"]["top1_agreement"] == 1.0
    assert pengi["logits"]["steps"] >= 2 * 3 * 2 and pengi["beam_text_agreement"] == 1.0
    grounding = receipt["grounding"]
    assert grounding["precision"] == "fp32"
    assert grounding["max_abs_logit_diff"] <= 1e-4 and grounding["max_abs_box_diff"] <= 1e-4
    assert receipt["sam"]["boxes"] == 4 and receipt["sam"]["mask_iou_per_box"] == [1.0] * 4
    assert receipt["beats"]["max_abs_probability_diff"] <= 1e-4
    thinker = receipt["thinker"]
    assert thinker["prompts"] == ["Please describe the image in detail", "Please describe the audio in detail"]
    assert thinker["logits"]["max_abs_logit_diff"] <= 1e-4 and thinker["logits"]["top1_agreement"] == 1.0
    assert thinker["logits"]["steps"] >= 2 * 2 and thinker["greedy_text_agreement"] == 1.0
    assert receipt["sam2"]["boxes"] == 4 and receipt["sam2"]["mask_iou_per_box"] == [1.0] * 4


@pytest.mark.slow
def test_manifest_lists_graphs_tokenizers_and_translator_prompts(engine):
    manifest = read_manifest(engine)
    assert manifest["system"] == "openavs" and set(manifest["graphs"]) == GRAPHS
    assert manifest["components"] == PRECISIONS["fp32"].components
    assert manifest[TRANSLATOR_PROMPTS] == prompt_hashes() and len(prompt_hashes()) == 5
    names = json.loads((engine / manifest["tokenizer_config"]).read_text())
    assert names == {kind: list(files) for kind, files in TOKENIZER_FILES.items()}
    for name in (TOKENIZER_CONFIG, manifest["embed"], *(f for files in TOKENIZER_FILES.values() for f in files)):
        assert name in manifest["files"], name
    assert manifest["thinker_embed"] == "thinker_embed.npy" and manifest["qwen_tokenizer"] == "qwen_tokenizer.json"
    for key in ("thinker_embed", "qwen_tokenizer", "qwen_tokenizer_config"):
        assert manifest[key] in manifest["files"], key
    inputs = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in onnx.load(str(engine / "gpt2.onnx")).graph.input}
    assert inputs["past_kv"][0] == "past" and inputs["past_kv"][3] == "beams" and inputs["inputs_embeds"][:2] == [
        "beams", "tokens"]


def _masks(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) > 0 for path in sorted(folder.glob("mask_*.png"))]


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"variant": "lite"}, {"variant": "edge"},
                                     {"variant": "default", "translator": "local"},
                                     {"variant": "lite", "segmenter": "sam2"}], ids=["lite", "edge", "default", "sam2"])
def test_cli_run_with_the_engine_gives_the_references_masks(loaded, engine, clip, tmp_path, capsys, options):
    reference = Runtime(loaded).run(clip, **options)
    reference.save_masks(tmp_path / "reference")
    flags = [item for key, value in options.items() for item in (f"--{key}", value)]
    r = cli(capsys, "run", clip, "--engine", engine, *flags, "--out", tmp_path / "engine", "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert "onnx engine" in result["model"] and [m["time_s"] for m in result["masks"]] == [0.0, 1.0]
    assert [m["text"] for m in result["masks"]] == [m.text for m in reference.masks]
    assert result["text"] == reference.text  # the local translator's replies (the thinker's greedy text)
    if options["variant"] == "default":
        images = [d.text for d in reference.descriptions if d.describer == "thinker: image"]
        assert len(images) == 2 and all(images) and reference.text
    if "segmenter" in options:  # masks worth comparing: the random detector's boxes cover most of the frame
        assert all(m.mask.any() for m in reference.masks)
    assert [(d["describer"], d["text"]) for d in result["descriptions"]] == [
        (d.describer, d.text) for d in reference.descriptions]
    assert len(result["detections"]) == len(reference.detections)
    for got, want in zip(result["detections"], reference.detections):
        assert got["box"] == pytest.approx(list(want.box), abs=6e-3)  # JSON rounds to 0.01
    expected, masks = _masks(tmp_path / "reference"), _masks(tmp_path / "engine")
    assert len(masks) == len(expected) == 2
    for mask, want in zip(masks, expected):
        union = (mask | want).sum()
        assert union == 0 or (mask & want).sum() / union == 1.0


def _without_thinker_and_sam2(engine, folder):
    """A copy of ``engine`` as an export of the same checkpoint without the thinker and SAM2 would be."""
    shutil.copytree(engine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config"].update(thinker=None, sam2=None)
    files = [manifest["graphs"].pop(name)["file"] for name in (*THINKER_GRAPHS, "sam2_encoder", "sam2_decoder")]
    files += [manifest.pop(key) for key in ("thinker_embed", "qwen_tokenizer", "qwen_tokenizer_config")]
    for name in files:
        (folder / name).unlink()
        del manifest["files"][name]
    del manifest["receipt"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (("--variant", "default", "--translator", "local"),
     "holds no Qwen2.5-Omni thinker (qwen2.5-omni/), which --variant default --translator local --segmenter sam "
     "needs; export a checkpoint that has it"),
    (("--translator", "local"), "holds no Qwen2.5-Omni thinker"),
    (("--segmenter", "sam2"), "holds no SAM2.1"),
], ids=["default", "local", "sam2"])
def test_an_engine_without_a_part_refuses_what_needs_it_in_one_line(engine, clip, tmp_path, args, needle):
    runtime = Runtime.from_engine(_without_thinker_and_sam2(engine, tmp_path / "engine"))
    assert runtime.engine.model.thinker is None and runtime.engine.model.sam2 is None
    assert runtime.engine.qwen_tokenizer is None
    with pytest.raises(OptionError, match=re.escape(needle)) as refused:
        runtime.run(clip, **{key.lstrip("-"): value for key, value in zip(args[::2], args[1::2])})
    assert "\n" not in str(refused.value) and "run such a checkpoint (--checkpoint)" in str(refused.value)
    assert len(runtime.run(clip, variant="lite").masks) == 2  # what it holds still runs


@pytest.mark.slow
def test_the_engine_holds_the_references_thinker_tokenizer_and_sam2(loaded, engine):
    exported = OnnxOpenAVS(engine)
    text = "The answer is yes. <|im_end|>"
    assert exported.qwen_tokenizer.encode(text) == loaded.qwen_tokenizer.encode(text)
    assert exported.model.sam2.config == loaded.model.sam2.config
    assert exported.model.thinker.shapes == loaded.config.thinker


@pytest.mark.slow
@pytest.mark.parametrize("change, needle", [
    (lambda m: m["graphs"].pop("sam2_decoder"), "graphs has no sam2_decoder graph"),
    (lambda m: m["config"].update(thinker=None), "graphs.thinker_audio is there, yet the config has no thinker"),
    (lambda m: m.pop("qwen_tokenizer"), "qwen_tokenizer is missing"),
    (lambda m: m.update(thinker_embed="other.npy"), "thinker_embed 'other.npy' is not listed in files"),
    (lambda m: m["receipt"]["sam2"].pop("boxes"), "receipt.sam2.boxes is missing"),
], ids=["sam2-graph", "thinker-config", "tokenizer", "embed", "receipt"])
def test_an_edited_manifest_is_refused_in_one_line(engine, tmp_path, change, needle):
    folder = tmp_path / "engine"
    shutil.copytree(engine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=re.escape(needle)) as refused:
        OnnxOpenAVS(folder)
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_info_prints_the_receipt(engine, capsys):
    r = cli(capsys, "info", engine)
    assert r.rc == 0, r.err
    assert "system     openavs" in r.out and "hashes match" in r.out
    assert "2 generated clips" in r.out and "identical in 100% of runs" in r.out
    assert re.search(r"SAM masks +IoU min 1\.000 over 4 boxes", r.out), r.out
    assert re.search(r"GroundingDINO +\(fp32\) max \|logit diff\|", r.out) and "BEATs" in r.out
    assert re.search(r"SAM2 masks +IoU min 1\.000 over 4 boxes", r.out), r.out
    assert re.search(r"thinker logits +max \|diff\| .* top-1 agreement 1\.000", r.out), r.out
    assert re.search(r"thinker text +identical in 100% of runs", r.out), r.out


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["sam_decoder.onnx", "gpt2_merges.txt", "translator"])
def test_a_corrupted_file_is_refused_in_one_line(engine, tmp_path, graph):
    folder = tmp_path / "engine"
    shutil.copytree(engine, folder)
    if graph == "translator":  # an engine exported with other translator prompts
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest[TRANSLATOR_PROMPTS]["basic.txt"] = "0" * 64
        (folder / "manifest.json").write_text(json.dumps(manifest))
        needle = "translator prompts differ"
    else:
        data = bytearray((folder / graph).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / graph).write_bytes(bytes(data))
        needle = f"{graph}: its SHA-256 does not match"
    with pytest.raises(CheckpointError, match=re.escape(needle)) as refused:
        OnnxOpenAVS(folder)
    assert "\n" not in str(refused.value)


@pytest.mark.slow  # a whole export each, with its calibration and receipt
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_exports_load_and_run(loaded, clip, tmp_path, precision):
    folder = export_engine(loaded, tmp_path / precision, precision=precision, receipt_n=1)
    manifest = read_manifest(folder)
    assert manifest["components"] == PRECISIONS[precision].components
    ops = {name: {node.op_type for node in onnx.load(str(folder / entry["file"])).graph.node}
           for name, entry in manifest["graphs"].items()}
    if precision == "int8":
        for name in ("pengi_audio", "pengi_prompt", "sam_encoder", "sam_decoder", "beats", "thinker_audio",
                     "thinker_vision", "sam2_encoder", "sam2_decoder"):
            assert "DequantizeLinear" in ops[name], name
        for name in ("gpt2", "grounding", "thinker_llm"):
            assert "DequantizeLinear" not in ops[name], name

    def nbits(graph):  # the LLMs' weights: 8 bits under int8, 4 under int4
        found = [n for n in onnx.load(str(folder / graph)).graph.node if n.op_type == "MatMulNBits"]
        bits = {onnx.helper.get_attribute_value(a) for n in found for a in n.attribute if a.name == "bits"}
        assert bits == {8 if precision == "int8" else 4}, graph
        return found

    assert len(nbits("gpt2.onnx")) == 4 * loaded.model.pengi.config.gpt2.n_layer
    # every projection of every layer and the LM head
    assert len(nbits("thinker_llm.onnx")) == 7 * loaded.config.thinker.llm.num_layers + 1
    receipt = manifest["receipt"]
    assert receipt["pengi"]["logits"]["steps"] > 0 and receipt["sam"]["boxes"] == 2
    assert receipt["thinker"]["logits"]["steps"] > 0 and receipt["sam2"]["boxes"] == 2
    runtime = Runtime.from_engine(folder)
    runtime.pipeline.describe_tokens = runtime.pipeline.translate_tokens = 8  # the thinker's text runs to the cap
    for options in ({"variant": "lite"}, {"variant": "edge"}, {"variant": "default", "translator": "local"},
                    {"variant": "lite", "segmenter": "sam2"}):
        result = runtime.run(clip, **options)
        assert len(result.masks) == 2 and precision in result.model
