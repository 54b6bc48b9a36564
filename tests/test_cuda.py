"""CUDA-only checks: what the CPU suite cannot exercise — fp16 loss scaling, bf16 autocast, fused AdamW,
FlashAttention's backward, `torch.compile`, FSDP2 over NCCL and generation on the GPU.

The whole module is skipped without a CUDA device, so the CPU run never needs one. Models are the tiny
presets (phi-1-tiny: parallel block; phi-4-tiny: sequential block with GQA) with a 512-id vocabulary and
dropout off, so every test takes seconds on a GPU (the compile tests: the time of one compilation).
Training goes through phitrain's own engine (`parallel.make_engine` → `Engine.setup` → `Engine.step`, the
Trainer's calls) wherever the trainer's behaviour is what is being checked.
"""

from __future__ import annotations

import contextlib
import copy
import math
import socket

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from phitrain.config import ModelConfig, OptimConfig, ParallelConfig, StageConfig
from phitrain.model.generate import generate
from phitrain.model.phi import PhiModel
from phitrain.model.presets import get_preset
from phitrain.train import parallel
from phitrain.train.optim import build_optimizer, param_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

DEVICE = torch.device("cuda")
PRESETS = ["phi-1-tiny", "phi-4-tiny"]
VOCAB, BATCH, SEQ, LR, STEPS = 512, 4, 64, 3e-3, 20
GRAD_CLIP = 1.0
BF16_RTOL = 0.05   # relative (norm) error allowed where one side computes in bf16; a real bug is O(1)
FP32_RTOL = 1e-4   # the same computation in fp32, only the order of floating-point operations differs
PROMPTS = [[5, 17, 3, 99, 250], [42], [7, 7, 8, 300, 11, 12, 13, 1]]   # unequal lengths: a left-padded batch
NEW_TOKENS = 32


# ---- helpers ---------------------------------------------------------------------------------------

def tiny_config(preset: str = "phi-1-tiny", **overrides) -> ModelConfig:
    """A tiny preset with a 512-id vocabulary and dropout off, so runs of the same weights are comparable."""
    return get_preset(preset, vocab_size=VOCAB, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **overrides)


def tiny_model(preset: str = "phi-1-tiny", device: torch.device | str = DEVICE, **overrides) -> PhiModel:
    torch.manual_seed(0)
    return PhiModel(tiny_config(preset, **overrides)).to(device)


def fixed_batch(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [BATCH, SEQ] on the GPU: each row counts up in steps of 7 (mod the vocabulary), a
    pattern a tiny model learns within a few steps."""
    ids = (torch.arange(SEQ + 1) * 7 + torch.arange(BATCH)[:, None] * 31) % cfg.vocab_size
    ids = ids.to(DEVICE)
    return ids[:, :-1], ids[:, 1:]


def autocast(precision: str):
    """The trainer's autocast: bf16/fp16 compute over fp32 weights, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def stage_config(**fields) -> StageConfig:
    """A one-micro-batch stage; the data section is required by the schema but never read here."""
    return StageConfig.model_validate(dict(
        name="cuda", model="phi-1-tiny", data={"data_dir": "unused", "sources": [{"path": "unused", "weight": 1.0}]},
        seq_len=SEQ, global_batch_size=BATCH, micro_batch_size=BATCH, max_steps=STEPS, optim={"lr": LR}, **fields))


def build(precision: str, strategy: str = "none", dist: parallel.Dist | None = None,
          preset: str = "phi-1-tiny") -> parallel.Engine:
    """The Trainer's build on the GPU: meta-device model → engine.shard → materialise → init_fresh (seed 0,
    so the same weights whatever the strategy) → engine.setup (wrapping and build_optimizer)."""
    engine = parallel.make_engine(stage_config(), ParallelConfig(strategy=strategy), dist or parallel.Dist(),
                                  precision, DEVICE)
    with torch.device("meta"):
        model = PhiModel(tiny_config(preset))
    engine.shard(model)
    parallel.materialize(model, DEVICE)
    torch.manual_seed(0)
    parallel.init_fresh(model)
    engine.setup(model)
    return engine


def train_steps(engine: parallel.Engine, scaler: torch.amp.GradScaler, batch, steps: int) -> list[float]:
    """`steps` optimizer steps on one fixed batch, as Trainer.train_step takes them (one micro-batch):
    autocast forward, scaled backward, Engine.step (unscale, clip, step, update). Every step must be taken,
    i.e. have a finite loss and a finite gradient norm (no gradient overflowed)."""
    losses = []
    for _ in range(steps):
        with engine.sync_grads(True), autocast(engine.precision):
            loss = engine.module(*batch)
        engine.backward(scaler.scale(loss))
        value = loss.item()
        norm, stepped = engine.step(scaler, GRAD_CLIP, finite_loss=math.isfinite(value))
        assert stepped and math.isfinite(norm), (len(losses), value, norm)
        losses.append(value)
    return losses


def assert_learns(losses: list[float]) -> None:
    assert losses[-1] < 0.7 * losses[0], losses


def loss_and_grads(model: torch.nn.Module, batch, precision: str = "fp32") -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every parameter's gradient from one fresh forward + backward."""
    model.zero_grad(set_to_none=True)
    with autocast(precision):
        loss = model(*batch)
    loss.backward()
    return loss.item(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def assert_close_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    """Each tensor of `got` within `rtol` of `want`'s norm: ||got - want|| <= rtol * ||want||."""
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name].float(), want[name].float()
        err = float((a - b).norm() / b.norm())
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:g}"


