"""Every document accounted for: counters in DataTrove's per-task stats, and a log of what was dropped.

A step that reads, drops or transforms documents mixes in `Accounting`. Counts go through DataTrove's
own `stat_update` under keys `"<source>|<label>"` (e.g. `stdlib|read`, `stdlib|drop:binary`), so the
executor saves them with the task (`logs/<stage>/stats/NNNNN.json`, written when the task completes) and
a re-run of a finished task never counts it twice. Dropped inputs are also listed, one JSON line each
(`work/dropped/<step>-NNNNN.jsonl`), written whole at the end of the task, so `reports/drops.json` can
show examples of every reason. `read = kept + dropped` holds per source because every step that drops a
document counts it under the source it came from.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text

# Reasons that mean "the input is malformed" (as opposed to a document we chose to filter). A strict
# source raises on these instead of counting them.
MALFORMED = frozenset({"malformed_json", "missing_field", "not_a_string", "invalid_utf8", "binary", "unreadable",
                       "corrupt"})


class Accounting:
    """Mixin for a DataTrove `PipelineStep` (which provides `stat_update`). Call `begin(rank)` at the
    start of `run` and `end()` after the last document."""

    log_name: str = "step"
    drop_dir: str | None = None

    def begin(self, rank: int) -> None:
        self._rank = rank
        self._dropped: list[dict] = []

    def count(self, source: str, label: str, value: int = 1) -> None:
        self.stat_update(f"{source}|{label}", value=value)

    def drop(self, source: str, reason: str, where: str, detail: str = "", strict: bool = False) -> None:
        if strict and reason in MALFORMED:
            raise PhitrainError(f"{where}: {reason.replace('_', ' ')}{': ' + detail if detail else ''} "
                                f"(source {source!r} is strict; set strict: false to count and skip)")
        self.count(source, f"drop:{reason}")
        self._dropped.append({"source": source, "reason": reason, "id": where, "detail": detail})

    def end(self) -> None:
        if self.drop_dir is not None:
            rows = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._dropped)
            atomic_write_text(Path(self.drop_dir) / f"{self.log_name}-{self._rank:05d}.jsonl", rows)


def merge_task_stats(stats_dir: Path) -> Counter:
    """Sum the `"<source>|<label>"` counters of every task's DataTrove stats file in `stats_dir`."""
    total: Counter = Counter()
    for path in sorted(stats_dir.glob("*.json")):
        for step in json.loads(path.read_text()):
            for key, metric in step.get("stats", {}).items():
                if "|" in key:
                    total[key] += int(metric["total"] if isinstance(metric, dict) else metric)
    return total


def drop_examples(drop_dir: Path, per_reason: int = 5) -> dict[str, dict]:
    """`{source: {"counts": {reason: n}, "examples": {reason: [ids...]}}}` from the drop logs, in task
    order (= input order)."""
    out: dict[str, dict] = {}
    for path in sorted(drop_dir.glob("*.jsonl"), key=lambda p: (p.name.rsplit("-", 1)[1], p.name)):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            entry = out.setdefault(row["source"], {"counts": {}, "examples": {}})
            entry["counts"][row["reason"]] = entry["counts"].get(row["reason"], 0) + 1
            examples = entry["examples"].setdefault(row["reason"], [])
            if len(examples) < per_reason:
                examples.append(row["id"])
    return out
