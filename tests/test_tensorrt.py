"""TensorRT support check against onnx-tensorrt's operator list; engine build guards (no TensorRT here)."""

import importlib.util
import os
import re
import sys
import types

import onnx
import pytest
from onnx import TensorProto, helper

from edgeav.errors import CheckpointError, OptionError
from edgeav.systems.crab.config import CrabConfig
from edgeav.export.tensorrt import TENSORRT_PRECISIONS, build_engine, check_graph, load_support
from edgeav.systems.crab.export import profiles_for

FLOAT = TensorProto.FLOAT


def _model(nodes, *, opset=17, inputs=None, outputs=None, initializers=(), functions=(), extra_opsets=()):
    inputs = inputs or [helper.make_tensor_value_info("x", FLOAT, ["batch", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _attention_like():
    """MatMul + Add + Softmax with a weight initializer, the shape of what the exporter emits."""
    weight = helper.make_tensor("w", FLOAT, [4, 4], [0.1] * 16)
    bias = helper.make_tensor("b", FLOAT, [4], [0.0] * 4)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "b"], ["z"], name="bias"),
        helper.make_node("Softmax", ["z"], ["y"], name="softmax", axis=-1),
    ]
    return _model(nodes, initializers=[weight, bias], outputs=[helper.make_tensor_value_info("y", FLOAT, ["batch", 4])])


def test_plain_supported_graph_has_no_problems(tmp_path):
    model = _attention_like()
    onnx.checker.check_model(model)
    assert check_graph(model) == []
    path = tmp_path / "plain.onnx"
    onnx.save(model, path)
    assert check_graph(path) == []
    assert check_graph(str(path)) == []


def test_unsupported_and_unknown_operators_are_named_once_with_their_count():
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="dedup"),
        helper.make_node("Unique", ["u"], ["v"], name="dedup2"),
        helper.make_node("FancyOp", ["v"], ["y"], name="fancy"),
    ]
    problems = check_graph(_model(nodes))
    assert len(problems) == 2
    unique, fancy = problems
    assert unique.startswith("Unique (2 nodes, first: node 'dedup' in the main graph)")
    assert "marked unsupported in TensorRT 10." in unique
    assert fancy.startswith("FancyOp (1 node, first: node 'fancy' in the main graph)")
    assert "not in TensorRT 10." in fancy


def test_onnxruntime_contrib_op_is_reported_with_its_domain():
    weight = helper.make_tensor("qw", TensorProto.UINT8, [4, 1, 2], [0] * 8)
    scales = helper.make_tensor("scales", FLOAT, [4], [1.0] * 4)
    node = helper.make_node("MatMulNBits", ["x", "qw", "scales"], ["y"], name="q_proj", domain="com.microsoft",
                            K=4, N=4, bits=4, block_size=16)
    model = _model([node], initializers=[weight, scales], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    problems = check_graph(model)
    assert len(problems) == 1
    assert problems[0].startswith("com.microsoft::MatMulNBits (1 node, first: node 'q_proj' in the main graph)")
    assert "domain 'com.microsoft' is not ai.onnx" in problems[0]


@pytest.mark.parametrize("opset", [8, 25])
def test_opset_outside_the_supported_range_is_reported(opset):
    low, high = load_support().opset_range
    problems = check_graph(_model([helper.make_node("Relu", ["x"], ["y"])], opset=opset))
    assert problems == [f"opset {opset} is outside the opsets TensorRT {load_support().tensorrt_version} parses "
                        f"({low}..{high}); re-export with an opset_version in that range"]


def test_opsets_at_both_ends_of_the_range_pass():
    low, high = load_support().opset_range
    for opset in (low, high):
        assert check_graph(_model([helper.make_node("Relu", ["x"], ["y"])], opset=opset)) == []


def test_unsupported_op_inside_an_if_branch_is_found():
    out = helper.make_tensor_value_info("r", FLOAT, None)
    then_branch = helper.make_graph([helper.make_node("Unique", ["x"], ["r"], name="inner")], "then", [], [out])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["r"])], "else", [], [out])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)
    model = _model([node], inputs=[cond, helper.make_tensor_value_info("x", FLOAT, [4])])
    problems = check_graph(model)
    assert len(problems) == 1
    assert problems[0].startswith("Unique (1 node, first: node 'inner' in If 'branch'.then_branch)")


