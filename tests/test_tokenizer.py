"""Tokenizer: Crab's added token ids, the chat template, tokenizer_config.json settings, and every task's
prompt ids against transformers' LlamaTokenizer (the tokenizer Crab's authors ran), id for id."""

import json
import shutil
from pathlib import Path

import pytest

import edgeav
from edgeav.bench import authors_way
from edgeav.systems.crab.config import ADDED_TOKENS, VOCABULARY, chat_prompt, preset
from edgeav.errors import CheckpointError, EdgeavError
from edgeav.systems.crab.tasks import TASKS, get_task
from edgeav.tokenizer import (
    SPIECE_UNDERLINE,
    TOKENIZER_CONFIG_FILE,
    Tokenizer,
    TokenizerSettings,
    train_sentencepiece,
)

TINY = preset("crab-tiny").llm
DEMO_DIR = Path(edgeav.__file__).parent / "demo"  # the demo model's sentencepiece model (crab-tiny's vocabulary)
CORPUS = [
    "Please describe the events and time range that occurred in the video.",
    "<event> dog barking </event>, and the time range is <range> 2,5 </range>",
    "The sounding object is a red square. Its coordinate of top left corner is (12,34)",
    chat_prompt("This is a video:"),
] * 10
OPTIONS = {"question": "How many instruments are sounding?", "expression": "the red square on the left"}

def task_instructions():
    """Every task's instruction, with a question or expression where the task needs one."""
    return {name: get_task(name).instruction(**({task.requires: OPTIONS[task.requires]} if task.requires else {}))
            for name, task in TASKS.items()}


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return Tokenizer(train_sentencepiece(CORPUS, 512), TINY, VOCABULARY)


def llama_folder(path, config=None):
    """The demo's sentencepiece model, with a tokenizer_config.json holding ``config`` unless it is None."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO_DIR / "tokenizer.model", path / "tokenizer.model")
    if config is not None:
        (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **config}))
    return path


def transformers_tokenizer(folder):
    """transformers' LlamaTokenizer from ``folder`` with Crab's tokens added as the authors add them."""
    pytest.importorskip("transformers")
    return authors_way.llama_tokenizer(folder, list(ADDED_TOKENS))


def authors_prompt_ids(tokenizer, instruction):
    """The authors' path: render the chat template to text, then tokenize + convert_tokens_to_ids."""
    assert authors_way.chat_text(tokenizer, instruction) == "<s>" + chat_prompt(instruction)
    return authors_way.prompt_ids(tokenizer, instruction)


def _transformers_major() -> int:
    try:
        import transformers
    except ImportError:
        return 0
    return int(transformers.__version__.split(".")[0])


# Crab ran transformers 4.37.2, whose slow tokenizer reads absent keys and edge texts differently from 5.x.
# The dev install gets 5.x, so these run only where 4.x is installed (PYTHONPATH=<4.37.2> pytest ...).
needs_transformers_4 = pytest.mark.skipif(_transformers_major() != 4,
                                          reason="compares with transformers 4.x (Crab's 4.37.2); 5.x is installed")


# ---- Crab's ids and template ------------------------------------------------------------------

def test_added_token_ids_follow_crab():
    llm = preset("crab-7b").llm
    assert llm.vocab_size == 32017
    tokenizer = Tokenizer(train_sentencepiece(CORPUS, llm.base_vocab_size), llm, VOCABULARY)
    assert [tokenizer.token_id(t) for t in ("<image>", "<video>", "<audio>", "<mask_start>", "<mask_0>", "<mask_5>")] == [
        32000, 32003, 32006, 32009, 32011, 32016]
    assert len(ADDED_TOKENS) == 17


def test_chat_prompt_is_llama2_with_crab_system_prompt():
    assert chat_prompt("Hi") == "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHi [/INST]"
    assert chat_prompt("Hi \n") == chat_prompt("Hi")  # the template strips the message's end


