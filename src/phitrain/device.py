"""The `--device` of the inference commands (generate, serve, eval): one default and one check for all."""

from __future__ import annotations

from phitrain.errors import PhitrainError

DEVICE_HELP = "auto (cuda if available, the default), cpu, cuda, cuda:1, ..."


def resolve_device(device: str) -> str:
    """`auto` -> "cuda" when a CUDA device is available, else "cpu"; `cpu`, `cuda` and `cuda:N` are
    returned as given once checked, so a wrong value is one clear error instead of a torch traceback."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PhitrainError(f"--device {device}: no CUDA device is available (use cpu or auto)")
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise PhitrainError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return device
