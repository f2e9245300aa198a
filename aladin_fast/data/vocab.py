"""Word-level tokenisation: the :class:`Tokenizer` protocol and a JSON-serialisable :class:`Vocabulary`.

Captions are lower-cased and split by one regular expression into words
(letters, digits and inner apostrophes: "man's"); punctuation is dropped.
Letters and digits of every script count: text with non-ASCII characters is
first NFKC-normalised and case-folded ("Straße" and "STRASSE" give "strasse",
"ﬁ" gives "fi"), combining marks stay in their word ("naïve", with a composed
or a combining diaeresis, is one word), "’" is an apostrophe and invisible
in-word format characters (soft hyphen, zero-width (non-)joiner, word joiner,
BOM) are removed. ASCII text takes the plain ``[a-z0-9]`` path (same result). Any
tokenizer with ``encode`` / ``decode`` / ``pad_id`` / ``__len__`` (a subword
tokenizer wrapper, say) can replace :class:`Vocabulary` in the collate
functions of :mod:`aladin_fast.data.precomp`.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from typing import Iterable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from .._io import write_text_atomic

__all__ = ["Tokenizer", "Vocabulary", "tokenize", "pad_ids", "PAD", "UNK", "BOS", "EOS"]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3 in every Vocabulary
WORD_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
FORMAT_NAME = "aladin_fast.Vocabulary"
FORMAT_VERSION = 1


# removed before splitting: invisible characters that do not end a word (a zero-width space does)
_IN_WORD_FORMAT = dict.fromkeys(map(ord, "\u00ad\u200c\u200d\u2060\ufeff"))


@functools.lru_cache(maxsize=1)
def _unicode_word_pattern() -> "re.Pattern[str]":
    """WORD_PATTERN for any script: a letter or digit, then letters, digits and combining marks."""
    ranges, start = [], None
    for code in range(sys.maxunicode + 2):
        is_mark = code <= sys.maxunicode and unicodedata.category(chr(code)).startswith("M")
        if is_mark and start is None:
            start = code
        elif not is_mark and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{code - 1:08x}")
            start = None
    part = f"[^\\W_](?:[^\\W_]|[{''.join(ranges)}])*"
    return re.compile(f"{part}(?:'{part})*")


def tokenize(text: str) -> List[str]:
    """Lower-case ``text`` and split it into words; punctuation and whitespace are dropped.

    Non-ASCII text is NFKC-normalised and case-folded first; letters, digits and
    combining marks of any script stay in their word (see the module docstring).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if text.isascii():
        return WORD_PATTERN.findall(text.lower())
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    text = text.translate(_IN_WORD_FORMAT).replace("\u2019", "'")
    return _unicode_word_pattern().findall(text)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    pad_id: int

    def encode(self, text: str, add_special: bool = True) -> List[int]:
        """Token ids of ``text`` (with ``<bos>`` / ``<eos>`` around when ``add_special``)."""
        ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``."""
        ...

    def __len__(self) -> int:
        """Number of ids (the embedding table size)."""
        ...


class Vocabulary:
    """Word <-> id table built from captions.

    Ids 0-3 are ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``; words follow by
    decreasing frequency, ties in alphabetical order (so the same captions
    always give the same ids).

    Args:
        words: the ordinary words, in id order (ids start at 4). Build one from
            text with :meth:`build`.
    """

    def __init__(self, words: Iterable[str] = ()):
        self.itos: List[str] = list(SPECIAL_TOKENS)
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        for word in words:
            if not isinstance(word, str) or not word:
                raise ValueError(f"words must be non-empty strings, got {word!r}")
            if word in self.stoi:
                raise ValueError(f"words contains {word!r} twice (or a special token)")
            self.stoi[word] = len(self.itos)
            self.itos.append(word)

    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: Optional[int] = None) -> "Vocabulary":
        """Vocabulary of the words of ``captions`` seen at least ``min_count`` times.

        ``max_size`` caps the total size (special tokens included), keeping the
        most frequent words.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count!r}")
        if max_size is not None and max_size < len(SPECIAL_TOKENS):
            raise ValueError(f"max_size must be >= {len(SPECIAL_TOKENS)} (the special tokens), got {max_size!r}")
        counts = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max_size - len(SPECIAL_TOKENS)]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, text: str, add_special: bool = True) -> List[int]:
        """Ids of the words of ``text``; unknown words map to ``<unk>`` (id 1)."""
        ids = [self.stoi.get(word, self.unk_id) for word in tokenize(text)]
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Words of ``ids`` joined by spaces; ``<pad>``, ``<bos>``, ``<eos>`` dropped when ``skip_special``."""
        words = []
        for index in ids:
            index = int(index)
            if not 0 <= index < len(self.itos):
                raise ValueError(f"id {index} out of range for a vocabulary of {len(self.itos)}")
            if skip_special and index in (self.pad_id, self.bos_id, self.eos_id):
                continue
            words.append(self.itos[index])
        return " ".join(words)

    def encode_batch(self, texts: Sequence[str], add_special: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Padded ids ``[B, L]`` int64 (``<pad>`` = 0) and lengths ``[B]`` int64."""
        return pad_ids([self.encode(text, add_special) for text in texts], self.pad_id)

    def save(self, path: "os.PathLike[str] | str") -> None:
        """Write the vocabulary as JSON (atomically: a temporary file, then a rename)."""
        payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "special": list(SPECIAL_TOKENS),
                   "words": self.itos[len(SPECIAL_TOKENS):]}
        write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: "os.PathLike[str] | str") -> "Vocabulary":
        """Read a vocabulary written by :meth:`save`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vocabulary file not found: {os.fspath(path)}")
        with open(path, encoding="utf-8") as handle:
            try:
                payload = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"vocabulary file {os.fspath(path)} is not valid JSON: {error}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise ValueError(f"{os.fspath(path)} is not an {FORMAT_NAME} file (missing or wrong 'format')")
        if payload.get("version") != FORMAT_VERSION or payload.get("special") != list(SPECIAL_TOKENS):
            raise ValueError(
                f"{os.fspath(path)}: unsupported version {payload.get('version')!r} or special tokens "
                f"{payload.get('special')!r}; expected version {FORMAT_VERSION} and {list(SPECIAL_TOKENS)}"
            )
        words = payload.get("words")
        if not isinstance(words, list):
            raise ValueError(f"{os.fspath(path)}: 'words' must be a list of strings, got {type(words).__name__}")
        return cls(words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"


def pad_ids(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``[B, L]`` int64 (L = longest) and return ``lengths [B]`` int64."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    out = torch.full((len(sequences), int(lengths.max()) if len(sequences) else 0), pad_id, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.int64)
    return out, lengths
