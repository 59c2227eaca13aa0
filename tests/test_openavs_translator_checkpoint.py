"""``--translator local --translator-checkpoint DIR``: a Qwen2.5 text release (Qwen2ForCausalLM, as
transformers saves it) on edgeav's decoder and tokenizer (edgeav.qwen_text) as OpenAVS's translator.

The decoder's logits and greedy tokens are compared with transformers' Qwen2ForCausalLM on the same random
weights (tied and untied heads, one file and shards); the runs go through the CLI, the runtime and a
stream; broken folders are one line, before any model loads where the files alone tell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import sharpen_qwen_
from edgeav.errors import CheckpointError, OptionError
from edgeav.generate import generate
from edgeav.media import synth
from edgeav.qwen_text import QwenTextTokenizer, load_text_llm, load_text_model
from edgeav.qwen_tokenizer import IM_END, chat_ids, write_synthetic_tokenizer
from edgeav.runtime import Runtime
from edgeav.systems.openavs.checkpoints import THINKER_DIR, save_released, synthesize
from edgeav.systems.openavs import pipeline as openavs_pipeline
from edgeav.systems.openavs.translator import LocalTranslator

from test_cli import assert_user_error, cli

transformers = pytest.importorskip("transformers")

TOKENIZER_VOCAB = 151665  # the synthetic tokenizer's added tokens end at Qwen's 151664


def qwen2_release(folder: Path, *, vocab_size: int = 1000, tied: bool = True, shards: bool = False,
                  tokenizer: bool = False, seed: int = 0):
    """A random tiny Qwen2ForCausalLM saved as a release folder (safetensors, config.json, optionally the
    synthetic Qwen tokenizer); returns the transformers model."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=2048,
                                      tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    sharpen_qwen_(model.named_parameters())
    if tokenizer:
        write_synthetic_tokenizer(folder)
        known = sorted(QwenTextTokenizer.from_dir(folder).known_ids())
        with torch.no_grad():  # ids the small tokenizer lacks score 0: the random replies are text
            head = model.get_output_embeddings().weight
            unknown = torch.ones(head.shape[0], dtype=torch.bool)
            unknown[known] = False
            head[unknown] = 0
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB" if shards else "10GB")
    return model


