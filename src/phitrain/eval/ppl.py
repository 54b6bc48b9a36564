"""Held-out perplexity and bits per byte on text files.

Held-out loss is how the phi-1 paper (§2.3) and the Phi-4 report (§3) track training; bits per byte makes
models with different tokenizers comparable (it divides by UTF-8 bytes, not tokens). Each file is one
document, scored from an EOS boundary in disjoint windows of the model's context (`rolling_logprob`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from phitrain.errors import PhitrainError
from phitrain.eval.loglik import load_for_eval, print_table, rolling_logprob


def text_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files given directly, or every *.txt / *.py / *.md under given directories (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".py", ".md"))
        elif path.is_file():
            files.append(path)
        else:
            raise PhitrainError(f"{path}: no such file or directory")
    if not files:
        raise PhitrainError(f"no text files in {', '.join(map(str, inputs))}")
    return files


def perplexity(model, tokenizer, texts: list[str], *, batch_size: int = 8) -> dict[str, Any]:
    """Token perplexity, mean loss (nats/token) and bits per byte over the texts."""
    nll = 0.0
    n_tokens = n_bytes = 0
    for text in texts:
        tokens = tokenizer.encode(text)
        if not tokens:
            continue
        nll -= rolling_logprob(model, tokens, tokenizer.eos_id, batch_size=batch_size)
        n_tokens += len(tokens)
        n_bytes += len(text.encode("utf-8"))
    if n_tokens == 0:
        raise PhitrainError("the texts are empty: nothing to score")
    return {"documents": len(texts), "tokens": n_tokens, "bytes": n_bytes, "loss": nll / n_tokens,
            "perplexity": math.exp(nll / n_tokens), "bits_per_byte": nll / math.log(2) / n_bytes}


def run_ppl(*, checkpoint: str, inputs: list[str], batch_size: int = 8, device: str = "cpu") -> dict[str, Any]:
    """The `phitrain eval ppl` command: a table and a final JSON line."""
    files = text_files(inputs)
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise PhitrainError(f"{f}: not UTF-8 text") from None
    model, tokenizer = load_for_eval(checkpoint, device)
    result = perplexity(model, tokenizer, texts, batch_size=batch_size)
    print_table("held-out perplexity", result)
    print(json.dumps(result))
    return result
