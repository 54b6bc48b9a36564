"""Cleaning: decode, drop what is not usable text, normalise line endings.

Each rejected document gets one reason ("binary", "invalid_utf8", "too_large", "empty", "too_short") that
the pipeline counts per source, so the stats account for every input document.
"""

from __future__ import annotations

from datatrove.pipeline.base import PipelineStep

from phitrain.config import CleanConfig
from phitrain.data.accounting import Accounting

_SNIFF = 8192  # a NUL byte in the first 8 KiB marks a binary file, as git and grep decide


def clean_document(payload: bytes | str, cfg: CleanConfig) -> tuple[str | None, str]:
    """Return `(text, "")` for a kept document or `(None, reason)` for a dropped one. An invalid UTF-8
    byte with `invalid_utf8: replace` becomes U+FFFD and is reported as reason "utf8_replaced" (kept)."""
    note = ""
    if isinstance(payload, bytes):
        if len(payload) > cfg.max_bytes:
            return None, "too_large"
        if b"\x00" in payload[:_SNIFF]:
            return None, "binary"
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            if cfg.invalid_utf8 == "skip":
                return None, "invalid_utf8"
            text = payload.decode("utf-8", errors="replace")
            note = "utf8_replaced"
    else:
        text = payload
        if len(text.encode("utf-8", errors="replace")) > cfg.max_bytes:
            return None, "too_large"
        if "\x00" in text[:_SNIFF]:
            return None, "binary"
    if text.startswith("\ufeff"):
        text = text[1:]
    if cfg.normalize_newlines and "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        return None, "empty"
    if len(text) < cfg.min_chars:
        return None, "too_short"
    return text, note


class Clean(Accounting, PipelineStep):
    """Pipeline step: decode file payloads and clean every document, dropping (and counting by reason)
    what is not usable text. `strict` sources raise on malformed input (binary, invalid UTF-8)."""

    name = "🧹 clean"
    type = "phitrain"
    log_name = "clean"

    def __init__(self, cfg: CleanConfig, strict_sources: list[str], drop_dir: str | None = None):
        super().__init__()
        self.cfg, self.strict, self.drop_dir = cfg, set(strict_sources), drop_dir

    def run(self, data, rank: int = 0, world_size: int = 1):
        from phitrain.data.sources import PAYLOAD

        self.begin(rank)
        for doc in data:
            source = doc.metadata["source"]
            text, reason = clean_document(doc.metadata.pop(PAYLOAD, doc.text), self.cfg)
            if text is None:
                self.drop(source, reason, doc.id, strict=source in self.strict)
                continue
            if reason:   # utf8_replaced: kept, but counted and listed with the drops
                self.count(source, reason)
                self._dropped.append({"source": source, "reason": reason, "id": doc.id, "detail": "kept"})
            doc.text = text
            self.count(source, "cleaned")
            yield doc
        self.end()
