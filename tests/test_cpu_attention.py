"""phitrain's CPU causal-attention kernel (model/cpu_attention.c): forward, log-sum-exp and gradients
against a float64 reference, over the shapes it takes (ragged lengths, grouped-query heads, head
sizes 16-80, strided inputs as the model passes them), in fp32 and in bf16 (AVX512-BF16's dot
products where the CPU has them, else fp32 arithmetic rounded back: both as accurate as PyTorch's bf16
flash kernel); eager and compiled; and the build cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from phitrain.model import cpu_attention, cpu_build

SHAPES = [
    (2, 3, 3, 37, 32),    # ragged row blocks and key vectors
    (1, 4, 2, 70, 16),    # grouped-query heads, two per key/value head
    (2, 2, 2, 256, 64),   # phi-1's head size
    (1, 2, 1, 33, 80),    # phi-2's head size: two vectors, then one
    (1, 1, 1, 1, 32),     # one token
]


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


def _flash(q, k, v, grad_out):
    """PyTorch's CPU flash kernel (the one a bf16 run would use otherwise); no log-sum-exp."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return (out, None, *torch.autograd.grad(out, (q, k, v), grad_out))


def _assert_close(ours, reference):
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], ours, reference):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        scale = max(b.abs().max().item(), 1.0)   # inputs are O(1): a zero gradient (T = 1) is ~1e-7 in fp32
        assert (a.double() - b).abs().max().item() < 2e-5 * scale, name


def _relative_error(a, b) -> float:
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-12)).item()


def _inputs(B, H, H_kv, T, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, H, T, D, generator=g) * 2
    k, v = (torch.randn(B, H_kv, T, D, generator=g) * 2 for _ in range(2))
    grad_out = torch.randn(B, H, T, D, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v, grad_out))


@pytest.mark.parametrize("B,H,H_kv,T,D", SHAPES)
def test_matches_float64_reference(B, H, H_kv, T, D):
    q, k, v, grad_out = _inputs(B, H, H_kv, T, D)
    _assert_close(_ours(q, k, v, grad_out), _reference(q, k, v, grad_out))


@pytest.mark.parametrize("B,H,H_kv,T,D", SHAPES)
def test_bf16_is_as_accurate_as_the_flash_kernel(B, H, H_kv, T, D):
    """bf16 in, bf16 out (fp32 log-sum-exp): against float64 arithmetic on the same bf16 values, each
    result's error is at most the bf16 flash kernel's (+20%, and under 2^-7: bf16 keeps 8 bits)."""
    q, k, v, grad_out = _inputs(B, H, H_kv, T, D, torch.bfloat16)
    reference = _reference(q, k, v, grad_out)
    ours, flash = _ours(q, k, v, grad_out), _flash(q, k, v, grad_out)
    assert ours[1].dtype == torch.float32
    assert (ours[1].double() - reference[1]).abs().max().item() < 2e-5 * max(reference[1].abs().max().item(), 1.0)
    for name, a, f, b in zip(["out", "dq", "dk", "dv"], ours[:1] + ours[2:], flash[:1] + flash[2:],
                             reference[:1] + reference[2:]):
        assert a.shape == b.shape and a.dtype == torch.bfloat16, name
        if b.abs().max() < 1e-6:   # one token: no gradient reaches q and k, but for rounding's residue
            assert a.abs().max() <= max(f.abs().max(), 1e-5), name
            continue
        error = _relative_error(a, b)
        assert error <= 1.2 * _relative_error(f, b) and error < 2 ** -7, (name, error)


def test_bf16_uses_the_dot_product_path_where_the_cpu_has_it():
    """The build (-march=native) has AVX512-BF16's path wherever the compiler turns the instructions on
    for this CPU (gcc 10 and later, where the CPU reports them); elsewhere bf16 is computed in fp32."""
    macros = subprocess.run([cpu_build.compiler(), "-march=native", "-dM", "-E", "-"], input="",
                            capture_output=True, text=True, check=True).stdout
    assert cpu_attention.has_bf16_kernel() == ("__AVX512BF16__" in macros)
    if torch.cpu._is_avx512_bf16_supported():
        assert "__AVX512BF16__" in macros, "this compiler does not know the CPU's AVX512-BF16 (gcc < 10?)"


def test_bf16_without_dot_products_is_the_fp32_kernel_rounded(monkeypatch):
    monkeypatch.setattr(cpu_attention, "has_bf16_kernel", lambda: False)
    q, k, v, grad_out = _inputs(1, 4, 2, 45, 32, torch.bfloat16)
    out, lse, *grads = _ours(q, k, v, grad_out)
    out32, lse32 = cpu_attention.causal_attention(q.float(), k.float(), v.float())
    assert torch.equal(out, out32.bfloat16()) and torch.equal(lse, lse32)
    # the backward sees the output autograd saved: the bf16 one, as the flash kernel's does
    grads32 = cpu_attention.causal_attention_backward(grad_out.float(), q.float(), k.float(), v.float(),
                                                      out.float(), lse)
    for a, b in zip(grads, grads32):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.bfloat16())


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


def test_bf16_rows_off_word_boundaries():
    """bf16 keys are read as 32-bit words of two dims: views whose rows (and heads) start mid-word give
    the contiguous inputs' results."""
    B, H, T, D = 2, 2, 30, 32
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(B, H, T, D, generator=g).bfloat16()
    padded = torch.randn(3, B, H, T, D + 1, generator=g).bfloat16()
    shifted = torch.randn(3, B * H * T * D + 1, generator=g).bfloat16()
    for q, k, v in [[padded[i, ..., 1:] for i in range(3)],                             # row stride D + 1
                    [shifted[i, 1:].view(B, H, T, D) for i in range(3)]]:               # starts mid-word
        assert q.stride(-1) == 1
        contiguous = [t.clone(memory_format=torch.contiguous_format) for t in (q, k, v)]
        for a, b in zip(_ours(q, k, v, grad_out), _ours(*contiguous, grad_out)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matches_eager(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v, grad_out = (torch.randn(2, 4, 40, 32, generator=g).to(dtype) for _ in range(4))

    def attend(q, k, v):
        return cpu_attention.causal_attention(q * 1.0, k, v)[0] * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(attend(*(t.requires_grad_() for t in (q, k, v))), (q, k, v), grad_out)
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v), grad_out)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_on_any_thread_count(dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v, grad_out = (torch.randn(2, 3, 45, 32, generator=g).to(dtype) for _ in range(4))
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
    kv = torch.zeros(1, 2, 8, 32)
    assert cpu_attention.supports(q, kv, kv)
    assert not cpu_attention.supports(torch.zeros(1, 4, 8, 24), *[torch.zeros(1, 4, 8, 24)] * 2)   # head size
    assert not cpu_attention.supports(q, *[torch.zeros(1, 4, 9, 32)] * 2)                          # past keys
    assert not cpu_attention.supports(q, *[torch.zeros(1, 3, 8, 32)] * 2)                          # 4 heads over 3
    assert not cpu_attention.supports(q.bfloat16(), kv, kv)                                        # mixed dtypes
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_attention.causal_attention(q.bfloat16(), kv, kv)


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
