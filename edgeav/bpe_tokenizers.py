"""The two BPE tokenizers Pengi runs: GPT-2's byte-level BPE (its caption decoder) and CLIP's BPE (its
prompt encoder), read from a checkpoint's ``vocab.json`` + ``merges.txt`` and built with ``tokenizers``
as the fast tokenizers of Pengi's transformers (4.28) build them.

- GPT-2: byte-level pre-tokenizer (GPT-2's regex, no prefix space), BPE without word-end suffix,
  ``<|endoftext|>`` as the one special token; no token is added around the text. Decoding keeps special
  tokens and applies transformers 4.x's clean-up of spaces before punctuation and contractions
  (``clean_up_tokenization_spaces`` defaulted to true then), as Pengi's decoded captions had it.
- CLIP: NFC, whitespace runs to one space, lower case; words, single digits and punctuation runs;
  byte-level symbols with ``</w>`` ending each word; ``<|startoftext|>`` ... ``<|endoftext|>`` around
  the text. Pengi's ``preprocess_text`` truncates a prompt to ``enc_text_len`` (40) tokens, the end token
  kept last, and pads with ``<|endoftext|>`` (CLIP's pad token) under a zero attention mask.

Pengi stops a caption at the first id of the string ``" <|endoftext|>"`` as GPT-2's tokenizer encodes
it: the special token is matched on its own, so the leading space becomes the lone-space token ``Ġ``
(220), not 50256 (captions that ended in " <|endoftext|>" in training would have taught the model to
emit it last). :attr:`GPT2BPE.stop_token_id` computes it the same way.

:func:`write_synthetic_bpe` writes small but real files for tests and synthetic checkpoints: the 256
byte symbols at GPT-2's ids (so ``!`` is 0 and ``Ġ`` is 220), a few hundred merges learned from Pengi's
prompts and captions, and the special tokens at their real ids (50256; 49406 and 49407), so every id
fits the real vocabulary sizes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edgeav.errors import CheckpointError, OptionError
from edgeav.weight_files import read_json, refuse_unfetched

__all__ = ["CLIPBPE", "GPT2BPE", "PENGI_STOP_TEXT", "write_synthetic_bpe"]

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
END_OF_TEXT = "<|endoftext|>"
START_OF_TEXT = "<|startoftext|>"
WORD_END = "</w>"
PENGI_STOP_TEXT = " <|endoftext|>"  # the wrapper's default stop string
GPT2_END_ID = 50256
CLIP_START_ID, CLIP_END_ID = 49406, 49407

# CLIP's word split: its special tokens, English contractions, letter runs, single digits, punctuation runs.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers 4.x's clean-up of decoded text, applied in this order.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_FIX = "copy the tokenizer files of the checkpoint again"


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in GPT-2's vocabulary order: printable Latin-1 bytes as themselves,
    then the other bytes, in byte order, as the characters from U+0100 on (space is ``Ġ``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _gpt2_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    return tokenizer


def _clip_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix=WORD_END, fuse_unk=False, unk_token=END_OF_TEXT))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(START_OF_TEXT, special=True), AddedToken(END_OF_TEXT, special=True)])
    if START_OF_TEXT in vocab and END_OF_TEXT in vocab:
        tokenizer.post_processor = processors.RobertaProcessing((END_OF_TEXT, vocab[END_OF_TEXT]),
                                                                (START_OF_TEXT, vocab[START_OF_TEXT]),
                                                                trim_offsets=False, add_prefix_space=False)
    return tokenizer


class _BPEFiles:
    """What both tokenizers keep of their files: the vocabulary and the merges, to write them again."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self._vocab, self._merges = dict(vocab), list(merges)

    @classmethod
    def from_dir(cls, folder: str | Path):
        """Read ``vocab.json`` and ``merges.txt`` of ``folder``."""
        vocab, merges = _read_files(Path(folder))
        return cls(vocab, merges, source=str(folder))

    def known_ids(self) -> set[int]:
        """The ids the vocabulary has (a synthetic one has far fewer than the model's rows)."""
        return set(self._vocab.values())

    def save(self, folder: str | Path) -> Path:
        """Write ``vocab.json`` and ``merges.txt`` into ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / VOCAB_FILE).write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        (folder / MERGES_FILE).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges),
                                          encoding="utf-8")
        return folder


class GPT2BPE(_BPEFiles):
    """GPT-2's tokenizer as Pengi's decoder side uses it: the stop token and caption decoding."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "GPT-2 tokenizer"):
        _check_merges(vocab, merges, source)
        if END_OF_TEXT not in vocab:
            raise OptionError(f"{source}: has no {END_OF_TEXT} token; use GPT-2's own {VOCAB_FILE}")
        super().__init__(vocab, merges)
        self.source = source
        self.end_id = vocab[END_OF_TEXT]
        self._tokenizer = _gpt2_pipeline(vocab, merges)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; ``<|endoftext|>`` written in it becomes its id, nothing is added around it."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` as Pengi's captions were decoded: special tokens kept, spaces cleaned up."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        for before, after in _CLEAN_UP:
            text = text.replace(before, after)
        return text

    @property
    def stop_token_id(self) -> int:
        """The first id of ``" <|endoftext|>"``, where Pengi's beam search stops (220, ``Ġ``, in GPT-2)."""
        return self.encode(PENGI_STOP_TEXT)[0]


