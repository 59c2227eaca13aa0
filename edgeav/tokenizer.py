"""The LLaMA-family tokenizer of the systems built on LLaMA (Crab, u-LLaVA): a sentencepiece
model, the settings of its ``tokenizer_config.json``, the system's added tokens and chat
template (an :class:`AddedVocabulary` from the system's package).

Prompt ids are those of the slow sentencepiece ``LlamaTokenizer`` the systems' authors ran
(transformers 4.x), built from ``tokenizer.model`` and ``tokenizer_config.json``, with the
system's tokens added by ``add_tokens`` (Crab: 11 special, then ``<mask_0..5>`` as ordinary
added tokens). Crab's scripts render the chat template to a string that starts with the BOS token's text
and turn it into ids with ``tokenize`` + ``convert_tokens_to_ids``; so does
:meth:`Tokenizer.encode_chat`. What that tokenizer does, and so what this one does:

- Text is split at added tokens (the system's and the special tokens ``<s>``, ``</s>``,
  ``<unk>``), honouring each one's ``lstrip``/``rstrip``/``single_word``.
- ``legacy=True``: every piece of text between added tokens is encoded on its own
  with sentencepiece's dummy prefix (a leading ``▁``).
- ``legacy=False``: ``▁`` is put in front of the whole text only; the pieces are
  encoded without a dummy prefix, a piece starting with a space through the
  ``<unk>`` trick, and the leading ``▁`` is dropped when a special token follows it.
  Crab's AVE and S4 prompts come out 2 tokens shorter than in legacy mode.
- No ``legacy`` key (or no file): legacy mode, transformers 4.x's default. Version
  5 defaults to ``legacy=False`` instead; Crab was run with 4.37.2, so we follow 4.x.
- ``add_bos_token``/``add_eos_token`` only act where special tokens are added
  (``encode(text, add_special_tokens=True)``, like ``tokenizer(text)``); the chat
  prompt's BOS comes from the template's text.

:meth:`Tokenizer.save` writes the settings beside the model, so converted
checkpoints and engines keep them.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import sentencepiece as spm

from edgeav.config import LLMConfig
from edgeav.errors import CheckpointError
from edgeav.weight_files import read_json, refuse_unfetched

log = logging.getLogger("edgeav")

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPIECE_UNDERLINE = "\u2581"
# transformers 4.x (Crab ran 4.37.2) reads an absent or null "legacy" as True.
DEFAULT_LEGACY = True
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FLAGS = ("lstrip", "rstrip", "single_word")
# Wire format: field 3 (length 2) = { field 3 (varint) = 0 }.
_NO_DUMMY_PREFIX = bytes([3 << 3 | 2, 2, 3 << 3 | 0, 0])


@dataclass(frozen=True)
class AddedVocabulary:
    """A system's tokens after the base vocabulary and its chat prompt.

    Attributes:
        tokens: the added tokens' text, in id order from the base vocabulary's size.
        special: those of them the system added as special tokens (skipped by nothing, but
            never split by the text around them, as transformers treats them).
        chat: the chat template: the user's instruction -> the prompt text after BOS.
    """

    tokens: tuple[str, ...]
    special: frozenset[str]
    chat: Callable[[str], str]


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the raw text before sentencepiece runs (Hugging Face's ``AddedToken``)."""

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    """What ``LlamaTokenizer`` takes from ``tokenizer_config.json``; defaults are those of an absent file."""

    legacy: bool = DEFAULT_LEGACY
    add_bos_token: bool = True
    add_eos_token: bool = False
    # Special tokens by their config key (bos_token, eos_token, unk_token, pad_token, ...).
    special: dict[str, AddedToken] = field(default_factory=lambda: {
        "bos_token": AddedToken("<s>"), "eos_token": AddedToken("</s>"), "unk_token": AddedToken("<unk>")})
    additional_special: tuple[AddedToken, ...] = ()
    # added_tokens_decoder entries (id -> token) inside the base vocabulary.
    added: dict[int, AddedToken] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict, source: str = TOKENIZER_CONFIG_FILE) -> "TokenizerSettings":
        """Settings from the parsed JSON of ``tokenizer_config.json``; a value of the wrong type is refused."""
        if not isinstance(config, dict):
            raise CheckpointError(f"{source}: expected a JSON object; copy tokenizer_config.json again")
        defaults = cls()
        flags = {}
        for key in ("legacy", "add_bos_token", "add_eos_token"):
            value = config.get(key)
            if value is not None and not isinstance(value, bool):
                raise CheckpointError(f"{source}: {key} is {value!r}, expected true, false or null; fix the file")
            flags[key] = getattr(defaults, key) if value is None else value
        if config.get("legacy") is None:
            log.info("%s: no legacy setting; using legacy=True as transformers 4.x (Crab's) does", source)
        special = dict(defaults.special)
        for key in _SPECIAL_TOKEN_KEYS:
            if key in config:
                token = _added_token(config[key], f"{source}: {key}")
                if token is None:
                    special.pop(key, None)
                else:
                    special[key] = token
        extra = config.get("additional_special_tokens") or []
        if not isinstance(extra, list):
            raise CheckpointError(f"{source}: additional_special_tokens should be a list; fix the file")
        additional = tuple(_added_token(t, f"{source}: additional_special_tokens") for t in extra)
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise CheckpointError(f"{source}: added_tokens_decoder should be an object of id: token; fix the file")
        added = {}
        for key, value in decoder.items():
            if not str(key).isdigit():
                raise CheckpointError(f"{source}: added_tokens_decoder key {key!r} is not a token id; fix the file")
            added[int(key)] = _added_token(value, f"{source}: added_tokens_decoder[{key}]", special_default=False)
        return cls(**flags, special=special, additional_special=tuple(t for t in additional if t), added=added)

    def to_config(self) -> dict:
        """The ``tokenizer_config.json`` that gives these settings (also to transformers' ``from_pretrained``)."""
        config: dict = {"tokenizer_class": "LlamaTokenizer", "legacy": self.legacy,
                        "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token}
        config.update({key: _token_config(token) for key, token in self.special.items()})
        config.setdefault("pad_token", None)
        if self.additional_special:
            config["additional_special_tokens"] = [_token_config(t) for t in self.additional_special]
        if self.added:
            config["added_tokens_decoder"] = {str(i): {"content": t.content, "special": t.special, "normalized": False,
                                                       **{f: getattr(t, f) for f in _FLAGS}}
                                              for i, t in sorted(self.added.items())}
        config["clean_up_tokenization_spaces"] = False
        return config


def _token_config(token: AddedToken) -> str | dict:
    if not any(getattr(token, f) for f in _FLAGS):
        return token.content
    return {"__type": "AddedToken", "content": token.content, "normalized": False,
            **{f: getattr(token, f) for f in _FLAGS}}


def _added_token(value, where: str, special_default: bool = True) -> AddedToken | None:
    """A token as tokenizer_config.json writes it: a string, an AddedToken object, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=special_default)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {f: value.get(f, False) for f in ("special", *_FLAGS)}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise CheckpointError(f"{where}: the flags of {value['content']!r} should be true or false; fix the file")
        if "special" not in value:
            flags["special"] = special_default
        return AddedToken(value["content"], **flags)
    raise CheckpointError(f"{where}: expected a token string or an object with a content string, got {value!r}")


class Tokenizer:
    """Encode and decode a system's prompts and outputs, id for id as its authors ran their tokenizer.

    Args:
        model_proto: the serialised sentencepiece model (the bytes of ``tokenizer.model``).
        llm: the LLM config; its ``base_vocab_size`` must equal the model's piece count.
        vocabulary: the system's added tokens and chat template.
        source: where the model came from, for error messages.
        settings: what ``tokenizer_config.json`` says (default: as if it were absent).
    """

    def __init__(self, model_proto: bytes, llm: LLMConfig, vocabulary: AddedVocabulary, source: str = "tokenizer",
                 settings: TokenizerSettings | None = None) -> None:
        refuse_unfetched(model_proto[:64], len(model_proto), source)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{source}: not a sentencepiece model ({e}); re-copy tokenizer.model") from None
        if self._sp.get_piece_size() != llm.base_vocab_size:
            raise CheckpointError(
                f"{source}: has {self._sp.get_piece_size()} pieces but the model config expects "
                f"{llm.base_vocab_size}; use the tokenizer that ships with this checkpoint"
            )
        self.model_proto = model_proto
        self.settings = settings or TokenizerSettings()
        self.source = source
        self.base_vocab_size = llm.base_vocab_size
        if len(vocabulary.tokens) != llm.num_added_tokens:
            raise CheckpointError(f"{source}: the model config adds {llm.num_added_tokens} tokens, the system "
                                  f"{len(vocabulary.tokens)}; use the config that comes with this checkpoint")
        self.vocabulary = vocabulary
        self._system_tokens = {token: llm.base_vocab_size + i for i, token in enumerate(vocabulary.tokens)}
        self._added_by_id = {i: t for t, i in self._system_tokens.items()}
        self._added = self._added_tokens()
        self._ids = {content: token_id for content, (token_id, _) in self._added.items()}
        # transformers' all_special_tokens: the named special tokens, the additional ones, the system's special ones.
        self._special = {t.content for t in (*self.settings.special.values(), *self.settings.additional_special)}
        self._special |= set(vocabulary.special)
        # Longest first, so a token that starts another never cuts it short.
        contents = sorted(self._added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(c) for c in contents) + ")")
        self.bos_id = self._special_id("bos_token", llm.bos_id)
        self.eos_id = self._special_id("eos_token", llm.eos_id)
        self._plain = self._without_dummy_prefix() if not self.settings.legacy else None
        if self._plain is not None:
            if "unk_token" not in self.settings.special:
                raise CheckpointError(f"{source}: legacy=False needs an unk_token in {TOKENIZER_CONFIG_FILE}; "
                                      "use the tokenizer files that come with the model")
            self._unk_length = len(self._plain.encode(self.settings.special["unk_token"].content, out_type=str))

    def _added_tokens(self) -> dict[str, tuple[int, AddedToken]]:
        """Every token matched in raw text: content -> (id, flags)."""
        settings, where = self.settings, f"{self.source} ({TOKENIZER_CONFIG_FILE})"
        added: dict[str, tuple[int, AddedToken]] = {}
        for token_id, token in sorted(settings.added.items()):
            if token_id >= self.base_vocab_size:
                if self._system_tokens.get(token.content) != token_id:
                    raise CheckpointError(
                        f"{where}: adds {token.content!r} as id {token_id}, beyond the {self.base_vocab_size}-piece "
                        "vocabulary where Crab's own tokens go; use the base Llama-2 tokenizer files")
                continue
            added[token.content] = (token_id, token)
        for token in (*settings.special.values(), *settings.additional_special):
            if token.content not in added:
                added[token.content] = (self._piece_id(token.content, where), token)
        for content, token_id in self._system_tokens.items():
            added[content] = (token_id, AddedToken(content, special=content in self.vocabulary.special))
        return added

    def _piece_id(self, content: str, where: str) -> int:
        token_id = self._sp.piece_to_id(content)
        if self._sp.id_to_piece(token_id) != content:
            raise CheckpointError(f"{where}: special token {content!r} is not in tokenizer.model's vocabulary; "
                                  "use the tokenizer files that come with the model")
        return token_id

    def _special_id(self, key: str, expected: int) -> int:
        token = self.settings.special.get(key)
        if token is None or self._ids[token.content] != expected:
            found = "none" if token is None else f"{token.content!r} (id {self._ids[token.content]})"
            raise CheckpointError(f"{self.source}: {TOKENIZER_CONFIG_FILE}'s {key} is {found}, the model config "
                                  f"expects id {expected}; use the tokenizer files that come with this checkpoint")
        return expected

    def _without_dummy_prefix(self) -> spm.SentencePieceProcessor:
        """The model with ``normalizer_spec.add_dummy_prefix = false``, as transformers builds it for legacy=False."""
        processor = spm.SentencePieceProcessor()
        # A protobuf parser merges a repeated message field, so an appended normalizer_spec (field 3) holding
        # only add_dummy_prefix (its field 3) = 0 overrides that one value; no protobuf package needed.
        processor.LoadFromSerializedProto(self.model_proto + _NO_DUMMY_PREFIX)
        return processor

    @classmethod
    def from_file(cls, path: str | Path, llm: LLMConfig, vocabulary: AddedVocabulary,
                  config: str | Path | None = None) -> "Tokenizer":
        """Read ``tokenizer.model`` (or the folder holding it) and the ``tokenizer_config.json`` beside it
        (``config`` names another one); without that file the defaults of an absent file apply."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no tokenizer model; the checkpoint folder needs {TOKENIZER_FILE}")
        config_path = Path(config) if config is not None else path.with_name(TOKENIZER_CONFIG_FILE)
        settings = None
        if config is not None or config_path.is_file():
            settings = TokenizerSettings.from_config(read_json(config_path), str(config_path))
        return cls(path.read_bytes(), llm, vocabulary, source=str(path), settings=settings)

    def files(self) -> dict[str, bytes]:
        """What :meth:`save` writes: ``tokenizer.model`` and ``tokenizer_config.json``, by name."""
        config = json.dumps(self.settings.to_config(), indent=2) + "\n"
        return {TOKENIZER_FILE: self.model_proto, TOKENIZER_CONFIG_FILE: config.encode()}

    def save(self, folder: str | Path) -> Path:
        """Write :meth:`files` into ``folder``; returns the path of ``tokenizer.model``."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (Path(folder) / name).write_bytes(data)
        return Path(folder) / TOKENIZER_FILE

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self._system_tokens)

    def token_id(self, token: str) -> int:
        """Id of one of the system's added tokens (Crab's ``<video>``, ``<mask_0>``, ...)."""
        return self._system_tokens[token]

    def tokenize(self, text: str) -> list[str]:
        """Tokens of ``text`` as strings: sentencepiece pieces and added tokens (``LlamaTokenizer.tokenize``)."""
        legacy = self.settings.legacy
        if not legacy and text:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        chunks = self._split.split(text)
        for i in range(1, len(chunks), 2):  # odd indexes are the added tokens
            token = self._added[chunks[i]][1]
            left, right = chunks[i - 1], chunks[i + 1]
            if token.rstrip and right:
                chunks[i + 1] = right = right.lstrip()
            if token.lstrip and left:
                chunks[i - 1] = left = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                chunks[i - 1] += chunks[i]
                chunks[i] = ""
            elif token.single_word and right and right[0] != " ":
                chunks[i + 1] = chunks[i] + right
                chunks[i] = ""
        tokens: list[str] = []
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            tokens.extend([chunk] if i % 2 else self._pieces(chunk))
        if not legacy and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._special:
            tokens = tokens[1:]
        return tokens

    def _pieces(self, text: str) -> list[str]:
        if self._plain is None:
            return self._sp.encode(text, out_type=str)
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self._plain.encode(text, out_type=str)
        # Without the dummy prefix sentencepiece drops a leading "▁"; an <unk> in front keeps it.
        pieces = self._plain.encode(self.settings.special["unk_token"].content + text, out_type=str)
        return pieces[self._unk_length:] if len(pieces) >= self._unk_length else pieces

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self._ids[t] if t in self._ids else self._sp.piece_to_id(t) for t in tokens]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS and EOS as ``add_bos_token``/``add_eos_token``
        say (as ``tokenizer(text)`` does)."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if add_special_tokens:
            ids = [self.bos_id] * self.settings.add_bos_token + ids + [self.eos_id] * self.settings.add_eos_token
        return ids

    def encode_chat(self, instruction: str) -> list[int]:
        """Ids of the chat prompt around ``instruction``, BOS first: the template's text, tokenized."""
        return self.encode(self.settings.special["bos_token"].content + self.vocabulary.chat(instruction))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the system's added tokens are written out, BOS and EOS dropped."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._added_by_id:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._added_by_id[i])
            elif i not in (self.bos_id, self.eos_id):
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)


# A synthetic corpus supports a few hundred learned pieces; larger vocabularies
# (crab-7b's 32000) are filled up with unused placeholder pieces.
LEARNED_PIECES = 512


def train_sentencepiece(corpus: Iterable[str], vocab_size: int) -> bytes:
    """Train a small Llama-style BPE sentencepiece model (unk 0, bos 1, eos 2, byte
    fallback so any text encodes) with exactly ``vocab_size`` pieces, for synthetic
    checkpoints. Deterministic for a given corpus: one thread, no sampling."""
    model = io.BytesIO()
    fillers = [f"<unused_{i}>" for i in range(max(0, vocab_size - LEARNED_PIECES))]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in corpus if line.strip()]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        hard_vocab_limit=True,
        user_defined_symbols=fillers,
        minloglevel=2,
    )
    return model.getvalue()
