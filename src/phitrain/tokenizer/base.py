"""The tokenizer interface every kind implements, and what the kinds share: the ``<|endoftext|>`` token,
CodeGen's whitespace-run tokens, GPT-2's byte <-> unicode spelling of byte-level vocabularies, and the
saved directory format (an HF ``tokenizer.json`` plus ``phitrain_tokenizer.json`` naming the kind)."""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from collections.abc import Iterable
from typing import Any

from phitrain.errors import PhitrainError
from phitrain.files import atomic_directory

ENDOFTEXT = "<|endoftext|>"

#: CodeGen's added whitespace tokens in insertion order: runs of 31 down to 2 spaces, then 9 down to 2
#: tabs (REFERENCE.md "Tokenizers"). Their ids follow <|endoftext|> in this order.
WHITESPACE_RUNS: tuple[str, ...] = tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1))

# Splitting text at the whitespace runs. Greedy ` {2,31}` tried left to right is the same
# leftmost-longest match HF `tokenizers` uses for added tokens (40 spaces -> 31 + 9; 32 -> 31 + " ").
_WHITESPACE_PATTERN = r" {2,31}|\t{2,9}"
_WHITESPACE_SPLIT = re.compile(f"({_WHITESPACE_PATTERN})")

META_FILE = "phitrain_tokenizer.json"
RANKS_FILE = "ranks.tiktoken"
_META_FORMAT = 1


# ---- GPT-2 byte <-> unicode mapping ------------------------------------------------------------------
# Byte-level BPE vocabularies (GPT-2, CodeGen, HF ByteLevel) store tokens as strings in which every
# byte is one printable character: printable Latin-1 bytes stand for themselves and the other 68 bytes
# are shifted to U+0100.. in byte order (GPT-2 paper §2.2: a byte-level base vocabulary of 256).

def _byte_chars() -> list[str]:
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + shifted))
            shifted += 1
    return chars


_BYTE_CHARS = _byte_chars()
_TO_UNICODE = str.maketrans({chr(b): c for b, c in enumerate(_BYTE_CHARS)})
_FROM_UNICODE = str.maketrans({c: chr(b) for b, c in enumerate(_BYTE_CHARS)})
_UNICODE_ALPHABET = frozenset(_BYTE_CHARS)


def bytes_to_unicode(token: bytes) -> str:
    """A token's bytes as a byte-level BPE vocabulary string (b" the" -> "Ġthe")."""
    return token.decode("latin-1").translate(_TO_UNICODE)


def unicode_to_bytes(token: str) -> bytes:
    """Inverse of `bytes_to_unicode`; the caller checks that every character is in the alphabet."""
    return token.translate(_FROM_UNICODE).encode("latin-1")


# ---- the interface -------------------------------------------------------------------------------

class Tokenizer(abc.ABC):
    """Text <-> token ids, the same way for every kind; picklable for multiprocessing pools.

    Subclasses provide the encoding backend; this class holds what is common: the kind, the
    ``<|endoftext|>`` id, the vocabulary size, padding for the embedding, saving and the fingerprint.
    """

    kind: str
    eos_id: int
    vocab_size: int

    def padded_vocab_size(self, multiple: int = 64) -> int:
        """`vocab_size` rounded up to a multiple, for the model's embedding and lm_head rows.

        Padding keeps matmul shapes aligned (phi-1 pads 50,295 ids to 51,200 and phi-4 100,277 to
        100,352, i.e. ``multiple=1024`` reproduces both); padded rows are never emitted by `encode`
        and are dropped by `decode`.
        """
        if multiple < 1:
            raise PhitrainError(f"padded_vocab_size: multiple must be >= 1, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (special tokens in the text are ordinary text)."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts, on the backend's fast path."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; ids the vocabulary does not assign (embedding padding rows) are dropped."""

    @abc.abstractmethod
    def to_hf_json(self) -> str:
        """The HF ``tokenizer.json`` text that encodes exactly as this tokenizer does."""

    def _meta(self) -> dict[str, Any]:
        return {"format": _META_FORMAT, "kind": self.kind, "eos_token": self.eos_token, "eos_id": self.eos_id,
                "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}

    def _extra_files(self) -> dict[str, str]:
        return {}

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's definition: equal fingerprints encode every text identically.

        Token shards record it, so data tokenised by one tokenizer is never trained with another.
        """

    @property
    def eos_token(self) -> str:
        return ENDOFTEXT

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer as a directory loadable by `load_tokenizer` and `AutoTokenizer`.

        The files are written to a temporary sibling directory that then replaces ``directory``, so a
        crash never leaves a half-written tokenizer behind.
        """
        files = {"tokenizer.json": self.to_hf_json(), **self._extra_files(),
                 "tokenizer_config.json": _dumps(self._hf_config()),
                 "special_tokens_map.json": _dumps(self._special_tokens_map()),
                 META_FILE: _dumps(self._meta())}
        with atomic_directory(directory) as tmp:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")

    def _special_tokens_map(self) -> dict[str, str]:
        # CodeGen / phi-1 use <|endoftext|> as bos, eos and unk alike; phi-4 as bos and eos.
        return {"bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token}

    def _hf_config(self) -> dict[str, Any]:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._special_tokens_map(),
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            # transformers' default clean-up rewrites " ." to "." on decode and breaks round trips.
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, fingerprint={self.fingerprint[:12]})")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()
