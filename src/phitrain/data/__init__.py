"""The data pipeline (phi-1 §2, Phi-4 §3): sources → clean → dedup → quality → decontaminate → exercises
→ token shards, and the mixture/window loader the trainer consumes (`phitrain.data.windows`, the only
part that imports torch — import it from there)."""

from phitrain.data.pipeline import prepare
from phitrain.data.stats import print_stats, read_stats

__all__ = ["prepare", "print_stats", "read_stats"]