def test_local_functions_are_checked_by_their_body():
    good = helper.make_function("local", "ScaledSoftmax", ["t"], ["s"],
                                [helper.make_node("Softmax", ["t"], ["s"], axis=-1)], [helper.make_opsetid("", 17)])
    bad = helper.make_function("local", "Dedup", ["t"], ["s"],
                               [helper.make_node("Unique", ["t"], ["s"], name="body")], [helper.make_opsetid("", 17)])
    local = helper.make_opsetid("local", 1)
    fine = _model([helper.make_node("ScaledSoftmax", ["x"], ["y"], domain="local")], functions=[good], extra_opsets=[local])
    assert check_graph(fine) == []
    broken = _model([helper.make_node("ScaledSoftmax", ["x"], ["s1"], domain="local"),
                     helper.make_node("Dedup", ["s1"], ["y"], domain="local")],
                    functions=[good, bad], extra_opsets=[local])
    problems = check_graph(broken)
    assert len(problems) == 1
    assert problems[0].startswith("Unique (1 node, first: node 'body' in local function local.Dedup)")


def test_support_list_records_its_source_and_marks_the_core_ops():
    support = load_support()
    assert re.fullmatch(r"10\.\d+", support.tensorrt_version)
    assert re.fullmatch(r"[0-9a-f]{40}", support.commit)
    assert support.commit in support.source and support.source.endswith("docs/operators.md")
    low, high = support.opset_range
    assert low == 9 and 17 <= high < 30
    assert len(support.operators) >= 150
    for op in ("MatMul", "Gemm", "Add", "Softmax", "LayerNormalization", "Gelu", "Conv", "Gather",
               "QuantizeLinear", "DequantizeLinear", "If", "Loop", "Attention"):
        assert support.operators[op].supported, op
    assert "FP16" in support.operators["MatMul"].types
    for op in ("Unique", "SequenceAt", "MatMulInteger", "StringNormalizer"):
        assert not support.operators[op].supported, op
    assert load_support() is support