@pytest.mark.parametrize("tied, shards", [(True, False), (False, False), (True, True)])
def test_logits_equal_transformers(tmp_path, tied, shards):
    reference = qwen2_release(tmp_path, tied=tied, shards=shards)
    names = {p.name for p in tmp_path.iterdir()}
    assert ("model.safetensors.index.json" in names) == shards
    config, llm = load_text_llm(tmp_path)
    assert config.tie_word_embeddings == tied and config.llm.mrope_section is None
    assert (llm.lm_head.weight is llm.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(1))
    llm.setup_caches(1, 64)
    with torch.no_grad():
        expected = reference(ids).logits
        logits, _ = llm(llm.embed(ids), torch.arange(40))
    assert (logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_greedy_tokens_equal_transformers_generate(tmp_path, tied):
    reference = qwen2_release(tmp_path, tied=tied, seed=3)
    _, llm = load_text_llm(tmp_path)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                  eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    assert len(expected) == 10
    llm.setup_caches(1, 32)
    ours = generate(llm, llm.embed(ids), max_new_tokens=10, eos_id=-1, stop_repeats=False)
    assert ours.token_ids == expected


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tied release whose vocabulary covers the synthetic Qwen tokenizer, with that tokenizer."""
    folder = tmp_path_factory.mktemp("qwen2.5-tiny")
    model = qwen2_release(folder, vocab_size=TOKENIZER_VOCAB, tokenizer=True, seed=5)
    return folder, model


def transformers_reply(model, tokenizer, system: str, user: str, max_new_tokens: int) -> str:
    """transformers' greedy answer to the ChatML prompt, decoded as the translator decodes."""
    ids = torch.tensor([chat_ids(tokenizer, [("text", user)], system=system)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=IM_END, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special=True).strip()


def test_chat_answers_as_transformers_does(release):
    folder, reference = release
    model = load_text_model(folder)
    assert isinstance(model.tokenizer, QwenTextTokenizer)
    text, stopped_by = model.chat("You are a helpful assistant.", "A dog is barking.", max_new_tokens=12)
    assert stopped_by == "max_new_tokens" and text
    assert text == transformers_reply(reference, model.tokenizer, "You are a helpful assistant.",
                                      "A dog is barking.", 12)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "avs.mp4"
    synth.write_clip(path, duration_s=3.0, width=160, height=120)
    return path


class Calls:
    """LocalTranslator.translate, run as it is, with each (system, user, reply) kept."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple[str, str, str]] = []
        translate = LocalTranslator.translate

        def kept(translator, system, user):
            reply = translate(translator, system, user)
            self.seen.append((system, user, reply))
            return reply

        monkeypatch.setattr(LocalTranslator, "translate", kept)


# The translator's token cap, lowered from TRANSLATE_TOKENS (256) so that the random replies stay short; below
# generate's 32-token loop check, a reply is exactly the cap's tokens.
CAP = 24


def test_cli_lite_translates_with_the_checkpoint(capsys, monkeypatch, clip, release):
    folder, reference = release
    monkeypatch.setattr(openavs_pipeline, "TRANSLATE_TOKENS", CAP)
    calls = Calls(monkeypatch)
    r = cli(capsys, "run", clip, "--system", "openavs", "--variant", "lite", "--preset", "openavs-tiny",
            "--random-weights", "--translator", "local", "--translator-checkpoint", folder, "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    # Lite: one call for the 3-s clip, its user turn holding every second; the reply is the text model's.
    assert len(calls.seen) == 1
    system, user, reply = calls.seen[0]
    assert [f"<frame{i}>" in user for i in range(4)] == [True, True, True, False]
    assert result["text"] == reply and reply
    tokenizer = QwenTextTokenizer.from_dir(folder)
    assert reply == transformers_reply(reference, tokenizer, system, user, CAP)
    assert result["timings_ms"]["translate"] > 0
    # Random weights write no <answer>: every second is noted and gets an empty mask.
    assert [m["time_s"] for m in result["masks"]] == [0.0, 1.0, 2.0]
    assert "0 answer lines for 3 frames; frames 0-2 get no answer (empty mask)" in result["notes"]
    for t in ("0", "1", "2"):
        assert f"{t} s: no object named, so the mask is empty" in result["notes"]


@pytest.fixture(scope="module")
def no_thinker(tmp_path_factory):
    """openavs-tiny's released layout without qwen2.5-omni/: no thinker."""
    folder = tmp_path_factory.mktemp("ckpt") / "openavs-tiny"
    save_released(synthesize("openavs-tiny", seed=7), folder)
    shutil.rmtree(folder / THINKER_DIR)
    return folder


def test_a_checkpoint_without_thinker_runs_and_streams_a_checkpoint_translator(monkeypatch, clip, release,
                                                                               no_thinker):
    folder, _ = release
    monkeypatch.setattr(openavs_pipeline, "TRANSLATE_TOKENS", CAP)
    runtime = Runtime.from_checkpoint(no_thinker)
    assert runtime.engine.model.thinker is None
    calls = Calls(monkeypatch)
    result = runtime.run(clip, variant="edge", translator="local", translator_checkpoint=folder)
    assert len(calls.seen) == 1 and result.text == calls.seen[0][2]
    assert len(result.masks) == 3
    loaded = runtime.pipeline.load_translator({"translator_checkpoint": folder})
    with runtime.stream(clip, variant="edge", translator="local", translator_checkpoint=str(folder)) as windows:
        results = list(windows)
    assert runtime.pipeline.load_translator({"translator_checkpoint": folder}) is loaded  # loaded once
    assert [w.frame_s for w in results] == [0.0, 1.0, 2.0]
    assert len(calls.seen) == 4 and all(w.result.text for w in results)
    assert all("<frame0>" in user and "<frame1>" not in user for _, user, _ in calls.seen[1:])  # 1-s windows
    with pytest.raises(OptionError, match="Qwen2.5-Omni thinker"):  # the thinker's translator needs the thinker
        runtime.run(clip, variant="edge", translator="local")


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _config(**changes):
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return change


@pytest.mark.parametrize("breaks, needles", [
    (lambda folder: shutil.rmtree(folder), ("no such folder",)),
    (_config(architectures=["LlamaForCausalLM"], model_type="llama"),
     ("LlamaForCausalLM", "only Qwen2ForCausalLM (Qwen2.5 text)")),
    (_truncate, ("model.safetensors", "download the file again")),
    (lambda folder: (folder / "model.safetensors").write_text(  # a clone without git lfs
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n"),
     ("model.safetensors", "Git LFS pointer", "git lfs pull")),
    (lambda folder: (folder / "model.safetensors").unlink(), ("model.safetensors", "download")),
    (lambda folder: (folder / "tokenizer.json").unlink(), ("tokenizer.json", "tokenizer files")),
    # Whole files that do not fit the config: found in the safetensors headers.
    (_config(tie_word_embeddings=False), ("tie_word_embeddings", "lm_head.weight")),
    (_config(intermediate_size=96), ("model.safetensors", "down_proj.weight has shape [64, 128]", "needs [64, 96]")),
    (_config(num_hidden_layers=1), ("model.layers.1.", "1-layer")),
    (_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ("yarn", "remove rope_scaling")),
])
def test_a_broken_folder_is_one_line_before_any_model_loads(capsys, monkeypatch, clip, release, tmp_path,
                                                            breaks, needles):
    import edgeav.runtime

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(edgeav.runtime.Runtime, "from_preset", no_load)
    folder = tmp_path / "broken"
    shutil.copytree(release[0], folder)
    breaks(folder)
    r = cli(capsys, "run", clip, "--system", "openavs", "--preset", "openavs-tiny", "--random-weights",
            "--translator", "local", "--translator-checkpoint", folder)
    assert_user_error(r, *needles)
    assert r.out == ""


def test_a_damaged_header_is_one_line_from_python(release, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(release[0], folder)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # the header's JSON is no longer text
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: .*download the file again"):
        load_text_model(folder)


@pytest.mark.parametrize("args, needles", [
    (("--translator-checkpoint", "x"), ("--translator-checkpoint is for --translator local, not none",)),
    (("--translator", "http", "--translator-url", "http://127.0.0.1:1/v1", "--translator-checkpoint", "x"),
     ("--translator-checkpoint",)),
    (("--translator", "local", "--translator-checkpoint", ""), ("--translator-checkpoint is empty",)),
])
@pytest.mark.parametrize("command", ["run", "stream"])
def test_the_option_needs_translator_local(capsys, clip, command, args, needles):
    r = cli(capsys, command, clip, "--system", "openavs", "--preset", "openavs-tiny", "--random-weights", *args)
    assert_user_error(r, *needles)


def test_stream_checks_the_folder_before_any_model_loads(capsys, monkeypatch, clip, tmp_path):
    import edgeav.runtime

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(edgeav.runtime.Runtime, "from_preset", no_load)
    r = cli(capsys, "stream", clip, "--system", "openavs", "--preset", "openavs-tiny", "--random-weights",
            "--translator", "local", "--translator-checkpoint", tmp_path / "absent")
    assert_user_error(r, "absent", "no such folder")


def test_other_systems_refuse_the_option(capsys, clip):
    r = cli(capsys, "run", clip, "--translator-checkpoint", "x")
    assert_user_error(r, "--translator-checkpoint", "OpenAVS")
