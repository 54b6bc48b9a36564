"""bf16 matmuls on CPUs without bf16 dot-product instructions, computed as fp32 GEMMs of bf16 values.

Under bf16 autocast a linear layer rounds its input, weight and bias to bf16 and multiplies them with
fp32 accumulation, rounding the result to bf16. CPUs with AVX512-BF16 or AMX (Zen 4, Sapphire Rapids;
on ARM the bf16 extension) do that in hardware, 2-4x faster than fp32. Elsewhere (Ice Lake, Skylake,
Zen 3) torch emulates it far below the fp32 rate. On 2 Ice Lake cores, for phi-1-tiny's shapes (2048
rows, hidden 256, widths 768-1024), torch's bf16 `F.linear` ran at 49-57 GFLOP/s and fp32 at 203-218.

The product of two bf16 numbers (8-bit significands) is exact in fp32 (24 bits). So an fp32 GEMM of
the bf16 values, rounded to bf16 at the end, computes what a bf16 GEMM with fp32 accumulation computes,
up to the order of the sums: the same rounding points forward and backward (torch's own bf16 linear
rounds once more for a non-contiguous input with a bias: matmul, then the bias add). Measured on
the same shapes: 155-191 GFLOP/s including the casts. `Linear` does this where bf16 is emulated and
`gemm_dtype` tells the fused loss (`phitrain.model.loss`) to do the same. Where bf16 is native nothing
changes. Compiled, inductor folds a cast to bf16 and back into the fp32 op that consumes it without
rounding unless `torch._inductor.config.emulate_precision_casts` is on, so
`phitrain.train.parallel.compile_blocks` turns it on where bf16 is emulated (it cost ~2% of a compiled
bf16 step on Ice Lake; a rounding written as integer operations on the fp32 bits cost 19%).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _arm_has_bf16() -> bool:
    if platform.machine() not in ("aarch64", "arm64"):
        return False
    try:
        features = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("Features") and " bf16" in line for line in features.splitlines())


# AVX512-BF16 or AMX (x86), the bf16 extension (ARM): bf16 GEMMs in hardware, 2-4x fp32, not emulated
CPU_HAS_NATIVE_BF16: bool = (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
                             or _arm_has_bf16())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on `x` computes in: autocast's for x's device when autocast is on there, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run a GEMM of `dtype` values in: fp32 for bf16 on a CPU that emulates bf16."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not CPU_HAS_NATIVE_BF16:
        return torch.float32
    return dtype


class _Bf16LinearInFp32(torch.autograd.Function):
    """`F.linear` of bf16 x, weight, bias as fp32 GEMMs, rounded to bf16 where a bf16 GEMM's output is.

    The bf16 inputs are what is saved for the backward (as autocast's own linear saves), upcast there.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):
            out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).float()
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight.float()).to(torch.bfloat16).view(x.shape)
            if ctx.needs_input_grad[1]:
                grad_w = (g.t() @ x.reshape(-1, x.shape[-1]).float()).to(torch.bfloat16)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum(0).to(torch.bfloat16)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """`nn.Linear` whose bf16 GEMMs run as fp32 GEMMs on CPUs that emulate bf16 (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        # without autocast only a bf16 input with bf16 weights (nn.Linear refuses mixed dtypes)
        if gemm_dtype(dtype, x.device) != dtype and (self.weight.dtype == dtype
                                                     or torch.is_autocast_enabled(x.device.type)):
            bias = None if self.bias is None else self.bias.to(dtype)
            return _Bf16LinearInFp32.apply(x.to(dtype), self.weight.to(dtype), bias)
        return super().forward(x)