def test_missing_or_corrupt_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        check_graph(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xff\xff not a protobuf")
    with pytest.raises(CheckpointError, match="not an ONNX model"):
        check_graph(junk)


def test_bad_precision_is_refused_before_anything_else(tmp_path):
    assert TENSORRT_PRECISIONS == ("fp32", "fp16", "int8")
    with pytest.raises(OptionError, match=r"precision 'bf16'.*expected one of fp32, fp16, int8"):
        build_engine(tmp_path / "absent.onnx", tmp_path / "e.plan", precision="bf16", profiles={})


def test_unsupported_graph_is_refused_with_its_first_problems(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(_model([helper.make_node("Unique", ["x"], ["y"], name="dedup")]), path)
    with pytest.raises(CheckpointError, match=r"cannot parse this graph: Unique \(1 node"):
        build_engine(path, tmp_path / "e.plan", precision="fp16", profiles={"x": ((1, 4), (2, 4), (8, 4))})
    assert not (tmp_path / "e.plan").exists()


@pytest.fixture
def plain_onnx(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save(_attention_like(), path)
    return path


@pytest.mark.parametrize(("profiles", "message"), [
    ({}, r"input 'x' of plain.onnx has dynamic axes; add profiles\['x'\]"),
    ({"x": ((1, 4), (2, 4), (8, 4)), "mask": ((1,), (1,), (1,))}, r"has no input 'mask'; expected one of x"),
    ({"x": ((1, 4), (2, 4))}, r"expected \(min, opt, max\) shapes, got 2"),
    ({"x": ((1, 4), (2, 4), (8, 4, 1))}, r"max shape \(8, 4, 1\) has rank 3; input 'x' has rank 2"),
    ({"x": ((1, 4), (2, 5), (8, 4))}, r"axis 1 of input 'x' is fixed at 4"),
    ({"x": ((4, 4), (2, 4), (8, 4))}, r"need 0 <= min <= opt <= max"),
])
def test_profiles_are_checked_against_the_graph_inputs(plain_onnx, tmp_path, profiles, message):
    with pytest.raises(OptionError, match=message):
        build_engine(plain_onnx, tmp_path / "e.plan", precision="fp16", profiles=profiles)


def test_int8_needs_a_quantized_graph(plain_onnx, tmp_path):
    with pytest.raises(OptionError, match="no DequantizeLinear node"):
        build_engine(plain_onnx, tmp_path / "e.plan", precision="int8", profiles={"x": ((1, 4), (2, 4), (8, 4))})


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_without_tensorrt_says_what_to_install(plain_onnx, tmp_path):
    with pytest.raises(OptionError) as caught:
        build_engine(plain_onnx, tmp_path / "e.plan", precision="fp16", profiles={"x": ((1, 4), (2, 4), (8, 4))})
    message = str(caught.value)
    assert "'tensorrt' package" in message and 'pip install "edgeav[tensorrt]"' in message
    assert "\n" not in message
    assert not (tmp_path / "e.plan").exists()


class FakeTensorRT(types.ModuleType):
    """Stands in for the ``tensorrt`` module (never installable here) and records what build_engine asks of it.

    It follows the documented TensorRT 10 Python names; it checks the build's
    wiring (flags, workspace, profile, atomic write), not TensorRT itself.
    """

    def __init__(self, version="10.15.1", parse_ok=True, engine=b"serialized engine"):
        super().__init__("tensorrt")
        self.__version__ = version
        calls = self.calls = []

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity):
                calls.append(("logger", severity))

        class Profile:
            def set_shape(self, name, low, opt, high):
                calls.append(("set_shape", name, low, opt, high))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls.append(("pool", pool, size))

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                calls.append(("add_profile", type(profile).__name__))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return engine

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse", path))
                return parse_ok

            def get_error(self, index):
                return "In node 0 with name: q and operator: Foo (importFoo): UNSUPPORTED_NODE:\n  no importer"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")


X_PROFILE = {"x": ((1, 4), (2, 4), (8, 4))}


def test_build_wires_flags_workspace_and_profile_and_writes_atomically(plain_onnx, tmp_path, monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    engine = tmp_path / "engines" / "plain.plan"
    assert build_engine(plain_onnx, engine, precision="fp16", profiles=X_PROFILE, workspace_gb=2) == engine
    assert engine.read_bytes() == b"serialized engine"
    assert sorted(p.name for p in engine.parent.iterdir()) == ["plain.plan"]
    assert fake.calls == [("logger", "WARNING"), ("network", 0), ("parse", str(plain_onnx)),
                          ("pool", "WORKSPACE", 2 << 30), ("flag", "FP16"),
                          ("set_shape", "x", (1, 4), (2, 4), (8, 4)), ("add_profile", "Profile")]


def test_fp32_sets_no_precision_flag(plain_onnx, tmp_path, monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    build_engine(plain_onnx, tmp_path / "e.plan", precision="fp32", profiles=X_PROFILE)
    assert [call for call in fake.calls if call[0] == "flag"] == []


def test_parser_and_builder_failures_are_one_line_errors_and_write_nothing(plain_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(parse_ok=False))
    with pytest.raises(CheckpointError, match="ONNX parser refused it: In node 0 .* UNSUPPORTED_NODE: no importer") as caught:
        build_engine(plain_onnx, tmp_path / "e.plan", precision="fp16", profiles=X_PROFILE)
    assert "\n" not in str(caught.value)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(engine=None))
    with pytest.raises(CheckpointError, match="could not build the fp16 engine"):
        build_engine(plain_onnx, tmp_path / "e.plan", precision="fp16", profiles=X_PROFILE)
    assert list(tmp_path.glob("*.plan*")) == []


def test_tensorrt_other_than_10_is_refused(plain_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(version="11.4.0"))
    with pytest.raises(OptionError, match=r"needs TensorRT 10 and tensorrt 11\.4\.0 is installed"):
        build_engine(plain_onnx, tmp_path / "e.plan", precision="fp16", profiles=X_PROFILE)


def test_plan_files_get_the_usual_mode(plain_onnx, tmp_path, monkeypatch):
    """A private 0600 would hide a built engine from other users; plans get 0666 less the umask."""
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
    old = os.umask(0o027)
    try:
        build_engine(plain_onnx, tmp_path / "e" / "visual.plan", precision="fp16", profiles=X_PROFILE)
    finally:
        os.umask(old)
    assert (tmp_path / "e" / "visual.plan").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["visual.plan"]


def test_audio_profile_spans_the_authors_cut_of_every_task():
    """The fewest frames: a 5-s task's audio lasting 4 s, cut in five 12,800-sample pieces (1 + 12,400 // 160);
    the most: AVQA's 2-s windows of 61 s of audio, 2 * (976,000 // 60) = 32,532 samples (1 + 32,132 // 160)."""
    (low, opt, high), = profiles_for("audio", CrabConfig()).values()
    assert (low[1], opt[1], high[1]) == (78, 98, 201)
    assert low[0] == 1 and high[0] >= 10  # one piece (AVSS) up to ten (AVE, AVQA)


@pytest.mark.parametrize(("task", "seconds"), [("s4", 4.1), ("ave", 10.9)])
def test_audio_pieces_of_clips_at_the_slack_edges_fit_the_profile(task, seconds, tmp_path):
    """What the runtime feeds the audio encoder for a clip a little off its task's length fits the profile."""
    from edgeav.systems.crab.inputs import decode
    from edgeav.media import synth
    from edgeav.preprocess.fbank import crab_fbank_batch
    from edgeav.systems.crab.tasks import get_task

    clip = tmp_path / "clip.mp4"
    synth.write_clip(clip, duration_s=seconds, width=64, height=48)
    pieces = decode(clip, get_task(task), at_seconds=[0]).audio[None]
    frames = crab_fbank_batch(pieces).shape[1]
    (low, _, high), = profiles_for("audio", CrabConfig()).values()
    assert frames != 98  # cut the authors' way, not in exact seconds
    assert low[1] <= frames <= high[1] and low[0] <= len(pieces) <= high[0]
