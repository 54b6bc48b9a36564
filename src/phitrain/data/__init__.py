"""The data pipeline (phi-1 §2, Phi-4 §3): sources → clean → dedup → quality → decontaminate → exercises
→ token shards, and the mixture/window loader the trainer consumes (`phitrain.data.windows`, the only
part that imports torch — import it from there)."""

import os

# DataTrove logs through loguru, whose default sink level comes from this variable when loguru is first
# imported (here, and in every task process, which inherits the environment). Each task's full log is
# kept in work/logs/<stage>/logs/ regardless.
os.environ.setdefault("LOGURU_LEVEL", "WARNING")

from phitrain.data.pipeline import prepare  # noqa: E402
from phitrain.data.stats import print_stats, read_stats  # noqa: E402

__all__ = ["prepare", "print_stats", "read_stats"]