class CLIPBPE(_BPEFiles):
    """CLIP's tokenizer as Pengi's prompt encoder uses it."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "CLIP tokenizer"):
        _check_merges(vocab, merges, source)
        for token in (START_OF_TEXT, END_OF_TEXT):
            if token not in vocab:
                raise OptionError(f"{source}: has no {token} token; use CLIP's own {VOCAB_FILE}")
        # The text tower pools at the highest id of a prompt: that must be the end token.
        if vocab[END_OF_TEXT] != max(vocab.values()):
            raise OptionError(f"{source}: {END_OF_TEXT} is id {vocab[END_OF_TEXT]}, not the highest id "
                              f"({max(vocab.values())}) as in CLIP; use CLIP's own {VOCAB_FILE}")
        super().__init__(vocab, merges)
        self.source = source
        self.start_id, self.end_id = vocab[START_OF_TEXT], vocab[END_OF_TEXT]
        self._tokenizer = _clip_pipeline(vocab, merges)

    def encode(self, text: str) -> list[int]:
        """``<|startoftext|>``, the ids of ``text`` (lower-cased), ``<|endoftext|>``."""
        return self._tokenizer.encode(text).ids

    def encode_prompts(self, prompts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pengi's prompt batch: ids and attention mask, both [len(prompts), length] int64.

        Each prompt is cut to ``length`` tokens (the end token kept last) and padded with the end token,
        mask 0, as Pengi's ``preprocess_text`` does with ``enc_text_len``.
        """
        if length < 2:
            raise OptionError(f"prompt length {length}: too short for the start and end tokens; use at least 2 "
                              "(Pengi uses 40)")
        if isinstance(prompts, str) or not prompts:
            raise OptionError("prompts: expected a non-empty list of strings, e.g. ['generate audio caption']")
        rows, masks = [], []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > length:
                ids = ids[:length - 1] + [self.end_id]
            rows.append(ids + [self.end_id] * (length - len(ids)))
            masks.append([1] * len(ids) + [0] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.int64), torch.tensor(masks, dtype=torch.int64)


def _check_merges(vocab: dict[str, int], merges: list[tuple[str, str]], source: str) -> None:
    for first, second in merges:
        if first not in vocab or second not in vocab or first + second not in vocab:
            raise OptionError(f"{source}: merge {first!r} {second!r} uses or makes a token that is not in the "
                              f"vocabulary; {_FIX}")


