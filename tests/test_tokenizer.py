"""Tokenizer: Crab's added token ids, chat template, sentencepiece round trips."""

import pytest

from edgeav.config import ADDED_TOKENS, preset
from edgeav.errors import EdgeavError
from edgeav.tokenizer import Tokenizer, chat_prompt, train_sentencepiece

CORPUS = [
    "Please describe the events and time range that occurred in the video.",
    "<event> dog barking </event>, and the time range is <range> 2,5 </range>",
    "The sounding object is a red square. Its coordinate of top left corner is (12,34)",
    chat_prompt("This is a video:"),
] * 10


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return Tokenizer(train_sentencepiece(CORPUS, 512), preset("crab-tiny").llm)


def test_added_token_ids_follow_crab():
    llm = preset("crab-7b").llm
    assert llm.vocab_size == 32017
    assert [llm.token_id(t) for t in ("<image>", "<video>", "<audio>", "<mask_start>", "<mask_0>", "<mask_5>")] == [
        32000, 32003, 32006, 32009, 32011, 32016]
    assert len(ADDED_TOKENS) == 17


def test_chat_prompt_is_llama2_with_crab_system_prompt():
    assert chat_prompt("Hi") == "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHi [/INST]"


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


def test_mismatched_or_broken_models_are_refused(tiny_tokenizer, tmp_path):
    with pytest.raises(EdgeavError, match="has 512 pieces but the model config expects 32000"):
        Tokenizer(tiny_tokenizer.model_proto, preset("crab-7b").llm)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"definitely not a protobuf")
    with pytest.raises(EdgeavError, match="not a sentencepiece model"):
        Tokenizer.from_file(tmp_path, preset("crab-tiny").llm)
    with pytest.raises(EdgeavError, match="no tokenizer model"):
        Tokenizer.from_file(tmp_path / "missing", preset("crab-tiny").llm)
