"""Scaled dot-product attention as the model calls it, with CPU paths chosen by measurement.

`F.scaled_dot_product_attention` runs a fused flash kernel on CPU, which multiplies small blocks
through the BLAS; at phi-1-tiny's 32-dim heads that runs far below the FMA units' rate, and its
backward is slower still. Two remedies, each where it measured faster:

- phitrain's own causal kernel (`model/cpu_attention.c`, one thread per head with its keys in the
  caches; `cpu_attention.py` builds it) for CPU training and inference without a past (evaluation, a
  prompt's prefill), causal, no mask or dropout, head size a multiple of 16: fp32 inputs, and bf16
  inputs on a CPU without AMX (its forward alone took 1/1.8-1/3.9 of the flash kernel's time on 2
  Zen 4 cores). In bf16 it runs on AVX512-BF16's dot products where the CPU has them (Zen 4: 2.6-4.6x
  PyTorch's bf16 flash kernel, forward + backward), else in fp32, rounded back (there the flash
  kernel's bf16 backward was slower than its fp32 one: 22 vs 14 ms per layer where bf16 is emulated,
  AVX2). On 2 Ice Lake cores (AVX-512, fp32), forward + backward per layer against fp32 flash, side
  by side (medians of 15): 8 x 8 heads x 256 tokens x 32 dims 13.3 vs 19.8 ms, 4 x 1024 61.6 vs 71.9
  ms, 4 x 4 heads x 512 x 64 dims 16.7 vs 23.4 ms (`benchmarks/model_speed.py` shows it in a whole
  training step).
- Compiled bf16 training (`compile: true`/`auto`) on a CPU with AMX, causal, no dropout, up to
  MATH_BACKWARD_MAX_LEN tokens: the flash forward, whose bf16 block matmuls run on the tile unit, and a
  backward written out as batched matmuls around elementwise work that inductor fuses
  (`_FlashForwardMathBackward`), over blocks of 256 queries that skip the keys a causal block never
  sees. Forward + backward at 8 x 256 on 2 Sapphire Rapids cores: 7.2 ms instead of flash's 13.2
  (flash forward 1.5, backward 12); 4 x 512: 12.2 vs 18.0; 4 x 1024: 54.5 vs 39.9 (the score blocks
  outgrow the caches), hence the limit. Eager, the written-out backward is slower than flash (each
  elementwise op one more pass over B·H·T² floats), so eager bf16 keeps flash there. Without AMX it
  measured slower than fp32 attention (Zen 4, compiled: 25.4 vs 22.6 ms), so it is not used there;
  nor was attention written out whole for inductor (Zen 4: 35 ms in bf16 with fp32 scores, 44 all in
  fp32, against 31 for fp32 flash in that run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phitrain.model import cpu_attention

MATH_BACKWARD_MAX_LEN = 512
BACKWARD_QUERY_BLOCK = 256


# Whether this CPU has AMX tiles (Sapphire Rapids and later), which oneDNN's bf16 matmuls use.
CPU_HAS_AMX: bool = torch.cpu._is_amx_tile_supported()


def attention(q, k, v, *, attn_mask, is_causal: bool, dropout_p: float, enable_gqa: bool) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v over [B, H, T, D] queries and [B, H_kv, S, D] keys/values."""
    if (q.device.type == "cpu" and is_causal and attn_mask is None and dropout_p == 0.0
            and q.dtype in (torch.float32, torch.bfloat16)):
        if q.dtype == torch.bfloat16 and CPU_HAS_AMX:
            if q.requires_grad and q.shape[-2] <= MATH_BACKWARD_MAX_LEN and torch.compiler.is_compiling():
                if enable_gqa:   # one key/value head per query head; autograd sums their gradients back
                    group = q.shape[1] // k.shape[1]
                    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
                return _FlashForwardMathBackward.apply(q, k, v)
        elif cpu_attention.AVAILABLE and cpu_attention.supports(q, k, v):
            return cpu_attention.causal_attention(q, k, v)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          dropout_p=dropout_p, enable_gqa=enable_gqa)


class _FlashForwardMathBackward(torch.autograd.Function):
    """Causal attention: the CPU flash kernel forward (which also returns each row's log-sum-exp), and
    the FlashAttention backward recomputation (Dao et al. 2022, alg. 4), BACKWARD_QUERY_BLOCK queries
    at a time against the keys up to the block's last query:

        P = exp(q kᵀ/√d − lse) (causal),  dV = Pᵀ dO,  dP = dO Vᵀ,
        dS = P ∘ (dP − rowsum(dO ∘ O)) / √d,  dQ = dS K,  dK = dSᵀ Q.

    The scores are computed in fp32 (bf16 scores doubled the gradients' error against an fp32
    reference; in fp32 it equals the flash kernel's); the other matmuls take bf16 inputs as flash does.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        T, D = q.shape[-2], q.shape[-1]
        scale = D ** -0.5
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        grad_q, grad_k, grad_v = [], 0.0, 0.0
        for start in range(0, T, BACKWARD_QUERY_BLOCK):   # causal: a block of queries sees keys < its end
            end = min(start + BACKWARD_QUERY_BLOCK, T)
            q_rows, grad_out_rows = q[..., start:end, :], grad_out[..., start:end, :]
            k_seen, v_seen = k[..., :end, :], v[..., :end, :]
            scores = torch.matmul(q_rows.float(), k_seen.float().transpose(-1, -2)) * scale
            future = torch.ones(end - start, end, dtype=torch.bool, device=q.device).triu(start + 1)
            probs = torch.exp(scores - lse[..., start:end].unsqueeze(-1)).masked_fill(future, 0.0)
            grad_v_seen = torch.matmul(probs.to(v.dtype).transpose(-1, -2), grad_out_rows)
            grad_probs = torch.matmul(grad_out_rows, v_seen.transpose(-1, -2)).float()
            grad_scores = (probs * (grad_probs - delta[..., start:end, :]) * scale).to(q.dtype)
            grad_q.append(torch.matmul(grad_scores, k_seen))
            grad_k_seen = torch.matmul(grad_scores.transpose(-1, -2), q_rows)
            # keys past `end` get nothing from this block; sums in fp32, as the flash kernel accumulates
            grad_k = grad_k + F.pad(grad_k_seen.float(), (0, 0, 0, T - end))
            grad_v = grad_v + F.pad(grad_v_seen.float(), (0, 0, 0, T - end))
        return torch.cat(grad_q, dim=-2), grad_k.to(k.dtype), grad_v.to(v.dtype)
