"""What `torch.compile` leaves behind for the next run: inductor's cache, and how long compiling took.

Compiling phi-1-tiny's block for training takes ~30 s on 2 CPU cores the first time and a few seconds
when inductor finds its generated kernels in its cache. Inductor's default cache lives under the
system's temporary directory (gone after a reboot, shared by everything); phitrain keeps it in its own
cache directory instead, unless the user set `TORCHINDUCTOR_CACHE_DIR`. Beside it, `compile_seconds.json`
records how long the last compile of each configuration took, so that `compile: auto` can weigh the
cost it will actually pay (cold or cached) against the time compiling saves.

The directory is `$PHITRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/phitrain`, else `~/.cache/phitrain`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from phitrain.files import atomic_write_text

TIMES_FILE = "compile_seconds.json"


def cache_dir() -> Path:
    if os.environ.get("PHITRAIN_CACHE_DIR"):
        return Path(os.environ["PHITRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "phitrain"


def keep_inductor_cache() -> None:
    """Point inductor's cache at phitrain's cache directory (read by inductor at its first compile)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def config_key(**parts) -> str:
    """A short stable key for a compiled configuration (model config, shapes, precision, versions)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read() -> dict:
    path = cache_dir() / TIMES_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}          # absent, or unreadable: then nothing is known, which is the safe answer
    return data if isinstance(data, dict) else {}


def last_compile_seconds(key: str) -> float | None:
    value = _read().get(key)
    return float(value) if isinstance(value, (int, float)) else None


def record_compile_seconds(key: str, seconds: float) -> None:
    data = _read()
    data[key] = round(float(seconds), 2)
    path = cache_dir() / TIMES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
