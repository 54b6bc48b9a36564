"""The vocabulary projection fused with the loss (`phitrain.model.loss`) computes F.cross_entropy of the
full logits: the same loss and gradients, with ignored targets, ragged chunks, autocast and no grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_phitrain_model, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from phitrain.model import cpu_bf16
from phitrain.model.loss import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _inputs(n=37, hidden=24, vocab=101, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::5] = -100
    return h, w, b, t


def _loss_and_grads(fn, h, w, b, t):
    params = [x for x in (h, w, b) if x is not None]
    loss = fn(h, w, b, t)
    return loss.detach(), torch.autograd.grad(loss, params)


def _reference(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_full_logits_cross_entropy_in_fp32(chunk, bias):
    h, w, b, t = _inputs(bias=bias)
    ref_loss, ref_grads = _loss_and_grads(_reference, h, w, b, t)
    loss, grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk), h, w, b, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_scales_with_the_incoming_gradient_and_leaves_ignored_rows_at_zero():
    h, w, b, t = _inputs()
    (2.5 * linear_cross_entropy(h, w, b, t, chunk_rows=8)).backward()
    fused = h.grad.clone()
    h.grad = None
    (2.5 * _reference(h, w, b, t)).backward()
    torch.testing.assert_close(fused, h.grad, rtol=1e-5, atol=1e-7)
    assert fused[t == -100].abs().max() == 0


@pytest.mark.parametrize("emulated", [False, True], ids=["bf16-gemm", "fp32-gemm-of-bf16"])
def test_bf16_autocast_is_close_to_the_autocast_reference(emulated, monkeypatch):
    """Through the CPU's bf16 GEMM and through fp32 GEMMs of bf16 values (as where bf16 is emulated)."""
    monkeypatch.setattr(cpu_bf16, "CPU_HAS_NATIVE_BF16", not emulated)
    h, w, b, t = _inputs(n=64, hidden=64, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(_reference, h, w, b, t)
        loss, grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), h, w, b, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        assert (got - want).norm() / want.norm() < 2e-2


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_no_grad_computes_only_the_loss():
    """Under torch.no_grad only the logits' GEMMs run (one a chunk), though h, w, b require gradients."""
    h, w, b, t = _inputs()
    with torch.no_grad(), _CountMatmuls() as counted:
        loss = linear_cross_entropy(h, w, b, t, chunk_rows=8)
    assert not loss.requires_grad
    assert counted.calls == ["addmm"] * 5   # 37 rows in chunks of 8
    torch.testing.assert_close(loss, _reference(h, w, b, t).detach(), rtol=1e-6, atol=1e-6)
    with _CountMatmuls() as counted:        # with gradients: the two gradient GEMMs of each chunk too
        linear_cross_entropy(h, w, b, t, chunk_rows=8)
    assert sorted(counted.calls) == sorted(["addmm", "mm", "addmm_"] * 5)


def test_all_targets_ignored_gives_zero_not_nan():
    h, w, b, t = _inputs()
    t[:] = -100
    loss = linear_cross_entropy(h, w, b, t)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("name", ["parallel-hd64", "sequential-gqa4"])
def test_model_loss_is_the_cross_entropy_of_its_logits(name):
    model = random_phitrain_model(tiny_config(name), seed=3)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :4] = -100
    with torch.no_grad():
        logits = model(x)
        expected = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(model(x, y), expected, rtol=1e-6, atol=1e-6)
