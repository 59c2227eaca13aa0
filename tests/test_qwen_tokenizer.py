"""The Qwen2 tokenizer and the Qwen2.5-Omni prompt against transformers' Qwen2 tokenizer (and the bare
``tokenizers`` file loader) over the same synthetic files; nothing is downloaded."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from edgeav.errors import OptionError
from edgeav.qwen_tokenizer import (AUDIO, AUDIO_BOS, AUDIO_EOS, ENDOFTEXT, IM_END, IM_START, IMAGE,
                                   QWEN_OMNI_ADDED_TOKENS, QWEN_OMNI_SYSTEM, SYNTHETIC_MERGES, VIDEO, VISION_BOS,
                                   VISION_EOS, QwenTokenizer, chat_ids, write_synthetic_tokenizer)

TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "The box is [12,34,56,78] and the points are [20,30],[40,50],[60,70].",
    "Numbers 0123456789 and 3.14159, dates 2026-03-05.",
    "Café naïve coöperate e\u0301 (NFC), 北京欢迎你, Привет, 😀👍🏽, emoji-in-word ab😀cd",
    "line one\nline two\r\n\n\n  indented\tand tabbed   \n",
    "It's, we're, they've, I'm, you'll, he'd, IT'S LOUD",
    "<|im_start|>user\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
    "x<|AUDIO|><|AUDIO|>y <|vision_bos|> <|IMAGE|>\n<|vision_eos|>z<|endoftext|>",
    "<tool_call>a non-special added token</tool_call><|im_end|> <|im_end |> <|unknown|>",
    "",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_tok")
    write_synthetic_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def ours(synthetic):
    return QwenTokenizer.from_dir(synthetic)


@pytest.fixture(scope="module")
def reference(synthetic):
    """transformers' Qwen2 tokenizer (Qwen2TokenizerFast) over the same folder."""
    return AutoTokenizer.from_pretrained(str(synthetic), local_files_only=True)


def test_synthetic_tokenizer_is_deterministic_and_real(synthetic, tmp_path):
    write_synthetic_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (synthetic / name).read_bytes()
    spec = json.loads((synthetic / "tokenizer.json").read_text())
    assert len(spec["model"]["merges"]) == SYNTHETIC_MERGES
    assert {e["content"]: e["id"] for e in spec["added_tokens"]} == {t: i for i, t, _ in QWEN_OMNI_ADDED_TOKENS}
    write_synthetic_tokenizer(tmp_path, corpus="other words entirely, other words again\n")
    assert (tmp_path / "tokenizer.json").read_bytes() != (synthetic / "tokenizer.json").read_bytes()


