"""Next-token cross-entropy fused with the vocabulary projection, computed in row chunks.

The plain path computes `logits = lm_head(h)` for every position, casts all of them to fp32 and runs
log-softmax over the whole [tokens, vocab] tensor, then autograd keeps that tensor (and its softmax) for
the backward pass. For a small model that tensor is the largest activation of the step — vocab 4096 ×
2048 tokens is 32 MB in fp32, against 2 MB for one hidden state — and the memory-bound passes over it
(cast, log-softmax, its backward, the cast back) cost more than the projection's matmul. Here the
projection, the loss and its gradient are computed together, a few hundred rows at a time, while each
chunk's logits are still in cache: the gradient of the loss with respect to the logits is
`softmax - onehot(target)` (divided by the number of counted tokens), so the forward pass can produce the
gradients for the hidden states, the weight and the bias directly, and the backward pass only scales
them by the incoming gradient. No full logits tensor ever exists. (The same idea as Liger-Kernel's fused
linear cross-entropy, Hsu et al. 2024, and Wijmans et al. 2024's "Cut your losses".)

The numbers are those of `F.cross_entropy(F.linear(h, W, b).float(), targets, ignore_index=-100)`: the
logits are computed in the autocast dtype (bf16/fp16) when autocast is on, as `lm_head` would be, the
softmax in fp32, and the weight/bias gradients are accumulated across chunks in fp32. Where bf16 is
emulated the bf16 GEMMs run as fp32 GEMMs of the bf16 values (`phitrain.model.cpu_bf16`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phitrain.model.cpu_bf16 import compute_dtype, gemm_dtype

IGNORE_INDEX = -100


def _chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: about 1M logits (4 MB in fp32), which measured fastest on CPU for vocabularies of
    4K-100K (benchmarks/model_speed.py) and keeps the peak small on a GPU."""
    return max(64, (1 << 20) // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int, grad_enabled: bool):
        dtype = compute_dtype(h)
        gemm = gemm_dtype(dtype, h.device)   # fp32 GEMMs of bf16 values where bf16 is emulated

        def cast(t: torch.Tensor) -> torch.Tensor:   # values of `dtype`, held in the GEMMs' dtype
            return t.to(dtype).to(gemm)

        with torch.autocast(h.device.type, enabled=False):
            hc, wc = cast(h), cast(weight)
            bc = cast(bias) if bias is not None else None
            valid = targets != IGNORE_INDEX
            n_valid = valid.sum().clamp(min=1)
            # (needs_input_grad says whether the inputs require gradients, also under torch.no_grad)
            want_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if want_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_grad else None
            grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=h.device)
                      if want_grad and bias is not None else None)
            # all fp32: the GEMMs can write and accumulate in place, nothing is rounded in between
            in_place = dtype == h.dtype == torch.float32
            # one fp32 logits buffer serves every chunk: a new 4 MB tensor per chunk took fresh pages from
            # the OS each time (its bias copy measured 0.8 ms a chunk, 0.17 ms into the reused buffer)
            buffer = torch.empty(min(chunk, h.shape[0]), weight.shape[0], dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk):
                end = min(start + chunk, h.shape[0])
                rows = hc[start:end]
                logits = buffer[:end - start]
                if gemm == torch.float32:
                    if bc is None:
                        torch.mm(rows, wc.t(), out=logits)
                    else:
                        torch.addmm(bc, rows, wc.t(), out=logits)
                    if dtype != torch.float32:   # the GEMM's output rounded to `dtype`, as lm_head's would be
                        logits.copy_(logits.to(dtype))
                else:
                    logits.copy_(F.linear(rows, wc, bc))
                t, ok = targets[start:end], valid[start:end]
                safe_t = t.clamp(min=0)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                # softmax with one exp per logit, in place: e = exp(x - max), log-sum-exp = max + log(sum e)
                top = logits.amax(-1, keepdim=True)
                e = logits.sub_(top).exp_()
                total = e.sum(-1, keepdim=True)
                lse = (top + total.log()).squeeze(1)
                loss += torch.where(ok, lse - picked, 0.0).sum()
                if not want_grad:
                    continue
                # d loss / d logits = (softmax - onehot) / n_valid on counted rows, 0 on ignored ones
                row_scale = (ok / n_valid)[:, None]
                g = e.mul_(row_scale / total)
                g.scatter_add_(1, safe_t[:, None], -row_scale)
                g = cast(g)
                if in_place:
                    torch.mm(g, wc, out=grad_h[start:end])
                    grad_w.addmm_(g.t(), rows)
                else:
                    grad_h[start:end] = cast(g @ wc)
                    grad_w.add_(cast(g.t() @ rows).float())
                if grad_b is not None:
                    grad_b.add_(g.float().sum(0))
            loss = loss / n_valid
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss.float()
        gh = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        gb = None if grad_b is None else (grad_b * scale).to(ctx.weight_dtype)
        return gh, gw, gb, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `F.linear(h, weight, bias)` against `targets` (-100 ignored).

    h: [..., hidden]; targets: [...] (already shifted). Without gradients needed (evaluation) only the
    loss is computed, chunk by chunk.
    """
    h2 = h.reshape(-1, h.shape[-1])
    chunk = chunk_rows or _chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(h2, weight, bias, targets.reshape(-1), chunk, torch.is_grad_enabled())
