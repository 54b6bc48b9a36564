"""phitrain's CPU GELU kernel (model/cpu_gelu.c): the tanh GELU and its derivative against float64, in
fp32 and bf16 (one rounding of the fp32 result, to nearest even), ragged lengths, strided inputs, and
the eager model's use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phitrain.model import cpu_gelu
from phitrain.model.phi import gelu_tanh

pytestmark = pytest.mark.skipif(not cpu_gelu.AVAILABLE, reason="no C compiler: eager GELU stays ATen's")


def _exact(x: torch.Tensor) -> torch.Tensor:
    """x·σ(2u) in float64: the tanh GELU without the tanh form's cancellation (1 + tanh u at u << 0)."""
    x = x.double()
    return x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))


def _exact_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.double().requires_grad_()
    return torch.autograd.grad(_exact(x), x, grad.double())[0]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 20_001])
def test_fp32_matches_float64(n):
    x = torch.linspace(-12, 12, n) if n > 1 else torch.tensor([0.7])
    grad = torch.randn(n, generator=torch.Generator().manual_seed(n))
    xs = x.clone().requires_grad_()
    out = cpu_gelu.gelu_tanh(xs)
    out.backward(grad)
    assert out.dtype == xs.grad.dtype == torch.float32
    assert (out.double() - _exact(x)).abs().max() < 1e-6
    assert (xs.grad.double() - _exact_grad(x, grad)).abs().max() < 2e-6
    aten = F.gelu(x, approximate="tanh").double()   # ATen's own error, at the same points, is of this size
    assert (aten - _exact(x)).abs().max() < 1e-6


def test_bf16_is_the_fp32_result_rounded_to_nearest_even():
    x = (torch.randn(4099, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    grad = torch.randn(4099, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = cpu_gelu.gelu_tanh(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, cpu_gelu.gelu_tanh(x.float()).bfloat16())
    back = torch.ops.phitrain.gelu_tanh_backward(grad, x)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back, torch.ops.phitrain.gelu_tanh_backward(grad.float(), x.float()).bfloat16())
    # and so within half a bf16 ulp (at most 2^-8 of the value) of the exact values
    exact = _exact(x)
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()


def test_nan_stays_nan_and_strided_inputs_are_read_right():
    x = torch.randn(64, 300)[:, ::3]   # not contiguous
    x[0, 0] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype)
        out = cpu_gelu.gelu_tanh(xs)
        assert out.isnan()[0, 0] and not out.isnan().flatten()[1:].any()
        torch.testing.assert_close(out, cpu_gelu.gelu_tanh(xs.contiguous()), rtol=0, atol=0, equal_nan=True)


def test_same_bits_on_any_thread_count():
    x = torch.randn(100_003)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(cpu_gelu.gelu_tanh(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*outs)


def test_eager_model_gelu_uses_the_kernel_for_large_cpu_tensors(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_gelu, "gelu_tanh", lambda x: calls.append(x.numel()) or F.gelu(x, approximate="tanh"))
    gelu_tanh(torch.randn(8, cpu_gelu.MIN_ELEMENTS // 8))
    gelu_tanh(torch.randn(cpu_gelu.MIN_ELEMENTS - 1))       # small: ATen's kernel is faster
    gelu_tanh(torch.randn(cpu_gelu.MIN_ELEMENTS, dtype=torch.float64))   # a dtype the kernel does not take
    assert calls == [cpu_gelu.MIN_ELEMENTS]


def test_compiled_matches_eager():
    x = torch.randn(4, 5000)
    compiled = torch.compile(lambda t: cpu_gelu.gelu_tanh(t * 1.0) * 2.0, fullgraph=True, backend="aot_eager")
    xs, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    (cpu_gelu.gelu_tanh(xs * 1.0) * 2.0).sum().backward()
    compiled(xc).sum().backward()
    assert torch.equal(xs.grad, xc.grad)
