"""The phi network: one module for both block styles, computing exactly what transformers'
`PhiForCausalLM` (parallel block: phi-1, phi-1.5, phi-2) and `Phi3ForCausalLM` (sequential block: phi-4)
compute for the same weights.

Read top to bottom: rotary embedding → attention → the two MLPs → the two norms → the two blocks → the
output head (vocabulary projection fused with the loss) → the model → the KV cache used by generation.
The model holds no parallelism, no checkpointing, no compile: `phitrain.train` applies those
(torchtitan's separation), so this file stays what the papers describe.

Parameter names are ours; `phitrain.interop.hf` maps them to and from the transformers names. The one
structural difference from transformers is that the parallel block's q/k/v projections are fused into a
single `qkv` matmul (as phi-4's are): the same function, one GEMM instead of three.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from phitrain.config import ModelConfig
from phitrain.model import cpu_gelu
from phitrain.model.attention import attention
from phitrain.model.cpu_bf16 import Linear
from phitrain.model.loss import linear_cross_entropy


# ---- rotary position embedding -------------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) over the first `rotary_dim` dims of each head, NeoX "rotate half" layout.

    phi-1 §2.3 uses rotary dimension 32 of a 64-dim head (after CodeGen); the remaining dims pass through
    unrotated. phi-4 rotates the whole head with base 250k after midtraining (Phi-4 report §3). The cos/sin
    tables are precomputed once for `max_position_embeddings` positions in fp32, exactly the values
    transformers computes per call (`position * inv_freq`, then cos/sin).
    """

    def __init__(self, rotary_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.rotary_dim, self.max_positions, self.theta = rotary_dim, max_positions, theta
        # half-width tables: the two halves of NeoX-style RoPE share their angles
        self.register_buffer("cos", torch.empty(max_positions, rotary_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, rotary_dim // 2), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the tables; also needed after materialising a model built on the meta device."""
        if self.cos.is_meta:
            return
        dim = self.rotary_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        positions = torch.arange(self.max_positions, dtype=torch.int64).float()
        freqs = (positions[:, None] * inv_freq[None, :]).to(self.cos.device)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `position_ids` ([T] or [B, T]), shaped to broadcast over heads: [.., 1, T, dims]."""
        cos, sin = self.cos[position_ids], self.sin[position_ids]
        return cos.unsqueeze(-3), sin.unsqueeze(-3)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `2 * cos.shape[-1]` dims of x ([B, H, T, head_dim]); the rest pass through.

    With halves x1, x2 this is [x1·cos − x2·sin, x2·cos + x1·sin] — the "rotate half" formula written
    without materialising rotate_half(x) (same bits, fewer ops).
    """
    half = cos.shape[-1]
    x1, x2, passthrough = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if passthrough.shape[-1]:
        parts.append(passthrough)
    return torch.cat(parts, dim=-1)


# ---- attention -----------------------------------------------------------------------------------

class Attention(nn.Module):
    """Causal multi-head attention with optional grouped-query heads, through PyTorch SDPA.

    `F.scaled_dot_product_attention` dispatches to FlashAttention on CUDA (phi-1 §2.3 trains with
    FlashAttention) and to a fused flash kernel on CPU (`model/attention.py`: the CPU training paths that
    measured faster). Biases on the projections for the parallel block
    (CodeGen/phi-1), none for the sequential block (Phi-3/phi-4). Optional per-head LayerNorm on q and k
    (transformers' `qk_layernorm`, off in all released phi checkpoints).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.block == "parallel"
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.attn_pdrop = cfg.attn_pdrop
        self.qkv = Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=bias)
        self.out_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        if cfg.qk_layernorm:
            self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: "KVCache | None", layer_idx: int,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v, cache_position)
        if cache_position is not None:
            y = _decode_attention(q, k, v, mask)
        else:
            y = attention(q, k, v, attn_mask=mask,
                          is_causal=mask is None and T > 1,  # without a mask, T > 1 only with no past
                          dropout_p=self.attn_pdrop if self.training else 0.0,
                          enable_gqa=self.num_kv_heads != self.num_heads)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, q_size))


def _decode_attention(q, k, v, mask) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v written out, for the static-cache decode step (a few queries over the
    whole cache). Compiled, inductor fuses the scale, mask and softmax into one loop between two small
    matmuls; the fused SDPA kernels pay a per-call setup that dominates at one query per row.
    Grouped-query heads share their key/value head by folding the group into the query rows."""
    B, H, T, D = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(B, kv_heads, H // kv_heads * T, D)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * D ** -0.5
    scores = scores.view(B, kv_heads, H // kv_heads, T, -1).masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = scores.softmax(-1).to(v.dtype).view(B, kv_heads, H // kv_heads * T, -1)
    return torch.matmul(probs, v).view(B, H, T, D)


# ---- MLPs and norms ------------------------------------------------------------------------------

# 2·√(2/π): gelu_new's tanh argument, doubled for the sigmoid form below
_GELU_SIGMOID_SCALE = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """½x(1 + tanh(√(2/π)(x + 0.044715x³))), the tanh-approximated GELU ("gelu_new", Hendrycks & Gimpel
    2016) of CodeGen and phi-1.

    Compiled, it is computed as x·σ(2u), the same function (1 + tanh u = 2σ(2u)), because inductor's
    vectorized tanh costs about three times its exp: on phi-1-tiny's [2048, 1024] fc1 output on 2 Ice
    Lake cores, forward 0.72 vs 2.39 ms and forward + backward 3.3 vs 6.8 ms, ~6% of an fp32 training
    step. Its error against an fp64 reference is at most 5.2e-7 absolute (tanh form: 4.3e-7) and 2.2e-6
    relative where the tanh form's cancellation at negative x reaches 7%. Eager, on a CPU, the same form
    runs as one C kernel (`phitrain.model.cpu_gelu`: 3x ATen's, forward and backward); elsewhere, and
    for small tensors, `F.gelu`.
    """
    if torch.compiler.is_compiling():   # in fp32, rounded once at the end, as ATen's gelu does for bf16
        xf = x.float()
        return (xf * torch.sigmoid(_GELU_SIGMOID_SCALE * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)
    if cpu_gelu.takes(x):
        return cpu_gelu.gelu_tanh(x)
    return F.gelu(x, approximate="tanh")


class GeluMLP(nn.Module):
    """fc1 → gelu (tanh approximation, "gelu_new") → fc2, with biases: the CodeGen/phi-1 MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SwiGLUMLP(nn.Module):
    """down(up * silu(gate)) with gate and up fused in one projection (gate first): the Phi-3/phi-4 MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * F.silu(gate))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as Phi-3's reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.block == "parallel":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)


# ---- blocks --------------------------------------------------------------------------------------

class ParallelBlock(nn.Module):
    """x + drop(attn(ln(x))) + drop(mlp(ln(x))): one LayerNorm, attention and MLP side by side.

    phi-1 §2.3: "MHA and MLP layers in parallel configuration following ... CodeGen, PaLM, and GPT-NeoX".
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = GeluMLP(cfg)
        self.drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, cos, sin, mask, cache, layer_idx, cache_position=None):
        h = self.norm(x)
        attn = self.attn(h, cos, sin, mask, cache, layer_idx, cache_position)
        return self.drop(attn) + self.drop(self.mlp(h)) + x


class SequentialBlock(nn.Module):
    """Pre-norm: x + drop(attn(rms(x))), then x + drop(mlp(rms(x))) — the Phi-3/phi-4 layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = SwiGLUMLP(cfg)
        self.drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, cos, sin, mask, cache, layer_idx, cache_position=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer_idx, cache_position))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# ---- the output head ----------------------------------------------------------------------------

class LMHead(Linear):
    """The vocabulary projection. Given targets it returns the mean next-token loss instead of logits,
    computed chunk by chunk without materialising the logits (`phitrain.model.loss`): for a small model
    the [tokens, vocab] fp32 logits and their softmax are the step's largest tensors.

    The loss is computed inside this module's own `forward` so that wrappers which gather parameters
    around a module's forward (FSDP2, DeepSpeed ZeRO-3) see the weight being used.
    """

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, self.bias, targets)


# ---- the model -----------------------------------------------------------------------------------

def _fill_in_place(param: torch.Tensor, kind: str, std: float) -> None:
    if kind == "normal":
        nn.init.normal_(param, mean=0.0, std=std)
    elif kind == "zeros":
        nn.init.zeros_(param)
    else:
        nn.init.ones_(param)


class PhiModel(nn.Module):
    """Token embedding → dropout → blocks → final norm → lm_head (biased for the parallel style).

    `forward(input_ids)` returns logits [B, T, vocab]; `forward(input_ids, targets)` returns the mean
    next-token cross-entropy (targets already shifted; -100 is ignored), so wrappers such as DDP/FSDP that
    hook `forward` see the loss path too. `return_hidden=True` returns the final-norm hidden states
    (used as document embeddings by the quality classifier, phi-1 §2.1).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_drop = nn.Dropout(cfg.embd_pdrop)
        block = ParallelBlock if cfg.block == "parallel" else SequentialBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=cfg.block == "parallel")
        self.rope = RotaryEmbedding(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, fill: Callable[[torch.Tensor, str, float], None] | None = None) -> None:
        """Initialisation for training from scratch.

        Normal(0, initializer_range=0.02) for embeddings and projections, zero biases, unit norms — the
        GPT-2/CodeGen scheme that transformers' Phi models also use — plus GPT-2's scaling of the
        projections that write into the residual stream (attention output, fc2/down) by 1/sqrt(2·layers)
        (Radford et al. 2019 §2.3), which keeps the residual's variance from growing with depth.
        `fill(param, kind, std)` (kind: normal, zeros, ones) replaces the in-place initialisers: a model
        sharded across ranks uses it to draw exactly these numbers shard by shard (train.parallel).
        """
        fill = fill or _fill_in_place
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_resid_out = name.endswith(("out_proj", "fc2", "down"))
                fill(module.weight, "normal", resid_std if is_resid_out else std)
                if getattr(module, "bias", None) is not None:
                    fill(module.bias, "zeros", 0.0)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                fill(module.weight, "ones", 0.0)
                if getattr(module, "bias", None) is not None:
                    fill(module.bias, "zeros", 0.0)
        self.rope.reset_tables()

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: "KVCache | None" = None,
        cache_position: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T]; attention_mask [B, past+T] (1 = real token, 0 = padding) for padded batches.

        `cache_position` ([T], the cache columns the new tokens go to) selects the static form a compiled
        decode step needs: nothing in it is a Python number that changes from step to step. The tokens
        attend over all the cache's columns under `attention_mask` (then [B, cache columns]) and the causal
        limit `column <= cache_position`, and `cache.length` is left to the caller.
        """
        B, T = input_ids.shape
        # the static form never reads cache.length: a compiled graph would be specialised to its value
        past = cache.length if cache is not None and cache_position is None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        if cache_position is None and past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}")
        cos, sin = self.rope(position_ids)
        if cache_position is not None:
            mask = _static_cache_mask(attention_mask, cache_position, cache.capacity)
        else:
            mask = _attention_mask(attention_mask, B, T, past, input_ids.device)
        x = self.embed_drop(self.embed(input_ids))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i, cache_position)
        x = self.final_norm(x)
        if cache is not None and cache_position is None:
            cache.length += T
        if return_hidden:
            return x
        return self.lm_head(x, targets)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel() + self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N over the matmul parameters (all but the embedding lookup) plus
        12·layers·hidden·seq for attention scores and values — the PaLM-appendix estimate that nanoGPT
        and torchtitan also use for MFU."""
        cfg = self.config
        matmul_params = self.num_params() - self.embed.weight.numel()
        return 6 * matmul_params + 12 * cfg.num_layers * cfg.hidden_size * seq_len


def _attention_mask(attention_mask, B, T, past, device) -> torch.Tensor | None:
    """The boolean SDPA mask [B, 1, T, past+T], or None when plain causal attention suffices."""
    if attention_mask is None and (past == 0 or T == 1):
        return None  # plain causal prefill (is_causal) or one decode step that sees the whole cache
    key_mask = None if attention_mask is None else attention_mask[:, : past + T]
    return _causal_mask(torch.arange(past, past + T, device=device), past + T, key_mask)


def _static_cache_mask(attention_mask, cache_position, capacity) -> torch.Tensor:
    """[B or 1, 1, T, capacity] for the tokens at columns `cache_position` of a static cache."""
    return _causal_mask(cache_position, capacity, attention_mask)


def _causal_mask(q_pos: torch.Tensor, n_keys: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """[B or 1, 1, T, n_keys]: key column c is visible to the query at position q_pos[t] when c <= it and
    `key_mask` ([B, n_keys], 1 = a real token) allows it.

    Each position may always attend to itself, so padding rows are never fully masked (a fully masked
    row makes SDPA return NaN, which would leak through 0·NaN into real rows).
    """
    k_pos = torch.arange(n_keys, device=q_pos.device)[None, :]
    q_pos = q_pos[:, None]
    allowed = (k_pos <= q_pos)[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    return allowed | (k_pos == q_pos)[None, None]


class KVCache:
    """Preallocated keys/values, one [B, num_kv_heads, max_len, head_dim] tensor per layer for each.

    A static buffer (written in place, never concatenated) keeps decoding allocation-free. `length` is
    the number of positions filled; the model advances it after each forward. Each layer's buffer is a
    tensor of its own, not a view of one big one, so a compiled step can update it in place.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0

    def window(self, width: int) -> KVCache:
        """The first `width` columns as a cache of views: what it is written goes into this cache's
        buffers, and attention over it reads only those columns (a compiled CPU decode step, see
        `phitrain.model.generate.CompiledDecoder`)."""
        view = copy.copy(self)
        view.k = [t[:, :, :width] for t in self.k]
        view.v = [t[:, :, :width] for t in self.v]
        return view

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor | None = None):
        """Write the new keys/values; return what attention sees: the filled columns, or with `position`
        (the columns to write, a tensor) the whole buffer (the static form, see `PhiModel.forward`)."""
        keys, values = self.k[layer_idx], self.v[layer_idx]
        if position is not None:
            keys.index_copy_(2, position, k)
            values.index_copy_(2, position, v)
            return keys, values
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions is full")
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]