# ---- mixed precision -------------------------------------------------------------------------------

def test_fp16_grad_scaler_trains_and_skips_an_overflow_step():
    """fp16 autocast with dynamic loss scaling through the engine (fused AdamW): the loss falls over 20 steps
    with every step taken at the initial scale (no gradient ever overflowed); then a step whose loss is
    scaled by 1e30 overflows fp16 and is skipped — no weight and no AdamW moment changes, the scale halves —
    and training goes on from there."""
    engine = build("fp16")
    scaler = torch.amp.GradScaler("cuda")
    initial_scale = scaler.get_scale()
    batch = fixed_batch(engine.model.config)
    assert_learns(train_steps(engine, scaler, batch, STEPS))
    assert scaler.get_scale() == initial_scale

    def state() -> list[torch.Tensor]:
        tensors = [p.detach().clone() for p in engine.model.parameters()]
        return tensors + [v.clone() for s in engine.optimizer.state.values() for v in s.values()]

    before = state()
    with autocast("fp16"):
        loss = engine.module(*batch)
    engine.backward(scaler.scale(loss * 1e30))
    norm, stepped = engine.step(scaler, GRAD_CLIP, finite_loss=True)
    assert not stepped and not math.isfinite(norm)
    assert scaler.get_scale() == initial_scale / 2
    assert all(torch.equal(a, b) for a, b in zip(state(), before, strict=True))
    assert all(math.isfinite(x) for x in train_steps(engine, scaler, batch, 2))


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_matches_fp32_logits_and_trains(preset):
    """bf16 autocast really computes in bf16 (bf16 logits), stays within bf16 tolerance of the fp32
    forward of the same weights, and trains: the loss falls over 20 engine steps."""
    engine = build("bf16", preset=preset)
    model, batch = engine.model, fixed_batch(engine.model.config)
    with torch.no_grad():
        want = model(batch[0])
        with autocast("bf16"):
            got = model(batch[0])
    assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
    assert_close_rel({"logits": got}, {"logits": want}, BF16_RTOL)
    assert_learns(train_steps(engine, torch.amp.GradScaler("cuda", enabled=False), batch, STEPS))


# ---- optimizer, attention kernels, compile ---------------------------------------------------------------

