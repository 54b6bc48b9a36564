"""Training kind ``bpe``: a byte-level BPE on the corpus (HF `tokenizers`), plus CodeGen's 38
whitespace-run tokens. The offline default for small models: phi-1's own tokenizer is GPT-2's, whose
ranks no small package ships (REFERENCE.md "Tokenizers")."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from phitrain.errors import PhitrainError
from phitrain.tokenizer.base import ENDOFTEXT, WHITESPACE_RUNS, _WHITESPACE_PATTERN, Tokenizer
from phitrain.tokenizer.hf import HFBackedTokenizer

log = logging.getLogger(__name__)

#: Suffixes read when a training input is a directory (explicitly named files are read whatever
#: their suffix).
TEXT_SUFFIXES = frozenset(
    ".py .pyi .txt .md .rst .json .yaml .yml .toml .cfg .ini .c .h .cc .cpp .hpp .java .js .ts .go .rs .sh"
    " .html .css .tex .sql".split()
)
_MIN_VOCAB = 256 + 1 + len(WHITESPACE_RUNS)  # every byte, <|endoftext|>, the whitespace runs
_CHUNK_CHARS = 1 << 20


def _iter_input_files(inputs: list[str | os.PathLike]) -> Iterator[Path]:
    for item in inputs:
        path = Path(item)
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        else:
            raise PhitrainError(f"{path}: no such file or directory (to train on strings, pass an iterator "
                                "of texts, e.g. iter(texts))")


class _TrainingTexts:
    """Texts of the training inputs, chunked to about 1 MB; counts what it read and skipped."""

    def __init__(self, inputs: list[str | os.PathLike] | Iterable[str]):
        self.inputs = inputs
        self.files = self.skipped = self.chars = 0

    def __iter__(self) -> Iterator[str]:
        if isinstance(self.inputs, (list, tuple)):
            for path in _iter_input_files(list(self.inputs)):
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    self.skipped += 1
                    continue
                self.files += 1
                yield from self._chunks(text)
        else:
            for text in self.inputs:
                if not isinstance(text, str):
                    raise PhitrainError(f"train_bpe: expected an iterable of str, got an item of type "
                                        f"{type(text).__name__}")
                yield from self._chunks(text)

    def _chunks(self, text: str) -> Iterator[str]:
        self.chars += len(text)
        start = 0
        while len(text) - start > _CHUNK_CHARS:
            cut = text.rfind("\n", start, start + _CHUNK_CHARS) + 1 or start + _CHUNK_CHARS
            yield text[start:cut]
            start = cut
        if start < len(text):
            yield text[start:]


def train_bpe(inputs: list[str | os.PathLike] | Iterable[str], vocab_size: int,
              out_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Train kind ``bpe``: a byte-level BPE with CodeGen's 38 whitespace-run tokens.

    ``inputs`` is a list of files and/or directories (directories are searched recursively for
    `TEXT_SUFFIXES`; files that are not UTF-8 are skipped and counted) or any other iterable of
    strings. ``vocab_size`` counts every id: the 256 bytes, ``<|endoftext|>`` (id 0), the learned merges
    and the whitespace runs (the last 38 ids). The trainer does not see whitespace runs, so no merges
    are spent on indentation the added tokens already cover. With ``out_dir`` the result is saved there.
    """
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
        raise PhitrainError(f"vocab_size {vocab_size!r} is too small: a byte-level BPE needs at least "
                            f"{_MIN_VOCAB} ids (256 bytes + {ENDOFTEXT} + {len(WHITESPACE_RUNS)} whitespace runs)")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    texts = _TrainingTexts(inputs)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WHITESPACE_PATTERN), behavior="removed"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(WHITESPACE_RUNS),
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if texts.chars == 0:
        raise PhitrainError(f"train_bpe: no training text found in {_describe_inputs(inputs)}")
    log.info("train_bpe: %d file(s), %d characters", texts.files, texts.chars)
    if texts.skipped:
        log.warning("train_bpe: skipped %d file(s) that are not readable UTF-8 text", texts.skipped)
    # The encoding pipeline is plain GPT-2 byte-level; the whitespace runs are split off by the
    # added tokens before pre-tokenization, as in CodeGen's tokenizer.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in WHITESPACE_RUNS])
    result = HFBackedTokenizer(tok, "bpe", ENDOFTEXT, "trained BPE")
    if result.vocab_size < vocab_size:
        log.warning("train_bpe: corpus too small for %d ids; got %d", vocab_size, result.vocab_size)
    if out_dir is not None:
        result.save(out_dir)
    return result


def _describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, (list, tuple)):
        return ", ".join(str(p) for p in inputs) or "an empty list"
    return "the given texts"
