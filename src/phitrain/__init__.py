"""phitrain: train phi-style small language models (phi-1, phi-1.5, phi-2, phi-4) end to end."""

__version__ = "0.1.0"