def test_build_optimizer_is_fused_on_cuda_and_matches_foreach():
    """build_optimizer on a CUDA model gives the fused AdamW kernel, and its steps equal torch's foreach
    AdamW (same parameter groups and hyperparameters) on a copy given the same gradients, to 1e-6, while
    each step moves the weights by about the learning rate."""
    cfg = OptimConfig(lr=LR)
    model = tiny_model()
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True and not fused.defaults["foreach"]
    assert all(group["fused"] for group in fused.param_groups)
    ref_model = copy.deepcopy(model)
    ref = torch.optim.AdamW(param_groups(ref_model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps, foreach=True)
    batch = fixed_batch(model.config)
    for _ in range(3):
        start = [p.detach().clone() for p in model.parameters()]
        _, grads = loss_and_grads(model, batch)
        for name, p in ref_model.named_parameters():
            p.grad = grads[name].clone()
        fused.step()
        ref.step()
        moved = max(float((p - p0).abs().max()) for p, p0 in zip(model.parameters(), start))
        assert 0.5 * LR < moved < 2 * LR
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_flash_attention_backward_matches_math(preset):
    """With SDPA restricted to FlashAttention (an error, not a fallback, if it cannot run), a bf16
    forward + backward of the model runs, and its loss and gradients match the math backend's within
    bf16 tolerance."""
    model = tiny_model(preset)
    batch = fixed_batch(model.config)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash_loss, flash = loss_and_grads(model, batch, "bf16")
    with sdpa_kernel(SDPBackend.MATH):
        math_loss, reference = loss_and_grads(model, batch, "bf16")
    assert abs(flash_loss - math_loss) <= 1e-2 * math_loss
    assert_close_rel(flash, reference, BF16_RTOL)


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_blocks_match_eager(preset):
    """`compile: true` as the trainer applies it (parallel.apply_block_options: torch.compile per block)
    gives the eager model's loss and gradients in fp32."""
    eager = tiny_model(preset)
    compiled = copy.deepcopy(eager)
    parallel.apply_block_options(compiled, stage_config(compile=True), DEVICE)
    batch = fixed_batch(eager.config)
    want_loss, want = loss_and_grads(eager, batch)
    got_loss, got = loss_and_grads(compiled, batch)
    assert abs(got_loss - want_loss) <= FP32_RTOL * want_loss
    assert_close_rel(got, want, FP32_RTOL)


# ---- FSDP2 over NCCL -------------------------------------------------------------------------------

@pytest.fixture
def nccl_group(monkeypatch):
    """A one-rank NCCL process group on 127.0.0.1, started by phitrain's init_distributed from the
    environment torchrun would set; destroyed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    dist, device = parallel.init_distributed(ParallelConfig(strategy="fsdp", backend="nccl"), "cuda")
    try:
        assert torch.distributed.get_backend() == "nccl" and torch.distributed.get_world_size() == 1
        assert device.type == "cuda"
        yield dist
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_one_rank_over_nccl_matches_single_gpu(nccl_group):
    """phitrain's FSDP2 engine on one NCCL rank (sharded on the meta device, fused AdamW over DTensors,
    clipping of the sharded gradient norm) trains like the plain single-GPU engine in fp32: the same
    per-step losses to 1e-4 relative and the same final weights to 1e-4 (test_distributed's tolerances)."""
    plain = build("fp32")
    batch = fixed_batch(plain.model.config)
    off = torch.amp.GradScaler("cuda", enabled=False)
    want = train_steps(plain, off, batch, 5)
    fsdp = build("fp32", strategy="fsdp", dist=nccl_group)
    assert isinstance(fsdp, parallel.FSDPEngine)
    assert all(hasattr(p, "full_tensor") for p in fsdp.model.parameters())   # DTensor shards
    got = train_steps(fsdp, off, batch, 5)
    assert all(abs(g - w) <= FP32_RTOL * w for g, w in zip(got, want, strict=True)), (got, want)
    sharded = fsdp.model.state_dict()
    for name, weight in plain.model.state_dict().items():
        torch.testing.assert_close(sharded[name].full_tensor(), weight, rtol=0, atol=1e-4, msg=name)


# ---- generation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_generation_on_gpu_matches_cpu_and_uncached(preset):
    """Greedy decoding of a left-padded batch on the GPU (KV cache) gives the CPU's tokens, and so does
    the GPU without the cache (initializer_range 0.2: peaked logits, no near-ties between devices)."""
    model = tiny_model(preset, device="cpu", initializer_range=0.2)
    on_cpu = generate(model, PROMPTS, NEW_TOKENS)
    assert all(len(row) == NEW_TOKENS for row in on_cpu)
    model.to(DEVICE)
    assert generate(model, PROMPTS, NEW_TOKENS) == on_cpu
    assert generate(model, PROMPTS, NEW_TOKENS, use_cache=False) == on_cpu


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_decode_generates_the_same_tokens(preset):
    """`generate(..., compile=True)` (torch.compile, mode reduce-overhead: CUDA graphs) gives the eager
    tokens, on the first call and on a second call of the same shapes (graphs replayed, new prompts)."""
    model = tiny_model(preset, initializer_range=0.2)
    prompt_sets = [PROMPTS, PROMPTS[::-1]]
    want = [generate(model, prompts, NEW_TOKENS) for prompts in prompt_sets]
    got = [generate(model, prompts, NEW_TOKENS, compile=True) for prompts in prompt_sets]
    assert got == want
