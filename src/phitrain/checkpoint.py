"""Model checkpoints: a directory holding `model.safetensors`, `config.yaml` and `tokenizer/`.

This is the format every consumer reads (generate, eval, convert, the next training stage). The trainer's
checkpoints (`phitrain.train.checkpoint`) are the same directory plus `trainer_state.pt` and a `COMPLETE`
marker. Directories are written next to their destination and renamed into place, so a crash never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from phitrain.config import ModelConfig, dump_yaml, load_yaml
from phitrain.errors import PhitrainError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"


def replace_directory(staging: Path, path: Path) -> None:
    """Rename the finished `staging` directory to `path` in one step.

    An existing `path` is moved aside first and deleted only after the new one is in place, so at every
    instant either the old or the new complete directory exists under the final name.
    """
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` (see `replace_directory`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