def test_special_ids_match_transformers(ours, reference, synthetic):
    plain = Tokenizer.from_file(str(synthetic / "tokenizer.json"))
    for token_id, text, _ in QWEN_OMNI_ADDED_TOKENS:
        assert ours.token_id(text) == reference.convert_tokens_to_ids(text) == plain.token_to_id(text) == token_id
    named = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|AUDIO|>": AUDIO,
             "<|audio_bos|>": AUDIO_BOS, "<|audio_eos|>": AUDIO_EOS, "<|vision_bos|>": VISION_BOS,
             "<|vision_eos|>": VISION_EOS, "<|IMAGE|>": IMAGE, "<|VIDEO|>": VIDEO}
    assert {t: ours.token_id(t) for t in named} == named
    assert reference.eos_token_id == IM_END and reference.pad_token_id == ENDOFTEXT
    assert ours.vocab_size == 151665
    assert ours.token_id("Ġthe") == reference.convert_tokens_to_ids("Ġthe")
    with pytest.raises(OptionError, match="has no token '<|nope|>'"):
        ours.token_id("<|nope|>")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, reference, synthetic, text):
    ids = ours.encode(text)
    assert ids == reference(text)["input_ids"]
    assert ids == Tokenizer.from_file(str(synthetic / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special=False) == reference.decode(ids, skip_special_tokens=False)
    if "e\u0301" not in text:
        assert ours.decode(ids, skip_special=False) == text


# A Qwen2.5-Omni-style chat template (system string, user content items), for transformers to render.
TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|vision_bos|><|IMAGE|><|vision_eos|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_bos|><|VIDEO|><|vision_eos|>' -}}"
    "{%- elif item['type'] == 'audio' -%}{{- '<|audio_bos|><|AUDIO|><|audio_eos|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
PLACEHOLDER = re.compile(r"(<\|IMAGE\|>|<\|VIDEO\|>|<\|AUDIO\|>)")
KIND_OF = {"<|IMAGE|>": "image", "<|VIDEO|>": "video", "<|AUDIO|>": "audio"}

CONVERSATIONS = [
    [("text", "This is a video and an audio:"), ("video", 10), ("audio", 7),
     ("text", "Please identify the action taking place in the video.")],
    [("text", "This is an image and an audio:"), ("image", 4), ("audio", 3),
     ("text", "\nWhat is the category? Give the box like [12,34,56,78].")],
    [("text", "These are two videos and an audio:"), ("audio", 5), ("video", 2), ("video", 3)],
    [("video", 4), ("audio", 2)],
    [("text", "Split "), ("text", "words"), ("text", " across parts, then a box [1,2,3,4]")],
]


def _transformers_prompt_ids(reference, parts) -> list[int]:
    """What the Qwen2.5-Omni processor does: render the template, repeat each placeholder, tokenise once."""
    content = [{"type": "text", "text": v} if k == "text" else {"type": k} for k, v in parts]
    messages = [{"role": "system", "content": QWEN_OMNI_SYSTEM}, {"role": "user", "content": content}]
    text = reference.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    counts = {kind: iter([n for k, n in parts if k == kind]) for kind in ("image", "video", "audio")}
    expanded = "".join(piece * next(counts[KIND_OF[piece]]) if piece in KIND_OF else piece
                       for piece in PLACEHOLDER.split(text))
    return reference(expanded)["input_ids"]


@pytest.mark.parametrize("parts", CONVERSATIONS)
def test_chat_ids_match_transformers_rendering(ours, reference, parts):
    assert chat_ids(ours, parts) == _transformers_prompt_ids(reference, parts)


def test_chat_ids_layout(ours):
    ids = chat_ids(ours, [("text", "Hi:"), ("image", 2), ("audio", 3)], system="S")
    text = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi:<|vision_bos|><|IMAGE|><|IMAGE|><|vision_eos|>"
            "<|audio_bos|><|AUDIO|><|AUDIO|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n")
    assert ids == ours.encode(text)
    assert ids[:1] == [IM_START] and ids.count(IMAGE) == 2 and ids.count(AUDIO) == 3
    assert ids[ids.index(IMAGE) - 1] == VISION_BOS and ids[ids.index(AUDIO) + 3] == AUDIO_EOS
    tail = [IM_END, *ours.encode("\n"), IM_START, *ours.encode("assistant\n")]
    assert ids[-len(tail):] == tail


@pytest.mark.parametrize("part", [("image", 0), ("audio", -1), ("video", True), ("video", 2.0), ("pixels", 3),
                                  ("text", 5), ("text",)])
def test_bad_prompt_parts_are_refused(ours, part):
    with pytest.raises(OptionError) as error:
        chat_ids(ours, [("text", "x"), part])
    assert "\n" not in str(error.value) and "expected ('text', str)" in str(error.value)


def test_decode_skips_special_like_transformers(ours, reference):
    prompt = chat_ids(ours, CONVERSATIONS[1])
    answer = ours.encode("The category is dog. The box is [12,34,56,78].") + [IM_END, ENDOFTEXT]
    for ids in (prompt + answer, answer, [IM_END], ours.encode("<tool_call>x</tool_call>")):
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special=False) == reference.decode(ids, skip_special_tokens=False)
    assert ours.decode(answer).strip() == "The category is dog. The box is [12,34,56,78]."


