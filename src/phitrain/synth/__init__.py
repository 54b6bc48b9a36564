"""Synthetic data from any OpenAI-compatible endpoint (phi-1 §2.2, Phi-4 §2): `phitrain synth`.

`config` (typed recipes), `prompts` (built-in templates), `corpus` (seeds, topics, code), `plan`
(deterministic item variables and seeds), `client` (HTTP + request cache + retries), `generators` (the
kinds), `verify` (code checks), `report` (diversity), `run` (the command).
"""

from phitrain.synth.config import SynthRecipe
from phitrain.synth.run import print_summary, run_synth

__all__ = ["SynthRecipe", "print_summary", "run_synth"]
