"""Kinds ``bpe`` and ``hf``: tokenizers run by HF `tokenizers` (a trained byte-level BPE, or any HF
``tokenizer.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from phitrain.errors import PhitrainError
from phitrain.tokenizer.base import ENDOFTEXT, Tokenizer, _sha256_json


class HFBackedTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (a trained BPE or any HF tokenizer.json)."""

    def __init__(self, backend: HFTokenizer, kind: str, eos_token: str, source: str = "tokenizer"):
        self.kind = kind
        self._source = source
        self._eos_token = eos_token
        self._hf = backend
        # Plain text never becomes a special token (package docstring); transformers keeps its own
        # default for the exported file.
        self._hf.encode_special_tokens = True
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise PhitrainError(f"{source}: has no {eos_token!r} token")
        self.eos_id = eos_id
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._fingerprint: str | None = None

    @property
    def eos_token(self) -> str:
        return self._eos_token

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        n = self.vocab_size
        return self._hf.decode([i for i in ids if 0 <= i < n], skip_special_tokens=False)

    def to_hf_json(self) -> str:
        return self._hf.to_str(pretty=True)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            definition = json.loads(self._hf.to_str())
            definition["added_tokens"] = sorted(definition.get("added_tokens", []), key=lambda t: t["id"])
            self._fingerprint = _sha256_json({"backend": "tokenizers", "eos": self._eos_token,
                                              "definition": definition})
        return self._fingerprint

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "json": self._hf.to_str(), "eos_token": self._eos_token, "source": self._source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]), state["kind"], state["eos_token"], state["source"])


def _read_hf_tokenizer(path: Path) -> HFTokenizer:
    if not path.is_file():
        raise PhitrainError(f"{path}: no such file")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PhitrainError(f"{path}: not a valid HF tokenizer.json ({first})") from None


def _hf_eos_token(backend: HFTokenizer, directory: Path, source: str) -> str:
    """<|endoftext|> when the vocabulary has it, else the eos_token named in tokenizer_config.json."""
    if backend.token_to_id(ENDOFTEXT) is not None:
        return ENDOFTEXT
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = directory / name
        if cfg.is_file():
            try:
                eos = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token")
            except (json.JSONDecodeError, AttributeError):
                raise PhitrainError(f"{cfg}: not a JSON object") from None
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and backend.token_to_id(eos) is not None:
                return eos
    raise PhitrainError(f"{source}: has no {ENDOFTEXT!r} token and no usable eos_token in "
                        f"{directory}/tokenizer_config.json; add one so documents can be separated")


def hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Kind ``hf``: any HF ``tokenizer.json`` (a file, or a directory that holds one)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    backend = _read_hf_tokenizer(file)
    return HFBackedTokenizer(backend, "hf", _hf_eos_token(backend, file.parent, str(file)), str(file))