def _vocab_and_merges(synthetic, folder, *, config: bool) -> None:
    """The synthetic tokenizer as vocab.json (learned pieces only, as Qwen ships it) + merges.txt."""
    model = json.loads((synthetic / "tokenizer.json").read_text())["model"]
    added = {t for _, t, _ in QWEN_OMNI_ADDED_TOKENS}
    vocab = {t: i for t, i in model["vocab"].items() if t not in added}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]))
    if config:
        shutil.copy(synthetic / "tokenizer_config.json", folder)


@pytest.mark.parametrize("config", [True, False], ids=["with_config", "builtin_added_tokens"])
def test_vocab_and_merges_route(ours, reference, synthetic, tmp_path, config):
    _vocab_and_merges(synthetic, tmp_path, config=config)
    tok = QwenTokenizer.from_dir(tmp_path)
    assert tok.vocab_size == ours.vocab_size
    for text in TEXTS:
        assert tok.encode(text) == reference(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == ours.decode(ours.encode(text))
    for parts in CONVERSATIONS:
        assert chat_ids(tok, parts) == chat_ids(ours, parts)


def test_save_writes_the_files_read(ours, synthetic, tmp_path):
    ours.save(tmp_path / "copy")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "copy" / name).read_bytes() == (synthetic / name).read_bytes()
    assert QwenTokenizer.from_dir(tmp_path / "copy").encode(TEXTS[2]) == ours.encode(TEXTS[2])


def _one_line_error(folder, match: str) -> None:
    with pytest.raises(OptionError) as error:
        QwenTokenizer.from_dir(folder)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and re.search(match, message), message


def test_missing_or_broken_files_are_one_line_errors(synthetic, tmp_path):
    _one_line_error(tmp_path / "absent", "no such tokenizer folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(empty, "has no tokenizer.json, nor vocab.json and merges.txt")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((synthetic / "tokenizer.json").read_bytes()[:5000])
    _one_line_error(broken, "not valid JSON .*copy the tokenizer files")
    (broken / "tokenizer.json").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 7\n")
    _one_line_error(broken, "Git LFS pointer")
    (broken / "tokenizer.json").write_bytes(b"")
    _one_line_error(broken, "is empty")
    (broken / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    _one_line_error(broken, "WordPiece tokenizer, not Qwen2's byte-level BPE")
    shutil.copy(synthetic / "tokenizer.json", broken)
    (broken / "tokenizer_config.json").write_text("{\"added_tokens_decoder\": [")
    _one_line_error(broken, "tokenizer_config.json: is not valid JSON")


def test_tokenizer_with_other_special_ids_is_refused(synthetic, tmp_path):
    spec = json.loads((synthetic / "tokenizer.json").read_text())
    swap = {"<|IMAGE|>": VIDEO, "<|VIDEO|>": IMAGE}
    for entry in spec["added_tokens"]:
        entry["id"] = swap.get(entry["content"], entry["id"])
    spec["model"]["vocab"].update(swap)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    _one_line_error(tmp_path, r"<\|IMAGE\|> is id 151656, Qwen2.5-Omni's is 151655")
    shutil.copy(synthetic / "tokenizer_config.json", tmp_path)
    _one_line_error(tmp_path, r"tokenizer_config.json: gives added token '<\|IMAGE\|>' id 151655")


def test_inconsistent_vocabulary_is_refused(synthetic, tmp_path):
    _vocab_and_merges(synthetic, tmp_path, config=True)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps({**vocab, "Ġsquatter": IM_START}))
    _one_line_error(tmp_path, r"added token '<\|im_start\|>' and the vocabulary's 'Ġsquatter' share id 151644")
    (tmp_path / "vocab.json").write_text(json.dumps({**vocab, "<|im_end|>": 7}))
    _one_line_error(tmp_path, r"added token '<\|im_end\|>' is id 151645, but the vocabulary has it as 7")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ zzzz\n")
    _one_line_error(tmp_path, r"merge 'Ġ' 'zzzz' uses or makes a token that is not in the vocabulary")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t h\n")
    _one_line_error(tmp_path, r"merges.txt: merge 'Ġ t h' is not a pair of tokens")
