"""Shared fixtures: generated media and synthetic checkpoints (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from edgeav.systems.crab.checkpoints import save_released, synthesize
from edgeav.media import synth
from edgeav.models.ilora import ILoRALinear
from edgeav.models.llama import Llama
from edgeav.systems.crab.config import preset
from edgeav.engines.manifest import read_manifest
from edgeav.export.tensorrt import check_graph


def crab_llm(name: str) -> Llama:
    """The LLM of a Crab preset, randomly initialised."""
    config = preset(name)
    return Llama(config.llm, config.lora)



def engine_graphs(folder) -> dict:
    """Graph name -> file of the engine ``folder``."""
    return {name: folder / entry["file"] for name, entry in read_manifest(folder)["graphs"].items()}


# onnxruntime's fused ops in an onnx engine's LLM graph (a TensorRT export traces the same steps in standard ops)
FUSED_LLM_OPS = ("com.microsoft::GroupQueryAttention", "com.microsoft::SkipSimplifiedLayerNormalization")


def llm_tensorrt_problems(graphs: dict) -> list[str]:
    """Check that every graph in ``graphs`` (name -> ONNX model or file) of an onnx engine but its ``llm`` parses
    in TensorRT, and that the LLM's problems include onnxruntime's fused ops; -> the LLM's other problems."""
    for name, graph in graphs.items():
        if name != "llm":
            assert check_graph(graph) == [], name
    problems = check_graph(graphs["llm"])
    for op in FUSED_LLM_OPS:
        assert any(problem.startswith(op) for problem in problems), (op, problems)
    return [problem for problem in problems if not problem.startswith(FUSED_LLM_OPS)]

@pytest.fixture(scope="session")
def demo_clip(tmp_path_factory):
    """A 10-s 25 fps clip with a tone in odd seconds, 320x240."""
    path = tmp_path_factory.mktemp("clips") / "demo.mp4"
    synth.write_clip(path)
    return path


@pytest.fixture(scope="session")
def tiny_released(tmp_path_factory):
    """A synthetic crab-tiny checkpoint in Crab's released layout."""
    folder = tmp_path_factory.mktemp("ckpt") / "crab-tiny"
    save_released(synthesize("crab-tiny", seed=3), folder)
    return folder


def faststart_copy(source, target) -> None:
    """Re-mux ``source`` into ``target`` with the index (moov) first, so a copy cut short still opens."""
    import av

    with av.open(str(source)) as src, av.open(str(target), "w", options={"movflags": "faststart"}) as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)


def sharpen_qwen_(named_parameters) -> None:
    """Give a random Qwen2 text model O(1) projection gains and sizeable q/k/v biases (Qwen's are): std-0.02
    weights would leave attention near uniform and hide position errors. The embeddings stay as they are."""
    with torch.no_grad():
        for name, param in named_parameters:
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(std=0.5)
            elif "embed_tokens" not in name:
                param.normal_(std=param.shape[1] ** -0.5)


def rig_llm_to_say(loaded, tokens: list[str | int]) -> None:
    """Make the LLM answer any prompt with ``tokens`` then EOS, greedily, through its real forward.

    Attention and MLP outputs are zeroed, so the last hidden state is the normed
    embedding of the current token; each LM-head row is then aimed at the
    embedding of the token before it.
    """
    tok = loaded.tokenizer
    llm = loaded.model.llm
    ids = [tok.token_id(t) if isinstance(t, str) else t for t in tokens]
    last_prompt_token = tok.encode_chat("x")[-1]
    chain = [last_prompt_token, *ids, tok.eos_id]
    with torch.no_grad():
        for layer in llm.model.layers:
            for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
                module.weight.zero_()
                if isinstance(module, ILoRALinear):
                    module.lora_B.zero_()
        embed = llm.model.embed_tokens.weight
        head = llm.lm_head.weight
        head.zero_()
        for current, following in zip(chain, chain[1:]):
            head[following] = 10 * embed[current] / embed[current].norm()


@pytest.fixture(scope="session")
def demo_engine(tmp_path_factory):
    """The demo model exported to fp32 ONNX, with a receipt over one clip per task (about two minutes); the
    export also lands in the test session's export cache."""
    from edgeav.systems.crab.checkpoints import load_converted
    from edgeav.export.exporter import export_engine
    from edgeav.runtime import DEMO_DIR

    return export_engine(load_converted(DEMO_DIR), tmp_path_factory.mktemp("engines") / "demo-fp32", receipt_n=1)


@pytest.fixture(autouse=True, scope="session")
def _export_cache(tmp_path_factory):
    """Exports in tests cache under a temporary folder, never the user's ~/.cache."""
    import os

    old = os.environ.get("EDGEAV_CACHE")
    os.environ["EDGEAV_CACHE"] = str(tmp_path_factory.mktemp("edgeav-cache"))
    yield
    if old is None:
        os.environ.pop("EDGEAV_CACHE", None)
    else:
        os.environ["EDGEAV_CACHE"] = old
