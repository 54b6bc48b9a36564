"""`phitrain data stats DATA_DIR`: the table of what `prepare` kept and dropped, from `stats.json`."""

from __future__ import annotations

import os
from pathlib import Path

from phitrain.errors import PhitrainError
from phitrain.files import read_json


def read_stats(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "stats.json"
    if not path.is_file():
        raise PhitrainError(f"{data_dir}: no stats.json; run `phitrain data prepare RECIPE.yaml --out {data_dir}`")
    return read_json(path)


def print_stats(stats: dict, console=None) -> None:
    """One row per source: documents read, dropped by reason, dupes, quality, contamination, kept
    documents and tokens per split; then the quality classifier's accuracy and the tokenizer."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=170)  # a log file or pipe: do not squeeze the table into 80 columns
    table = Table(title="prepared data")
    for col in ("source", "read", "dropped (reason)", "exact dupes", "near dupes", "quality kept/scored",
                "contaminated", "train docs", "train tokens", "val docs", "val tokens"):
        table.add_column(col, justify="left" if col in ("source", "dropped (reason)") else "right")
    totals: dict[str, int] = {}
    for name, s in stats["sources"].items():
        drops = s.get("drops", {})
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(drops.items()) if r != "utf8_replaced") or "-"
        if "utf8_replaced" in drops:
            reasons += f" (+{drops['utf8_replaced']} utf8 replaced, kept)"
        read = s.get("read", s.get("extracted", 0))
        scored = s.get("quality_scored", 0)
        row = {"read": read, "exact_dupes": s.get("exact_dupes", 0), "near_dupes": s.get("near_dupes", 0),
               "contaminated": s.get("contaminated", 0), "train_docs": s.get("train_docs", 0),
               "train_tokens": s.get("train_tokens", 0), "val_docs": s.get("val_docs", 0),
               "val_tokens": s.get("val_tokens", 0)}
        for k, v in row.items():
            totals[k] = totals.get(k, 0) + v
        table.add_row(name, f"{read:,}", reasons, f"{row['exact_dupes']:,}", f"{row['near_dupes']:,}",
                      f"{s.get('quality_kept', 0):,}/{scored:,}" if scored else "-", f"{row['contaminated']:,}",
                      f"{row['train_docs']:,}", f"{row['train_tokens']:,}", f"{row['val_docs']:,}",
                      f"{row['val_tokens']:,}")
    table.add_row("total", f"{totals.get('read', 0):,}", "", f"{totals.get('exact_dupes', 0):,}",
                  f"{totals.get('near_dupes', 0):,}", "", f"{totals.get('contaminated', 0):,}",
                  f"{totals.get('train_docs', 0):,}", f"{totals.get('train_tokens', 0):,}",
                  f"{totals.get('val_docs', 0):,}", f"{totals.get('val_tokens', 0):,}", style="bold")
    console.print(table)
    q = stats.get("quality")
    if q:
        acc = q.get("heldout_accuracy")
        console.print(f"quality: {q['kept']:,}/{q['documents']:,} kept ({q['kept_fraction']:.1%}); classifier "
                      f"({q['features']}) held-out accuracy "
                      f"{'n/a' if acc is None else f'{acc:.1%}'} on {q['annotated']:,} annotated"
                      + (f"; {q['note']}" if q.get("note") else ""))
    d = stats.get("decontamination", {})
    if d:
        console.print(f"decontamination: {d.get('document_matches', 0)} document matches, "
                      f"{d.get('exercise_matches', 0)} exercise matches"
                      + (f" ({', '.join(d['task_ids'][:8])}{' ...' if len(d['task_ids']) > 8 else ''})"
                         if d.get("task_ids") else ""))
    t = stats.get("tokenizer", {})
    if t:
        console.print(f"tokenizer: {t['kind']} vocab {t['vocab_size']:,} ({t['dtype']} shards), "
                      f"fingerprint {t['fingerprint'][:12]}; prepare took {stats.get('seconds', {}).get('total', '?')} s")
