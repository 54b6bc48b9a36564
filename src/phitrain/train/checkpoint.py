"""Trainer checkpoints: a model checkpoint directory plus `trainer_state.pt` and a `COMPLETE` marker.

Layout (DESIGN.md): `checkpoints/step-NNNNNN/{model.safetensors, config.yaml, tokenizer/, trainer_state.pt,
COMPLETE}`, plus the sharded state of FSDP2 (`dcp/`) or DeepSpeed (`deepspeed/`) runs, which every rank
writes. The directory is assembled under a temporary name and renamed into place, with COMPLETE
written last inside it, so a process killed at any instant leaves either no `step-N` directory or a
complete one; leftovers of interrupted writes (`.step-staging-*`) are removed at the next start.
`trainer_state.pt` holds everything an exact resume needs: optimizer, scheduler, grad scaler, data loader
position, every RNG state, and counters.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from phitrain.checkpoint import replace_directory, write_model_files

STATE_FILE = "trainer_state.pt"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:06d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_checkpoint(checkpoints: Path, step: int, model, tokenizer, trainer_state: dict) -> Path:
    """Write step-N atomically; `model` is the plain (unwrapped) module with full weights."""
    return finish_train_checkpoint(new_staging_dir(checkpoints), checkpoints, step, model, tokenizer, trainer_state)


def new_staging_dir(checkpoints: Path) -> Path:
    """An empty hidden directory next to the checkpoints. Distributed saves share one (rank 0 makes it
    and broadcasts its name): every rank writes its shards into it before rank 0 finishes it."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".step-staging-", dir=checkpoints))


def finish_train_checkpoint(staging: Path, checkpoints: Path, step: int, model, tokenizer,
                            trainer_state: dict) -> Path:
    """Add model files, trainer_state.pt and COMPLETE (last) to `staging`, then rename it to step-N, so at
    every instant a complete step-N exists or none does."""
    target = step_dir(checkpoints, step)
    try:
        write_model_files(staging, model, tokenizer)
        torch.save(trainer_state, staging / STATE_FILE)
        _fsync_write(staging / COMPLETE, f"step {step}\n")
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for d in checkpoints.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def clean_partial(checkpoints: Path) -> int:
    """Remove temporary or incomplete checkpoint directories left by a crash; returns how many."""
    if not checkpoints.is_dir():
        return 0
    removed = 0
    for d in checkpoints.iterdir():
        if d.is_dir() and (d.name.startswith(".") or (_STEP_DIR.match(d.name) and not (d / COMPLETE).is_file())):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def load_trainer_state(directory: Path) -> dict:
    # weights_only=False: the state holds numpy/python RNG tuples; the file is our own, written above.
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)


def prune(checkpoints: Path, keep_last: int, keep: set[int] = frozenset()) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and those whose step is in `keep`)."""
    ckpts = complete_checkpoints(checkpoints)
    for step, d in ckpts[: max(0, len(ckpts) - keep_last)]:
        if step not in keep:
            shutil.rmtree(d, ignore_errors=True)
