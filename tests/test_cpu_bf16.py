"""bf16 GEMMs as fp32 GEMMs of bf16 values (`phitrain.model.cpu_bf16`), where a CPU emulates bf16: the
values of torch's own bf16 linear under autocast, forward and backward, eager and compiled, with the bf16
inputs saved for the backward. Emulation is forced on, so the path is tested on every CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_phitrain_model, tiny_config

from phitrain.model import cpu_bf16
from phitrain.model.cpu_bf16 import Linear, gemm_dtype

pytestmark = pytest.mark.usefixtures("torch_single_thread")



@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "CPU_HAS_NATIVE_BF16", False)


def _linear_and_input(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    lin = Linear(48, 80, bias=bias)
    x = torch.randn(3, 11, 48, requires_grad=True)
    return lin, x


def _forward_backward(lin, x, fn):
    lin.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = [x.grad, lin.weight.grad] + ([lin.bias.grad] if lin.bias is not None else [])
    return y, grads


def _within_bf16_rounding(got: torch.Tensor, want: torch.Tensor, ulps: float = 2.0) -> None:
    """Each element within `ulps` bf16 units in the last place of its own value: the two sum in different
    orders, so a result can round to the neighbouring bf16 value (or, compiled, keep its fp32 value)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    _, exponent = torch.frexp(want.double())
    ulp = torch.ldexp(torch.ones_like(want, dtype=torch.float64), exponent - 8)   # bf16: 8-bit significand
    excess = (got.double() - want.double()).abs() - ulps * ulp
    assert excess.max() <= 0, f"{(excess > 0).sum().item()} of {want.numel()} elements off by more than {ulps} ulps"


@pytest.mark.parametrize("bias", [True, False])
def test_emulated_linear_gives_torchs_bf16_linear(emulated, bias):
    lin, x = _linear_and_input(bias)
    y, grads = _forward_backward(lin, x, lin)
    want_y, want_grads = _forward_backward(lin, x, lambda x: F.linear(x, lin.weight, lin.bias))
    assert y.dtype == torch.bfloat16
    _within_bf16_rounding(y, want_y)
    for got, want in zip(grads, want_grads):
        _within_bf16_rounding(got, want)


def test_emulated_linear_saves_its_bf16_inputs_not_fp32_copies(emulated):
    lin, x = _linear_and_input(bias=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(x)
    assert saved and all(dtype == torch.bfloat16 for dtype in saved), saved


def test_emulated_linear_compiled_gives_torchs_bf16_linear(emulated):
    lin, x = _linear_and_input(bias=True)
    want_y, want_grads = _forward_backward(lin, x, lambda x: F.linear(x, lin.weight, lin.bias))
    # as `train.parallel.compile_blocks` compiles where bf16 is emulated: inductor keeps the casts' rounding
    compiled = torch.compile(lin, fullgraph=True, options={"emulate_precision_casts": True})
    y, grads = _forward_backward(lin, x, compiled)
    _within_bf16_rounding(y, want_y)
    for got, want in zip(grads, want_grads):
        _within_bf16_rounding(got, want)


def test_without_autocast_bf16_weights_take_the_emulated_path_and_mixed_dtypes_still_fail(emulated):
    lin, x = _linear_and_input(bias=True)
    lin = lin.to(torch.bfloat16)
    xb = x.detach().bfloat16()
    _within_bf16_rounding(lin(xb), F.linear(xb, lin.weight, lin.bias))
    with pytest.raises(RuntimeError):   # as nn.Linear: a bf16 input to fp32 weights is a mistake
        Linear(48, 80)(xb)


def test_fp32_and_native_paths_are_nn_linear():
    lin, x = _linear_and_input(bias=True)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
    assert gemm_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert gemm_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    assert gemm_dtype(torch.float16, torch.device("cpu")) == torch.float16


def test_gemm_dtype_is_fp32_for_bf16_on_an_emulating_cpu(emulated):
    assert gemm_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32


def test_emulated_model_training_step_matches_the_native_path(monkeypatch):
    """The whole model under bf16 autocast, emulated or through torch's bf16 GEMMs: the same loss and
    gradients up to bf16 rounding of the differently ordered sums."""
    model = random_phitrain_model(tiny_config("parallel-hd64"), seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    results = {}
    for native in (True, False):
        monkeypatch.setattr(cpu_bf16, "CPU_HAS_NATIVE_BF16", native)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results[native] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    (loss_n, grads_n), (loss_e, grads_e) = results[True], results[False]
    torch.testing.assert_close(loss_e, loss_n, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads_e, grads_n):
        assert (got - want).norm() <= 3e-2 * want.norm() + 1e-6


def test_compiled_blocks_keep_the_casts_rounding_where_bf16_is_emulated(emulated, monkeypatch):
    """`compile_blocks` (`compile: true`/`auto`) asks inductor to keep every cast's rounding for a CPU run
    where bf16 is emulated, decided from the training device (the model may still be on meta)."""
    from phitrain.model.phi import PhiModel
    from phitrain.train import parallel

    options = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: options.append(kwargs.get("options")))
    with torch.device("meta"):
        model = PhiModel(tiny_config("parallel-hd64"))
    parallel.compile_blocks(model, torch.device("cpu"))
    assert options == [{"emulate_precision_casts": True}] * len(model.blocks)
    options.clear()
    parallel.compile_blocks(model, torch.device("cuda"))
    assert options == [None] * len(model.blocks)


def test_the_mfu_peak_of_emulated_bf16_is_the_fp32_matmul_rate(emulated):
    """Where bf16 GEMMs run in fp32, a bf16 run's MFU is measured against the fp32 matmul it runs."""
    from phitrain.train.metrics import measure_matmul_tflops, peak_tflops

    peak, source = peak_tflops(torch.device("cpu"), "bf16", None)
    assert peak == measure_matmul_tflops(torch.device("cpu"), torch.float32)
    assert "fp32 matmul" in source and "bf16 GEMMs run in fp32" in source
