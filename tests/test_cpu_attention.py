"""phitrain's CPU causal-attention kernel (model/cpu_attention.c): forward, log-sum-exp and gradients
against a float64 reference, over the shapes it takes (ragged lengths, grouped-query heads, head
sizes 16-80, strided inputs as the model passes them); eager and compiled; and the build cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from phitrain.model import cpu_attention


def _reference(q, k, v, grad_out):
    q, k, v = (t.double().detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return (out, scores.logsumexp(-1), *torch.autograd.grad(out, (q, k, v), grad_out.double()))


def _ours(q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = cpu_attention.causal_attention(q, k, v)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), grad_out))


def _assert_close(ours, reference):
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], ours, reference):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        scale = max(b.abs().max().item(), 1.0)   # inputs are O(1): a zero gradient (T = 1) is ~1e-7 in fp32
        assert (a.double() - b).abs().max().item() < 2e-5 * scale, name


@pytest.mark.parametrize("B,H,H_kv,T,D", [
    (2, 3, 3, 37, 32),    # ragged row blocks and key vectors
    (1, 4, 2, 70, 16),    # grouped-query heads, two per key/value head
    (2, 2, 2, 256, 64),   # phi-1's head size
    (1, 2, 1, 33, 80),    # phi-2's head size: two vectors, then one
    (1, 1, 1, 1, 32),     # one token
])
def test_matches_float64_reference(B, H, H_kv, T, D):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, H, T, D, generator=g) * 2
    k, v = (torch.randn(B, H_kv, T, D, generator=g) * 2 for _ in range(2))
    grad_out = torch.randn(B, H, T, D, generator=g)
    _assert_close(_ours(q, k, v, grad_out), _reference(q, k, v, grad_out))


def test_takes_the_models_strided_views():
    """q, k, v as the model makes them: views of one [B, T, 3, H, D] projection, heads transposed."""
    B, T, H, D = 2, 50, 4, 32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    grad_out = torch.randn(B, T, H, D, generator=g).transpose(1, 2)   # the output projection's layout
    assert not q.is_contiguous()
    _assert_close(_ours(q, k, v, grad_out), _reference(q, k, v, grad_out))
    out, _ = cpu_attention.causal_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()   # [B, T, H, D] memory: the projection reads it as is


def test_compiled_matches_eager():
    g = torch.Generator().manual_seed(1)
    q, k, v, grad_out = (torch.randn(2, 4, 40, 32, generator=g) for _ in range(4))

    def attend(q, k, v):
        return cpu_attention.causal_attention(q * 1.0, k, v)[0] * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(attend(*(t.requires_grad_() for t in (q, k, v))), (q, k, v), grad_out)
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v), grad_out)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


def test_same_bits_on_any_thread_count():
    g = torch.Generator().manual_seed(2)
    q, k, v, grad_out = (torch.randn(2, 3, 45, 32, generator=g) for _ in range(4))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_ours(q, k, v, grad_out))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_supports_only_what_it_computes():
    q = torch.zeros(1, 4, 8, 32)
    assert cpu_attention.supports(q, torch.zeros(1, 2, 8, 32))
    assert not cpu_attention.supports(torch.zeros(1, 4, 8, 24), torch.zeros(1, 4, 8, 24))   # head size
    assert not cpu_attention.supports(q, torch.zeros(1, 4, 9, 32))                           # past keys
    assert not cpu_attention.supports(q, torch.zeros(1, 3, 8, 32))                           # 4 heads over 3


def test_library_is_built_once_per_cache(tmp_path):
    """A fresh cache builds the library (by rename, no temporary left); a second process reuses it."""
    script = ("import torch; from phitrain.model import cpu_attention as c; "
              "q = torch.randn(1, 1, 4, 16); c.causal_attention(q, q, q); print(c._library()._name)")
    env = {**os.environ, "PHITRAIN_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    built = sorted((tmp_path / "kernels").iterdir())
    assert [p.name for p in built] == [os.path.basename(first.stdout.strip())]
    mtime = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert second.stdout == first.stdout and built[0].stat().st_mtime_ns == mtime
