"""phitrain's CPU causal-attention kernel (`cpu_attention.c`), exposed as a torch op.

The C file is built on first use for this machine (`phitrain.model.cpu_build`). Each head is one
thread's work in a fixed order, so results do not depend on the thread count.

`causal_attention(q, k, v)` is a `torch.library` custom op with its backward registered, so eager
autograd and `torch.compile` (an opaque call in the graph) both use it; it takes fp32 or bf16
[B, H, T, D] queries and [B, H_kv, T, D] keys/values with D a multiple of 16, and returns its output
in their dtype. bf16 runs on AVX512-BF16's dot products where the CPU has them (the build's
`-march=native` turns them on): the bf16 flash kernel's arithmetic, bf16 operands with fp32 sums, at
1.6-2x the fp32 kernel's speed (2 Zen 4 cores, forward + backward, side by side, medians of 15: 5.2 vs
10.4 ms at 8 x 8 heads x 256 tokens x 32 dims, 29.9 vs 49.0 at 4 x 1024, 6.7 vs 11.5 at 4 x 4 x 512 x
64; PyTorch's bf16 flash kernel took 23.7, 79.1 and 26.1). Elsewhere bf16 is computed in fp32 and
rounded back.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from phitrain.model import cpu_build

HEAD_DIM_MULTIPLE = 16
# Where the kernel can be built: a C compiler on PATH (or $CC).
AVAILABLE: bool = cpu_build.AVAILABLE


class _Strides(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("h", ctypes.c_int64), ("t", ctypes.c_int64)]


@functools.cache
def _library() -> ctypes.CDLL:
    lib = cpu_build.build("cpu_attention")
    ptr, i64, st = ctypes.c_void_p, ctypes.c_int64, _Strides
    lib.phitrain_attention_has_bf16.restype = ctypes.c_int
    entries = ["phitrain_attention_forward", "phitrain_attention_backward"]
    if lib.phitrain_attention_has_bf16():
        entries += ["phitrain_attention_forward_bf16", "phitrain_attention_backward_bf16"]
    for name in entries:
        fn = getattr(lib, name)
        fn.argtypes = ([ptr] * 5 + [i64] * 5 + [st] * 3 if "forward" in name else [ptr] * 9 + [i64] * 5 + [st] * 4
                       ) + [ctypes.c_int]
        fn.restype = None
    return lib


@functools.cache
def has_bf16_kernel() -> bool:
    """Whether the kernel was built with its bf16 path (the CPU has AVX512-BF16's dot products)."""
    return AVAILABLE and bool(_library().phitrain_attention_has_bf16())


def _entry(name: str, dtype: torch.dtype):
    return getattr(_library(), name + ("_bf16" if dtype == torch.bfloat16 else ""))


def _kernel_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors (all float32 or all bfloat16) in the dtype the kernel computes them in: bf16 as is
    where it has its bf16 path, else fp32 (a CPU without AVX512-BF16: the results rounded back)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
        raise RuntimeError(f"phitrain's CPU attention kernel takes float32 or bfloat16 tensors of one dtype, "
                           f"not {sorted(map(str, dtypes))}")
    if tensors[0].dtype == torch.bfloat16 and not has_bf16_kernel():
        return tuple(t.float() for t in tensors)
    return tensors


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> _Strides:
    return _Strides(x.stride(0), x.stride(1), x.stride(2))


@torch.library.custom_op("phitrain::causal_attention", mutates_args=(), device_types="cpu")
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ/√D, causal) v as [B, H, T, D] over [B, T, H, D] memory in q's dtype, fp32
    log-sum-exp [B, H, T])."""
    dtype = q.dtype
    q, k, v = (_unit_last(t) for t in _kernel_dtype(q, k, v))
    B, H, T, D = q.shape
    out = q.new_empty(B, T, H, D)
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    _entry("phitrain_attention_forward", q.dtype)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        B, H, k.shape[1], T, D, _strides(q), _strides(k), _strides(v), torch.get_num_threads())
    return out.to(dtype).transpose(1, 2), lse


@causal_attention.register_fake
def _(q, k, v):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("phitrain::causal_attention_backward", mutates_args=(), device_types="cpu")
def causal_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `causal_attention`'s output with respect to q, k, v (each [B, T, heads, D] memory)."""
    dtype = q.dtype
    grad_out, q, k, v, out = _kernel_dtype(grad_out, q, k, v, out)
    grad_out, q, k, v = _unit_last(grad_out), _unit_last(q), _unit_last(k), _unit_last(v)
    out = out.transpose(1, 2).contiguous()
    B, H, T, D = q.shape
    HKV = k.shape[1]
    grad_q, grad_k, grad_v = q.new_empty(B, T, H, D), q.new_empty(B, T, HKV, D), q.new_empty(B, T, HKV, D)
    _entry("phitrain_attention_backward", q.dtype)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad_out.data_ptr(), lse.contiguous().data_ptr(),
        grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(),
        B, H, HKV, T, D, _strides(q), _strides(k), _strides(v), _strides(grad_out), torch.get_num_threads())
    return tuple(g.to(dtype).transpose(1, 2) for g in (grad_q, grad_k, grad_v))


@causal_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse):
    B, H, T, D = q.shape
    kv = q.new_empty(B, T, k.shape[1], D).transpose(1, 2)
    return q.new_empty(B, T, H, D).transpose(1, 2), kv, torch.empty_like(kv)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return causal_attention_backward(grad_out, q, k, v, out, lse)


causal_attention.register_autograd(_backward, setup_context=_setup_context)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these queries, keys and values: one dtype, same length, head size a
    multiple of 16, query heads a multiple of key/value heads."""
    return (q.dtype == k.dtype == v.dtype and q.shape[-2] == k.shape[-2] and q.shape[-1] % HEAD_DIM_MULTIPLE == 0
            and q.shape[1] % k.shape[1] == 0)
