"""The CPU training attention paths (model/attention.py): the written-out backward gives the flash
kernel's gradients, and compiled bf16 training uses it where it measured faster (AMX); without AMX,
phitrain's own kernel (model/cpu_attention.py, tested in test_cpu_attention.py) is used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._python_dispatch import TorchDispatchMode

import phitrain.model.attention as attention_mod
from phitrain.model.attention import _FlashForwardMathBackward
from phitrain.model.phi import PhiModel

FLASH_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"
OWN_BACKWARD = "phitrain.causal_attention_backward"


def _grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("T", [37, 256, 300])   # one ragged block; exactly one block; a full and a ragged one
def test_written_out_backward_is_as_accurate_as_the_flash_kernel(T):
    g = torch.Generator().manual_seed(T)
    q, k, v, grad_out = (torch.randn(2, 3, T, 32, generator=g) * 2 for _ in range(4))
    reference = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), q, k, v, grad_out)
    low = [t.bfloat16() for t in (q, k, v, grad_out)]
    flash = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), *low)
    ours = _grads(_FlashForwardMathBackward.apply, *low)
    for name, ref, f, o in zip("qkv", reference, flash, ours):
        assert o.dtype == torch.bfloat16
        flash_error, our_error = _relative_error(f, ref), _relative_error(o, ref)
        assert our_error < 1.5 * flash_error + 1e-3, (name, our_error, flash_error)


def _backward_graphs(model, ids, targets):
    """The aten graphs of the model's compiled backward passes (aot_autograd, no inductor: fast)."""
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep)
    for block in model.blocks:
        block.compile(backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, targets)
    loss.backward()
    return graphs


@pytest.mark.parametrize("name", ["parallel-hd64", "sequential-gqa4"])
def test_compiled_bf16_training_uses_the_written_out_backward(name, monkeypatch):
    # the path is taken with AMX only (measured there); its maths runs on any CPU
    monkeypatch.setattr(attention_mod, "CPU_HAS_AMX", True)
    cfg = tiny_config(name)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    targets = ids.roll(-1, dims=1)

    torch.manual_seed(0)
    eager = PhiModel(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager(ids, targets).backward()

    torch.manual_seed(0)
    compiled = PhiModel(cfg)
    graphs = _backward_graphs(compiled, ids, targets)
    assert graphs and not any(FLASH_BACKWARD in code for code in graphs)
    for (pname, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0.05, atol=2e-3), pname

    # beyond the measured limit the flash kernel's own backward is kept; without AMX, phitrain's kernel
    for setting, backward in [(("MATH_BACKWARD_MAX_LEN", 32), FLASH_BACKWARD), (("CPU_HAS_AMX", False), OWN_BACKWARD)]:
        torch._dynamo.reset()
        with monkeypatch.context() as patch:
            patch.setattr(attention_mod, *setting)
            torch.manual_seed(0)
            graphs = _backward_graphs(PhiModel(cfg), ids, targets)
        assert any(backward in code for code in graphs), setting


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
def test_eager_bf16_training_paths(amx, monkeypatch):
    """Eager bf16 training runs the flash kernel in bf16 with AMX, phitrain's kernel in bf16 without
    (set here, so both are checked on any CPU); fp32 training runs phitrain's kernel on either."""
    monkeypatch.setattr(attention_mod, "CPU_HAS_AMX", amx)
    q, k, v = (torch.randn(1, 2, 16, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention_mod.attention(q, k, v, attn_mask=None, is_causal=True, dropout_p=0.0, enable_gqa=False)
    assert "FlashForwardMathBackward" not in type(out.grad_fn).__name__
    assert out.dtype == torch.bfloat16
    if amx:
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    else:
        assert _runs_own_kernel(out) and "phitrain_causal_attention" in type(out.grad_fn).__name__   # no cast
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        assert torch.allclose(out.float(), reference, atol=1e-2, rtol=1e-2)
    fp32 = attention_mod.attention(q.float(), k.float(), v.float(), attn_mask=None, is_causal=True,
                                   dropout_p=0.0, enable_gqa=False)
    assert _runs_own_kernel(fp32)


def _runs_own_kernel(out) -> bool:
    """Whether phitrain's causal-attention op made `out` (directly, or before a cast back to bf16)."""
    fns = [out.grad_fn, *(fn for fn, _ in out.grad_fn.next_functions)]
    return any("phitrain_causal_attention" in type(fn).__name__ for fn in fns)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_takes_the_same_kernels(amx, dtype, monkeypatch):
    """Without gradients (evaluation, a prompt's prefill) causal attention runs phitrain's kernel as
    training does, the bf16 flash kernel where AMX runs it."""
    monkeypatch.setattr(attention_mod, "CPU_HAS_AMX", amx)
    q, k, v = (torch.randn(2, 4, 24, 32, dtype=dtype) for _ in range(3))
    with torch.no_grad(), _RecordOps() as recorded:
        out = attention_mod.attention(q, k, v, attn_mask=None, is_causal=True, dropout_p=0.0, enable_gqa=False)
    own = "phitrain.causal_attention" in recorded.names
    assert own == (not (amx and dtype == torch.bfloat16)), recorded.names
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert out.dtype == dtype and torch.allclose(out.double(), reference, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