def _read_files(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab_path, merges_path = folder / VOCAB_FILE, folder / MERGES_FILE
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; a BPE tokenizer folder holds {VOCAB_FILE} and {MERGES_FILE}: "
                                  f"{_FIX}")
    vocab = read_json(vocab_path, _FIX)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
        raise CheckpointError(f"{vocab_path}: should map each token to a non-negative id; {_FIX}")
    try:
        data = merges_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{merges_path}: cannot be read ({e.strerror}); {_FIX}") from None
    refuse_unfetched(data[:64], len(data), merges_path)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise CheckpointError(f"{merges_path}: is not UTF-8 text; {_FIX}") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{merges_path}: line {number} is not a pair of tokens; {_FIX}")
        merges.append((pair[0], pair[1]))
    return vocab, merges


# Pengi's prompts and AudioCaps-like captions: enough pairs for SYNTHETIC_MERGES merges.
_SYNTHETIC_CORPUS = """\
generate audio caption. generate metadata. this is a sound of. question: what is the sound?
This is a sound of a dog barking. A dog barks while a car passes by on the street.
A man is speaking and a woman is laughing in a room with people talking in the background.
Birds are chirping and singing in the trees while the wind is blowing through the leaves.
A vehicle engine is running, then a horn honks twice and the engine revs up and accelerates.
Water is flowing from a tap into a sink and someone is washing the dishes after dinner.
A baby is crying, a helicopter flies over the city and a train passes with its whistle blowing.
Music plays: a guitar and a violin, then the drums start and the crowd begins to cheer and clap.
Rain falls on a roof during a thunderstorm; thunder rumbles in the distance.
A cat meows, a clock ticks, footsteps walk on a wooden floor and a door closes with a bang.
this audio contains sound events: speech, dog, vehicle, music, bird, water, wind, rain, siren.
An emergency siren wails as an ambulance drives past; people are shouting at the busy market.
The orchestra finishes the symphony with a loud chord and the audience applauds for 12 seconds.
"""
SYNTHETIC_MERGES = 300
_KINDS = ("gpt2", "clip")


def _learn_merges(words: list[tuple[str, ...]], count: int) -> list[tuple[str, str]]:
    """Greedy BPE learning: ``count`` times, merge the most frequent adjacent pair (ties: the smallest pair,
    so the files never depend on hash order)."""
    frequency = Counter(words)
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in frequency.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged_frequency: Counter[tuple[str, ...]] = Counter()
        for word, n in frequency.items():
            merged, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            merged_frequency[tuple(merged)] += n
        frequency = merged_frequency
    return merges


def write_synthetic_bpe(folder: str | Path, kind: str) -> Path:
    """Write a small but real ``vocab.json`` + ``merges.txt`` for ``kind`` ("gpt2" or "clip") into ``folder``.

    The files read back with :class:`GPT2BPE` / :class:`CLIPBPE` and with transformers' ``GPT2Tokenizer`` /
    ``CLIPTokenizer``; ids stay below the real vocabulary sizes (50257, 49408). Same call, same bytes.
    """
    if kind not in _KINDS:
        raise OptionError(f"synthetic BPE kind {kind!r}: expected one of {', '.join(_KINDS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    pipeline = _gpt2_pipeline({}, []) if kind == "gpt2" else _clip_pipeline({}, [])
    base = symbols if kind == "gpt2" else symbols + [s + WORD_END for s in symbols]
    words = []
    for line in _SYNTHETIC_CORPUS.splitlines():
        text = pipeline.normalizer.normalize_str(line) if pipeline.normalizer else line
        for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str(text):
            word = list(piece)
            if kind == "clip":
                word[-1] += WORD_END
            words.append(tuple(word))
    merges = _learn_merges(words, SYNTHETIC_MERGES)
    vocab = {symbol: i for i, symbol in enumerate(base)}
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    if kind == "gpt2":
        vocab[END_OF_TEXT] = GPT2_END_ID
    else:
        vocab[START_OF_TEXT], vocab[END_OF_TEXT] = CLIP_START_ID, CLIP_END_ID
    (folder / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{first} {second}" for first, second in merges)]
    (folder / MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
