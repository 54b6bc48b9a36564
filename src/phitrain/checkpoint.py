"""Checkpoints: one directory format for every producer and consumer (DESIGN.md "Conventions").

A model checkpoint is a directory holding `model.safetensors`, `config.yaml` and `tokenizer/`; it is what
every consumer reads (generate, eval, convert, serve, the next training stage). A training checkpoint
(`RUN/<stage>/checkpoints/step-NNNNNN/`) is the same directory plus `trainer_state.pt` (optimizer,
scheduler, grad scaler, data loader position, every RNG state, counters: everything an exact resume
needs), the sharded state of FSDP2 (`dcp/`) or DeepSpeed (`deepspeed/`) runs, which every rank writes, and a
`COMPLETE` marker written last. Directories are assembled under a temporary sibling name and renamed
into place (`phitrain.files.atomic_directory`), so a process killed at any instant leaves either no
`step-N` directory or a complete one; leftovers of interrupted writes (hidden `.step-staging-*`) are
removed at the next start (`clean_partial`).
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

from phitrain.config import ModelConfig, dump_yaml, load_yaml
from phitrain.errors import PhitrainError
from phitrain.files import atomic_directory

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
STATE_FILE = "trainer_state.pt"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


# ---- model checkpoints ---------------------------------------------------------------------------

def write_model_files(directory: str | os.PathLike, model, tokenizer=None) -> None:
    """Write weights, config and tokenizer into an existing directory (no atomicity: callers provide it)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_FILE), metadata={"format": "pt", "producer": "phitrain"})
    dump_yaml(model.config, directory / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)


def save_checkpoint(directory: str | os.PathLike, model, tokenizer=None) -> Path:
    """Atomically write a model checkpoint directory."""
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, model, tokenizer)
    return Path(directory)


def load_model_config(directory: str | os.PathLike) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise PhitrainError(f"{directory}: checkpoint directory does not exist")
    if not (directory / CONFIG_FILE).is_file():
        raise PhitrainError(f"{directory}: not a phitrain checkpoint (no {CONFIG_FILE}); "
                            "for a transformers directory use `phitrain convert from-hf`")
    return load_yaml(ModelConfig, directory / CONFIG_FILE)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupt file into one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise PhitrainError(f"{path}: weights file is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PhitrainError(f"{path}: not a readable safetensors file ({err})") from None


def load_weights(model, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Copy `state` into `model`, naming the first missing, unexpected or mis-shaped tensor on error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise PhitrainError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise PhitrainError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise PhitrainError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                f"the config expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source, device="cpu"):
    """A PhiModel holding `state`, built on the meta device first so no memory is spent on a random init."""
    from phitrain.model.phi import PhiModel

    with torch.device("meta"):
        model = PhiModel(cfg)
    model.to_empty(device=device)
    load_weights(model, {k: v.detach().to(device) for k, v in state.items()}, source)
    model.rope.reset_tables()
    return model


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer or None) from a checkpoint directory."""
    directory = Path(directory)
    cfg = load_model_config(directory)
    model = model_from_state(cfg, read_state_dict(directory / MODEL_FILE), directory / MODEL_FILE, device)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    tokenizer = None
    if (directory / TOKENIZER_DIR).is_dir():
        from phitrain.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
    return model, tokenizer


# ---- training checkpoints ------------------------------------------------------------------------

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


def new_staging_dir(checkpoints: Path) -> Path:
    """An empty hidden directory next to the checkpoints. Distributed saves share one (rank 0 makes it
    and broadcasts its name): every rank writes its shards into it before rank 0 finishes it."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".step-staging-", dir=checkpoints))


def finish_train_checkpoint(staging: Path, checkpoints: Path, step: int, model_cfg: ModelConfig, tokenizer,
                            trainer_state: dict) -> Path:
    """Add config, tokenizer, trainer_state.pt and COMPLETE (last) to `staging` — which already holds the
    engine's files and the streamed `model.safetensors` — then rename it to step-N, so at every instant a
    complete step-N exists or none does."""
    target = step_dir(checkpoints, step)
    with atomic_directory(target, staging=staging) as tmp:
        dump_yaml(model_cfg, tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        torch.save(trainer_state, tmp / STATE_FILE)
        _fsync_write(tmp / COMPLETE, f"step {step}\n")
    return target


def copy_model_files(src: Path, dst: Path) -> Path:
    """A plain model checkpoint at `dst` from a training checkpoint `src`: its weights, config and
    tokenizer. Weights that were not consolidated at save time are streamed from the DCP shards."""
    with atomic_directory(dst) as tmp:
        if (src / MODEL_FILE).is_file():
            shutil.copyfile(src / MODEL_FILE, tmp / MODEL_FILE)
        else:
            from phitrain.train.consolidate import consolidate_dcp

            consolidate_dcp(src / "dcp", tmp / MODEL_FILE)
        shutil.copyfile(src / CONFIG_FILE, tmp / CONFIG_FILE)
        if (src / TOKENIZER_DIR).is_dir():
            shutil.copytree(src / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
    return dst


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
