"""The Qwen2 byte-level BPE tokenizer and the Qwen2.5-Omni chat prompt (Crab+, OpenAVS).

:class:`QwenTokenizer` reads a checkpoint's own files: ``tokenizer.json``, or ``vocab.json`` +
``merges.txt``, with the added tokens of ``tokenizer_config.json`` (or, without any, Qwen2.5-Omni's
list). Whatever the files say about the pipeline, it is built as ``Qwen2TokenizerFast`` builds it:
NFC, Qwen2's pre-tokenizer regex, byte-level BPE without unknown token, byte-level decoding. Special
tokens written in the text become their ids (``split_special_tokens=False``); no BOS or EOS is added.

Added tokens keep the ids their files give them. ``tokenizers`` ignores the ids written in a
``tokenizer.json``'s ``added_tokens``: it gives an added token the BPE model's id when the model's
vocabulary holds its text, else the next id after that vocabulary. Qwen's real vocabulary ends right
below 151643, so its added tokens land where they should; a smaller one would shift them. The
loader therefore first puts every added token into the BPE vocabulary at its id, so the ids hold
for any vocabulary size. :func:`write_synthetic_tokenizer` does the same on disk, so ``tokenizers``
and transformers (which add the tokens the same way) read its files with the real ids too.

:func:`chat_ids` renders the prompt to text, each media placeholder repeated to its token count, and
encodes it once, as the Qwen2.5-Omni processor does: text beside a special token tokenises as it
does inside the one string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from edgeav.errors import OptionError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Qwen2's pre-tokenizer: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs with their newlines, newline runs, and whitespace.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The ids the Qwen2.5-Omni thinker was trained with (CRABPLUS_SPEC section 4).
ENDOFTEXT = 151643
IM_START = 151644
IM_END = 151645
AUDIO = 151646
AUDIO_BOS = 151647
AUDIO_EOS = 151648
VISION_BOS = 151652
VISION_EOS = 151653
IMAGE = 151655
VIDEO = 151656

# Qwen2.5-Omni's added tokens (id, text, special): Qwen2-VL's list with the audio tokens in place of
# the object-ref/box-start ones and the vision tokens renamed; the last eight are not special.
QWEN_OMNI_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (ENDOFTEXT, "<|endoftext|>", True), (IM_START, "<|im_start|>", True), (IM_END, "<|im_end|>", True),
    (AUDIO, "<|AUDIO|>", True), (AUDIO_BOS, "<|audio_bos|>", True), (AUDIO_EOS, "<|audio_eos|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (VISION_BOS, "<|vision_bos|>", True), (VISION_EOS, "<|vision_eos|>", True), (151654, "<|vision_pad|>", True),
    (IMAGE, "<|IMAGE|>", True), (VIDEO, "<|VIDEO|>", True),
    (151657, "<tool_call>", False), (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False), (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False), (151664, "<|file_sep|>", False),
)
SPECIAL_IDS: dict[str, int] = {
    "<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|AUDIO|>": AUDIO,
    "<|audio_bos|>": AUDIO_BOS, "<|audio_eos|>": AUDIO_EOS, "<|vision_bos|>": VISION_BOS,
    "<|vision_eos|>": VISION_EOS, "<|IMAGE|>": IMAGE, "<|VIDEO|>": VIDEO,
}

QWEN_OMNI_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                    "auditory and visual inputs, as well as generating text and speech.")

# A media part: (opening token, placeholder repeated to the part's token count, closing token).
_MEDIA = {"image": ("<|vision_bos|>", "<|IMAGE|>", "<|vision_eos|>"),
          "video": ("<|vision_bos|>", "<|VIDEO|>", "<|vision_eos|>"),
          "audio": ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")}
_LFS_POINTER = b"version https://git-lfs"
_FIX = "copy the tokenizer files of the checkpoint again"


def _qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A byte-level BPE over ``vocab``/``merges`` with Qwen2's normaliser, pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                     byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class QwenTokenizer:
    """Encode prompts and decode answers id for id as the Qwen2.5-Omni thinker's tokenizer.

    Args:
        vocab: the BPE vocabulary (byte-level text -> id), without the added tokens.
        merges: the BPE merges, highest priority first.
        added: the added tokens by id.
        source: where the files came from, for error messages.
        files: the files read, by name, written back unchanged by :meth:`save`.
    """

    # The special tokens the files must hold at these ids, and the release whose files have them (a
    # subclass reads another Qwen release's tokenizer: edgeav.qwen_text's Qwen2.5 text models).
    required_ids: dict[str, int] = SPECIAL_IDS
    release = "Qwen2.5-Omni"

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[int, AddedToken],
                 source: str = "tokenizer", files: dict[str, bytes] | None = None) -> None:
        self.source = source
        self._files = dict(files or {})
        vocab = dict(vocab)
        text_of_id = {i: t for t, i in vocab.items()}
        for token_id, token in sorted(added.items()):
            if vocab.get(token.content, token_id) != token_id:
                raise OptionError(f"{source}: added token {token.content!r} is id {token_id}, but the vocabulary "
                                  f"has it as {vocab[token.content]}; {_FIX}")
            if text_of_id.get(token_id, token.content) != token.content:
                raise OptionError(f"{source}: added token {token.content!r} and the vocabulary's "
                                  f"{text_of_id[token_id]!r} share id {token_id}; {_FIX}")
            vocab[token.content] = token_id
            text_of_id[token_id] = token.content
        for first, second in merges:
            if first not in vocab or second not in vocab or first + second not in vocab:
                raise OptionError(f"{source}: merge {first!r} {second!r} uses or makes a token that is not in "
                                  f"the vocabulary; {_FIX}")
        self._tokenizer = _qwen2_tokenizer(vocab, merges)
        self._tokenizer.add_tokens([token for _, token in sorted(added.items())])
        for content, expected in self.required_ids.items():
            found = self._tokenizer.token_to_id(content)
            if found != expected:
                have = "not there" if found is None else f"id {found}"
                raise OptionError(f"{source}: {content} is {have}, {self.release}'s is {expected}; use the tokenizer "
                                  f"files that come with the {self.release} checkpoint")
        self._vocab_size = max(text_of_id) + 1

    @classmethod
    def from_dir(cls, path: str | Path) -> QwenTokenizer:
        """Read the tokenizer files of the checkpoint folder ``path``: ``tokenizer.json`` when present, else
        ``vocab.json`` + ``merges.txt``; added tokens from either and ``tokenizer_config.json``, or Qwen2.5-Omni's."""
        folder = Path(path)
        if not folder.is_dir():
            raise OptionError(f"{folder}: no such tokenizer folder; pass the checkpoint folder that holds "
                              f"{TOKENIZER_FILE} (or {VOCAB_FILE} and {MERGES_FILE})")
        files: dict[str, bytes] = {}
        added: dict[int, AddedToken] = {}
        if (folder / TOKENIZER_FILE).is_file():
            files[TOKENIZER_FILE] = _read(folder / TOKENIZER_FILE)
            vocab, merges, added = _parse_tokenizer_json(files[TOKENIZER_FILE], folder / TOKENIZER_FILE)
        elif (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file():
            files[VOCAB_FILE] = _read(folder / VOCAB_FILE)
            files[MERGES_FILE] = _read(folder / MERGES_FILE)
            vocab = _parse_vocab(_parse_json(files[VOCAB_FILE], folder / VOCAB_FILE), folder / VOCAB_FILE)
            merges = _parse_merges(files[MERGES_FILE], folder / MERGES_FILE)
        else:
            raise OptionError(f"{folder}: has no {TOKENIZER_FILE}, nor {VOCAB_FILE} and {MERGES_FILE}; copy the "
                              "tokenizer files of the Qwen2.5-Omni checkpoint into it")
        if (folder / TOKENIZER_CONFIG_FILE).is_file():
            files[TOKENIZER_CONFIG_FILE] = _read(folder / TOKENIZER_CONFIG_FILE)
            config = _parse_json(files[TOKENIZER_CONFIG_FILE], folder / TOKENIZER_CONFIG_FILE)
            added = _merge_added(added, _config_added(config, folder / TOKENIZER_CONFIG_FILE),
                                 folder / TOKENIZER_CONFIG_FILE)
        if not added:
            added = {i: AddedToken(text, special=special, normalized=False)
                     for i, text, special in QWEN_OMNI_ADDED_TOKENS}
        return cls(vocab, merges, added, source=str(folder), files=files)

    def files(self) -> dict[str, bytes]:
        """The tokenizer files this tokenizer was read from, by name, as read."""
        return dict(self._files)

    def save(self, folder: str | Path) -> Path:
        """Write :meth:`files` into ``folder`` (created if needed); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (folder / name).write_bytes(data)
        return folder

    @property
    def vocab_size(self) -> int:
        """One past the largest id: the BPE vocabulary and the added tokens (151665 for Qwen2.5-Omni)."""
        return self._vocab_size

    def known_ids(self) -> set[int]:
        """Every id this tokenizer can decode (a small synthetic vocabulary leaves most of Qwen's unused)."""
        return set(self._tokenizer.get_vocab(with_added_tokens=True).values())

    def token_id(self, token: str) -> int:
        """Id of ``token``, an added token (``<|im_end|>``) or a byte-level BPE piece."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise OptionError(f"{self.source}: has no token {token!r}; special tokens are written like <|im_end|>")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special tokens written in it (``<|im_start|>``) become their ids."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special`` the special tokens (``<|im_end|>``, ...) are left out."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def chat_text(parts: Sequence[tuple[str, str | int]], *, system: str = QWEN_OMNI_SYSTEM) -> str:
    """The Qwen2.5-Omni prompt as text, each media placeholder repeated to its token count.

    ``parts``, in order: ``("text", str)``, ``("image", n)``, ``("video", n)`` or ``("audio", n)``,
    joined with no separator.
    """
    pieces = []
    for part in parts:
        kind, value = part if isinstance(part, tuple) and len(part) == 2 else (None, None)
        if kind == "text" and isinstance(value, str):
            pieces.append(value)
        elif kind in _MEDIA and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            opening, placeholder, closing = _MEDIA[kind]
            pieces.append(opening + placeholder * value + closing)
        else:
            raise OptionError(f"prompt part {part!r}: expected ('text', str) or ('image' | 'video' | 'audio', "
                              "token count >= 1)")
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{''.join(pieces)}<|im_end|>\n"
            "<|im_start|>assistant\n")


def chat_ids(tokenizer: QwenTokenizer, parts: Sequence[tuple[str, str | int]], *,
             system: str = QWEN_OMNI_SYSTEM) -> list[int]:
    """Ids of the Qwen2.5-Omni prompt around ``parts`` (see :func:`chat_text`), encoded as one string."""
    return tokenizer.encode(chat_text(parts, system=system))


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OptionError(f"{path}: cannot be read ({e.strerror}); check that it is a readable file") from None
    if not data:
        raise OptionError(f"{path}: is empty (0 bytes); the download or copy did not finish: {_FIX}")
    if data.startswith(_LFS_POINTER):
        raise OptionError(f"{path}: is a Git LFS pointer, not the file itself; fetch it (git lfs pull) or download "
                          "it again")
    return data


def _parse_json(data: bytes, path: Path) -> dict:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise OptionError(f"{path}: is not UTF-8 text; {_FIX}") from None
    except json.JSONDecodeError as e:
        raise OptionError(f"{path}: is not valid JSON ({e.msg} at line {e.lineno}); {_FIX}") from None
    if not isinstance(parsed, dict):
        raise OptionError(f"{path}: expected a JSON object; {_FIX}")
    return parsed


def _parse_vocab(vocab, path: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()) or \
            min(vocab.values(), default=0) < 0:
        raise OptionError(f"{path}: the vocabulary should be an object of token: id; {_FIX}")
    return vocab


def _merge_pairs(merges: list, path: Path) -> list[tuple[str, str]]:
    """Merges written as "a b" (merges.txt, older tokenizer.json) or ["a", "b"] (newer tokenizer.json)."""
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) if isinstance(m, list) else (m,)
             for m in merges]
    bad = next((m for m, pair in zip(merges, pairs) if len(pair) != 2), None)
    if bad is not None:
        raise OptionError(f"{path}: merge {bad!r} is not a pair of tokens; {_FIX}")
    return pairs


def _parse_merges(data: bytes, path: Path) -> list[tuple[str, str]]:
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise OptionError(f"{path}: is not UTF-8 text; {_FIX}") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return _merge_pairs([line for line in lines if line], path)


def _parse_tokenizer_json(data: bytes, path: Path) -> tuple[dict[str, int], list[tuple[str, str]],
                                                            dict[int, AddedToken]]:
    """The BPE vocabulary, merges and added tokens of a ``tokenizer.json``."""
    spec = _parse_json(data, path)
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        kind = model.get("type") if isinstance(model, dict) else None
        raise OptionError(f"{path}: holds a {kind or 'model-less'} tokenizer, not Qwen2's byte-level BPE; "
                          "use the tokenizer files of the Qwen2.5-Omni checkpoint")
    merges = model.get("merges")
    if not isinstance(merges, list):
        raise OptionError(f"{path}: the BPE model has no merges list; {_FIX}")
    added_list = spec.get("added_tokens") or []
    if not isinstance(added_list, list):
        raise OptionError(f"{path}: added_tokens should be a list; {_FIX}")
    added = {}
    for entry in added_list:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise OptionError(f"{path}: added token {entry!r} has no integer id; {_FIX}")
        added[entry["id"]] = _added_token(entry, path)
    return _parse_vocab(model["vocab"], path), _merge_pairs(merges, path), added


def _added_token(entry, path: Path) -> AddedToken:
    """An added token as the files write it: its text, or an object with content and flags."""
    if isinstance(entry, str):
        return AddedToken(entry, special=True, normalized=False)
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
        raise OptionError(f"{path}: added token {entry!r} has no content text; {_FIX}")
    flags = {key: entry[key] for key in ("special", "lstrip", "rstrip", "single_word", "normalized") if key in entry}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise OptionError(f"{path}: the flags of added token {entry['content']!r} should be true or false; {_FIX}")
    flags.setdefault("special", False)
    flags.setdefault("normalized", not flags["special"])
    return AddedToken(entry["content"], **flags)


def _config_added(config: dict, path: Path) -> dict[int, AddedToken]:
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict) or not all(str(key).isdigit() for key in decoder):
        raise OptionError(f"{path}: added_tokens_decoder should be an object of id: token; {_FIX}")
    return {int(key): _added_token(value, path) for key, value in decoder.items()}


def _merge_added(first: dict[int, AddedToken], second: dict[int, AddedToken], path: Path) -> dict[int, AddedToken]:
    """Both files' added tokens; the same text at two ids, or two texts at one id, is refused."""
    merged = dict(first)
    ids = {token.content: i for i, token in first.items()}
    for token_id, token in second.items():
        if ids.get(token.content, token_id) != token_id or \
                (token_id in merged and merged[token_id].content != token.content):
            raise OptionError(f"{path}: gives added token {token.content!r} id {token_id}, {TOKENIZER_FILE} does not; "
                              f"{_FIX}")
        merged.setdefault(token_id, token)
    return merged


# A few hundred lines of plain English: enough pairs for SYNTHETIC_MERGES merges.
_SYNTHETIC_CORPUS = """\
This is a video and an audio: please answer the question about what you see and hear.
These are two videos and an audio clip. Which video matches the sound?
This is an image and an audio. Please identify the category of the sounding object.
Please answer this question: what is the man playing on the stage?
Please identify the action taking place in the video.
Please judge the person's emotion at the moment.
The bounding box of the sounding object is [12,34,56,78] and the points are [20,30],[40,50],[60,70].
A dog is barking in the yard while a car passes by on the street outside the house.
A woman is playing the piano and a man is singing along with the music in the room.
The baby is crying, the helicopter is flying over the city, and the train is leaving the station.
There are three people talking in the kitchen; one of them is laughing at a joke.
The guitar and the violin play together, then the drum starts and the crowd begins to clap.
Is the sound coming from the left or from the right of the screen? It comes from the left.
The event starts at the second second and ends at the seventh second of the clip.
What is the emotion of the speaker? The speaker sounds happy, then surprised, then calm.
You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and
visual inputs, as well as generating text and speech.
The quick brown fox jumps over the lazy dog near the river bank in the morning light.
Birds are singing in the trees and the wind is blowing through the leaves of the old forest.
An engine is running, a horn is honking, and people are shouting at the busy market.
The answer is yes. The answer is no. The object is a cat. The object is a dog. The object is a bird.
She said that she would come back later, but she never did; they waited for her until night.
We can't hear what they're saying, but it's clear that they've been arguing for a while.
Water is flowing from the tap into the sink, and someone is washing the dishes after dinner.
The audience applauds as the orchestra finishes the symphony with a loud and bright chord.
In the first frame a boy holds a ball; in the last frame the ball is in the air above the field.
"""
SYNTHETIC_MERGES = 400


def write_synthetic_tokenizer(folder: str | Path, *, corpus: str | None = None) -> None:
    """Write a small but real Qwen2-style ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``.

    A byte-level BPE trained on ``corpus`` (default: a built-in English text) with up to
    :data:`SYNTHETIC_MERGES` merges, Qwen2's pre-tokenizer and decoder, and Qwen2.5-Omni's added
    tokens at their real ids (151643-151664) although the learned vocabulary is small: they sit in
    the BPE vocabulary at those ids too, so ``tokenizers`` and transformers keep them there (see the
    module docstring). Same corpus, same bytes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trainer = trainers.BpeTrainer(vocab_size=256 + SYNTHETIC_MERGES, min_frequency=1, show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer = _qwen2_tokenizer({}, [])
    lines = (corpus if corpus is not None else _SYNTHETIC_CORPUS).splitlines(keepends=True)
    tokenizer.train_from_iterator([line for line in lines if line.strip()], trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    vocab += [(text, token_id) for token_id, text, _ in QWEN_OMNI_ADDED_TOKENS]
    merges = _merge_pairs(spec["model"]["merges"], Path("trainer"))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": special}
                         for token_id, text, special in QWEN_OMNI_ADDED_TOKENS],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": dict(vocab), "merges": [list(pair) for pair in merges]},
    }
    special = [text for _, text, is_special in QWEN_OMNI_ADDED_TOKENS if is_special and text != "<|endoftext|>"]
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(token_id): {"content": text, "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "special": is_special}
                                 for token_id, text, is_special in QWEN_OMNI_ADDED_TOKENS},
        "additional_special_tokens": special,
        "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>",
        "audio_token": "<|AUDIO|>",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "image_token": "<|IMAGE|>",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
    }
    for name, content in ((TOKENIZER_FILE, tokenizer_json), (TOKENIZER_CONFIG_FILE, config)):
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
