"""A compiler pass for CPU decoding: matmuls with few rows as one reduction loop per weight row.

A decode step multiplies a few rows of activations (one per sequence in the batch) by every weight
matrix. A BLAS GEMM is built for large tiles and streams such skinny products far below the memory
bandwidth. This inductor post-grad pass rewrites each of them as `out[m, n] = sum_k W[n, k] * x[m, k]`:
inductor emits one C++ loop nest that, for each output feature n, reads weight row n once (contiguous,
vectorised along k) and uses it for all rows m while it is in L1. With a fixed row count each row is
a reduction of its own over the same range, and inductor fuses them into one loop with a vector
accumulator per row: M independent chains of adds, where a single accumulator would wait on every
add's latency. phi-1-tiny's 25 matmuls on 2 AVX2 cores (EPYC), medians of alternated runs:

| rows | an accumulator per row | one accumulator | MKL GEMM |
|---|---|---|---|
| 1 | 0.99 ms | 0.94 ms | 2.19 ms |
| 2 | 0.93 ms | 1.10 ms | 3.14 ms |
| 4 | 1.35 ms | 1.77 ms | 4.92 ms |
| 8 | 1.40 ms | 2.66 ms | 4.03 ms |
| 16 | 3.90 ms | 5.08 ms | 5.03 ms |

At 16 rows the accumulators no longer fit in AVX2's 16 vector registers; the loop does the arithmetic
without a GEMM's register blocking, so a GEMM's advantage returns for bigger batches (likely sooner
where the BLAS has AMX or AVX-512 kernels; not measured), hence MAX_ROWS. A dynamic row count cannot
be unrolled into accumulators, so only fixed row counts are rewritten: the serving engine pads its rows
to a few fixed counts instead (`phitrain.model.generate.PADDED_ROWS_MAX`).
benchmarks/model_speed.py has the end-to-end decoding numbers.

Inductor's own `decompose_mm_pass` rewrites one-row matmuls only, with the rows as the outer loop;
that order took 2.5 ms at 8 rows in an earlier run where one accumulator per output took 1.5 ms.

Only CPU matmuls of fixed sizes with at most MAX_ROWS rows are rewritten (the decode steps of
`phitrain.model.generate` fix their row counts).
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

aten = torch.ops.aten

# decode batches up to this many rows: measured 2.9x faster than the GEMM at 8 rows, 1.3x at 16 (AVX2)
MAX_ROWS = 16

_patterns = PatternMatcherPass(pass_name="phitrain_skinny_matmul")


def _skinny(x: torch.fx.Node, w_t: torch.fx.Node) -> bool:
    a, b = x.meta.get("val"), w_t.meta.get("val")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != 2 or b.dim() != 2:
        return False
    static = all(isinstance(d, int) for d in (*a.shape, *b.shape))
    return static and a.device.type == b.device.type == "cpu" and a.shape[0] <= MAX_ROWS


def _rows_times_weight(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    # a reduction of its own per row, all over the same [N, K] range: inductor fuses them into one loop
    # that loads each weight vector once for all rows and keeps a vector accumulator per row, M
    # independent chains of adds instead of one; the rows are stacked straight into [M, N]
    w = w_t.t()
    return torch.stack([(w * x[m]).sum(-1) for m in range(x.shape[0])]).to(x.dtype)


def _rewrite(match: Match, replacement, args, x: torch.fx.Node) -> None:
    match.replace_by_example(replacement, args)
    # computed once, into memory: left to fuse into the loop, the producer of x (a layer norm, a GELU)
    # would be recomputed for every output feature, and x read along the rows instead of along k
    x.meta["inductor_realize_to_strides"] = True
    SkinnyMatmulPass.rewrites += 1


@register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=_patterns)
def _addmm(match: Match, bias, x, w_t):
    if _skinny(x, w_t):
        _rewrite(match, lambda bias, x, w_t: _rows_times_weight(x, w_t) + bias, [bias, x, w_t], x)


@register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=_patterns)
def _mm(match: Match, x, w_t):
    if _skinny(x, w_t):
        _rewrite(match, _rows_times_weight, [x, w_t], x)


class SkinnyMatmulPass(CustomGraphPass):
    """`torch.compile(..., options={"post_grad_custom_post_pass": SkinnyMatmulPass()})`."""

    rewrites = 0    # matmuls rewritten in this process (a compiled graph from inductor's cache adds none)

    def __call__(self, graph: torch.fx.Graph) -> None:
        _patterns.apply(graph)

    def uuid(self) -> bytes:
        # inductor's cache key: a compiled graph is reused only while this file is unchanged
        return get_hash_for_files((__file__,))