def test_encode_maps_placeholders_to_their_ids_and_round_trips(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "This is a video:\n<video_start><video><video_end>\nPlease describe the events."
    ids = tok.encode_chat(text)
    assert ids[0] == tok.bos_id
    video = [tok.token_id(t) for t in ("<video_start>", "<video>", "<video_end>")]
    assert any(ids[i : i + 3] == video for i in range(len(ids)))
    assert max(i for i in ids if i not in video) < tok.base_vocab_size
    assert tok.decode(ids) == chat_prompt(text)


def test_decode_writes_mask_tokens_and_drops_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("segment it <mask_start><mask_0><mask_1><mask_end>") + [tok.eos_id]
    assert tok.decode(ids) == "segment it <mask_start><mask_0><mask_1><mask_end>"


def test_training_is_deterministic():
    assert train_sentencepiece(CORPUS, 512) == train_sentencepiece(CORPUS, 512)


# ---- parity with transformers' LlamaTokenizer -----------------------------------------------------

@pytest.mark.parametrize("legacy", [True, False])
def test_every_task_prompt_matches_transformers_id_for_id(tmp_path, legacy):
    folder = llama_folder(tmp_path / "llama", {"legacy": legacy})
    reference = transformers_tokenizer(folder)
    ours = Tokenizer.from_file(folder, TINY, VOCABULARY)
    assert ours.settings.legacy is legacy
    for name, instruction in task_instructions().items():
        expected = authors_prompt_ids(reference, instruction)
        assert ours.encode_chat(instruction) == expected, name
        assert expected[0] == ours.bos_id == 1


def test_legacy_false_makes_ave_and_s4_prompts_two_tokens_shorter(tmp_path):
    legacy = Tokenizer.from_file(llama_folder(tmp_path / "a", {"legacy": True}), TINY, VOCABULARY)
    modern = Tokenizer.from_file(llama_folder(tmp_path / "b", {"legacy": False}), TINY, VOCABULARY)
    for name in ("ave", "s4"):
        instruction = task_instructions()[name]
        assert len(legacy.encode_chat(instruction)) - len(modern.encode_chat(instruction)) == 2, name


# Both flags written out: transformers 5 reads an absent add_bos_token as False, 4.x (and we) as True.
@pytest.mark.parametrize("config", [{"legacy": True, "add_bos_token": True, "add_eos_token": True},
                                    {"legacy": False, "add_bos_token": False, "add_eos_token": False}])
def test_add_bos_and_eos_tokens_act_as_in_tokenizer_call(tmp_path, config):
    folder = llama_folder(tmp_path / "llama", config)
    reference = transformers_tokenizer(folder)
    ours = Tokenizer.from_file(folder, TINY, VOCABULARY)
    for text in ("Please answer this question: what plays?", "This is a video:\n<video_start><video><video_end>\nhi"):
        assert ours.encode(text, add_special_tokens=True) == reference(text)["input_ids"], text
        assert ours.encode(text) == reference.convert_tokens_to_ids(reference.tokenize(text)), text


def test_missing_keys_read_as_the_authors_transformers_reads_them(tmp_path):
    """transformers 4.x (Crab ran 4.37.2) reads a missing legacy as True and add_bos_token as True; 5.x reads
    both as False. We follow 4.x."""
    absent = {"no-key": llama_folder(tmp_path / "key", {}), "no-file": llama_folder(tmp_path / "file")}
    explicit = Tokenizer.from_file(llama_folder(tmp_path / "explicit", {"legacy": True}), TINY, VOCABULARY)
    assert not (absent["no-file"] / TOKENIZER_CONFIG_FILE).exists()
    for kind, folder in absent.items():
        ours = Tokenizer.from_file(folder, TINY, VOCABULARY)
        assert ours.settings.legacy is True and ours.settings.add_bos_token is True, kind
        assert ours.encode("hi", add_special_tokens=True) == [ours.bos_id, *ours.encode("hi")]
        for name, instruction in task_instructions().items():
            assert ours.encode_chat(instruction) == explicit.encode_chat(instruction), (kind, name)


@needs_transformers_4
def test_missing_keys_match_transformers_4(tmp_path):
    folder = llama_folder(tmp_path / "key", {})
    reference, ours = transformers_tokenizer(folder), Tokenizer.from_file(folder, TINY, VOCABULARY)
    for name, instruction in task_instructions().items():
        assert ours.encode_chat(instruction) == authors_prompt_ids(reference, instruction), name
    assert ours.encode("hi", add_special_tokens=True) == reference("hi")["input_ids"]


# Text where transformers 5's tokenizers backend and 4.x's sentencepiece tokenizer part ways.
EDGE_TEXTS = ["<video_start> hi <mask_0> there", "<mask_0> there\n", "<s>  two  spaces <audio>  x ", " lead",
              "a\u2581b", "<s>", "x<s>", "</s>y <unk> z"]


@pytest.mark.parametrize("legacy", [True, False])
def test_edge_texts_follow_the_sentencepiece_rules_of_transformers_4(tmp_path, legacy):
    ours = Tokenizer.from_file(llama_folder(tmp_path / "llama", {"legacy": legacy}), TINY, VOCABULARY)
    sp = ours._sp
    if legacy:  # each piece of text between added tokens is encoded alone, with the dummy prefix
        assert ours.tokenize("<video_start> hi<mask_0>  x") == ["<video_start>", *sp.encode(" hi", out_type=str),
                                                                "<mask_0>", *sp.encode("  x", out_type=str)]
    else:  # one leading ▁ for the whole text, dropped before a special token, kept before <mask_i>
        assert ours.tokenize("<video> hi")[0] == "<video>"
        assert ours.tokenize("<mask_0> hi")[:2] == [SPIECE_UNDERLINE, "<mask_0>"]
        assert not ours.tokenize("<video_end>\nThis")[1].startswith(SPIECE_UNDERLINE)
        assert ours.tokenize("hi")[0].startswith(SPIECE_UNDERLINE)
        assert ours.tokenize("a\u2581b") == ours.tokenize("a b")  # ▁ in the text reads as a space


@needs_transformers_4
@pytest.mark.parametrize("legacy", [True, False])
def test_edge_texts_match_transformers_4(tmp_path, legacy):
    folder = llama_folder(tmp_path / "llama", {"legacy": legacy})
    ours, reference = Tokenizer.from_file(folder, TINY, VOCABULARY), transformers_tokenizer(folder)
    for text in EDGE_TEXTS:
        assert ours.encode(text) == reference.convert_tokens_to_ids(reference.tokenize(text)), text


# ---- tokenizer_config.json --------------------------------------------------------------------------

def test_settings_survive_save_and_load(tmp_path):
    folder = llama_folder(tmp_path / "llama", {"legacy": False, "add_eos_token": True, "added_tokens_decoder": {
        "2": {"content": "</s>", "lstrip": True, "special": True}}})
    loaded = Tokenizer.from_file(folder, TINY, VOCABULARY)
    assert loaded.settings.legacy is False and loaded.settings.add_eos_token is True
    assert loaded.settings.added[2].lstrip
    loaded.save(tmp_path / "saved")
    again = Tokenizer.from_file(tmp_path / "saved", TINY, VOCABULARY)
    assert again.settings == loaded.settings
    text = "a  </s> b"
    assert again.encode(text, add_special_tokens=True) == loaded.encode(text, add_special_tokens=True)
    plain = Tokenizer.from_file(llama_folder(tmp_path / "plain", {"legacy": False}), TINY, VOCABULARY)
    assert again.encode(text) != plain.encode(text)
    # A folder with only the model keeps the defaults, and the defaults are what an absent file means.
    assert TokenizerSettings.from_config({}) == TokenizerSettings()


@pytest.mark.parametrize("config, message", [
    ({"legacy": "yes"}, "legacy is 'yes', expected true, false or null"),
    ({"bos_token": 5}, "bos_token: expected a token string"),
    ({"bos_token": "<nope>"}, "'<nope>' is not in tokenizer.model's vocabulary"),
    ({"added_tokens_decoder": {"600": {"content": "<pad>"}}}, "adds '<pad>' as id 600"),
    ({"eos_token": "<s>"}, "eos_token is '<s>' \\(id 1\\), the model config expects id 2"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, config, message):
    folder = llama_folder(tmp_path / "llama", config)
    with pytest.raises(CheckpointError, match=message) as error:
        Tokenizer.from_file(folder, TINY, VOCABULARY)
    assert "\n" not in str(error.value) and TOKENIZER_CONFIG_FILE in str(error.value)


def test_mismatched_or_broken_models_are_refused(tiny_tokenizer, tmp_path):
    with pytest.raises(EdgeavError, match="has 512 pieces but the model config expects 32000"):
        Tokenizer(tiny_tokenizer.model_proto, preset("crab-7b").llm, VOCABULARY)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"definitely not a protobuf")
    with pytest.raises(EdgeavError, match="not a sentencepiece model"):
        Tokenizer.from_file(tmp_path, TINY, VOCABULARY)
    with pytest.raises(EdgeavError, match="no tokenizer model"):
        Tokenizer.from_file(tmp_path / "missing", TINY, VOCABULARY)
    (tmp_path / "ok").mkdir()
    shutil.copy(DEMO_DIR / "tokenizer.model", tmp_path / "ok" / "tokenizer.model")
    (tmp_path / "ok" / TOKENIZER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        Tokenizer.from_file(tmp_path / "ok", TINY, VOCABULARY)
