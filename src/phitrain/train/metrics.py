"""Metrics: one JSON line per step in `metrics.jsonl`, TensorBoard when installed, plots and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOPs/s ÷ the device's peak. The peak is
the `peak_tflops` the user states, else a datasheet value for known GPUs, else — on CPUs, which have no
datasheet number — a measurement of this machine's dense matmul throughput in the dtype the training
precision's GEMMs run in (fp32 for bf16 where the CPU emulates bf16: `phitrain.model.cpu_bf16`), so "MFU" there reads as "fraction of the matmul speed this CPU actually reaches".
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path

import torch

from phitrain.files import atomic_write_text
from phitrain.model.cpu_bf16 import CPU_HAS_NATIVE_BF16, gemm_dtype

# Dense (non-sparse) peak TFLOP/s by GPU name and precision, from NVIDIA datasheets. Matched as whole
# words, the more specific names first: "H100 PCIe" is not the SXM part, "L40S" is not an "L4".
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "A10G": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},
}


def datasheet_tflops(device_name: str, precision: str) -> float | None:
    """The datasheet peak for a CUDA device name (`torch.cuda.get_device_name`), None if not listed."""
    for key, table in GPU_PEAK_TFLOPS.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_name):
            return table[precision]
    return None


@functools.lru_cache(maxsize=None)
def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 8,
                          n: int | None = None) -> float:
    """Best achieved TFLOP/s of square (2048², or n²) matmuls on `device` in `dtype`, after a warm-up (a
    stand-in peak where none is published). Measured once per process: stages of one run share the same
    peak."""
    # CPUs without native fp16 (all) or bf16 (no AVX512-BF16/AMX) emulate it, orders of magnitude slower
    # (a 2048² bf16 matmul took 97 s on one AMD EPYC core): a small matrix keeps this short
    emulated = dtype == torch.float16 or (dtype == torch.bfloat16 and not CPU_HAS_NATIVE_BF16)
    n = n or (512 if device.type == "cpu" and emulated else 2048)
    # a private generator: the global RNG stream drives dropout and must not move (exact resume)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = 0.0
    for i in range(repeats + 2):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first calls pay kernel selection and allocation
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    return best


def peak_tflops(device: torch.device, precision: str, stated: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where the number comes from)."""
    if stated:
        return stated, "stated in the recipe"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (tflops := datasheet_tflops(name, precision)) is not None:
            return tflops, f"{name} datasheet"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # the rate of the GEMMs the model runs: where a CPU emulates bf16 they are fp32 (`model.cpu_bf16`)
    gemm = gemm_dtype(dtype, device)
    source = f"best measured {precision} matmul on {device.type}"
    if gemm != dtype:
        source = f"best measured fp32 matmul on {device.type} ({precision} GEMMs run in fp32 there)"
    return measure_matmul_tflops(device, gemm), source


class MetricsLogger:
    """Appends step records to metrics.jsonl (flushed each write) and mirrors scalars to TensorBoard."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # Records written after the checkpoint we resume from describe steps that will run again.
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable (torn) line is dropped


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(records: list[dict], out_dir: Path, title: str) -> list[Path]:
    """loss.png (train and validation loss) and lr.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{title}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "loss.png")
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot([r["step"] for r in train], [r["lr"] for r in train])
        ax.set(xlabel="step", ylabel="learning rate", title=f"{title}: schedule")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "lr.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "lr.png")
    return written
