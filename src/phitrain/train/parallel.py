"""Parallelism applied from outside the model (torchtitan's split): the model file stays single-device.

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
starts the process group — gloo on CPU, NCCL on CUDA. `make_engine` picks the `Engine` for the strategy;
every engine has the same methods (shard on meta, set up its wrapper and optimizer, backward, step,
save/load its state, stream the consolidated `model.safetensors`), so the trainer never branches on the
strategy. `materialize`, `init_fresh` and `load_full_weights` give a meta-device model (sharded or not)
its storage and weights one tensor at a time. Strategies:

- none: one process.
- ddp: `DistributedDataParallel`. Every rank holds the whole model and optimizer; gradients are
  all-reduced. The fastest choice while model + AdamW state (16 bytes/parameter in fp32) fit one device.
- fsdp: FSDP2 `fully_shard` on each block and then the root, with a `MixedPrecisionPolicy` (ZeRO-3 style:
  parameters, gradients and optimizer state sharded; each block gathered just in time). For models
  whose training state does not fit one device. Checkpoints are sharded with `torch.distributed.checkpoint`
  (DCP), which reshards on load, so a run can resume on a different number of ranks.
- deepspeed: DeepSpeed ZeRO stage 1/2/3 (Rajbhandari et al. 2020: optimizer state / + gradients / +
  parameters partitioned) with a config generated from the stage; the engine that trained phi-1
  (phi-1 §2.3: 8 A100s with DeepSpeed). DeepSpeed owns accumulation, clipping, loss scaling and its own
  checkpoints; those resume only on the same number of ranks.

A 1-process run with strategy fsdp or deepspeed still uses that engine, over a process group of one, so its
checkpoints, precision handling and numerics are the same code path as on N ranks.
Activation checkpointing and `torch.compile` are applied here too, per block.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from phitrain.checkpoint import MODEL_FILE
from phitrain.config import ParallelConfig, StageConfig
from phitrain.errors import PhitrainError
from phitrain.model.cpu_bf16 import gemm_dtype

DCP_DIR = "dcp"              # FSDP2's sharded model + optimizer state inside a checkpoint directory
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint inside a checkpoint directory
DEEPSPEED_TAG = "state"
_METADATA = {"format": "pt", "producer": "phitrain"}


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch_dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.active:
            value = value.clone()
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order (a one-item list in a single process)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(cfg: ParallelConfig, device_pref: str) -> tuple[Dist, torch.device]:
    """(Dist, this rank's device) from torchrun's environment; a plain process is rank 0 of 1.

    fsdp and deepspeed need a process group even in one process: without torchrun's rendezvous variables
    it is a 1-rank group on an in-memory store.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise PhitrainError("device: cuda was asked for but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and cfg.strategy == "none":
        raise PhitrainError(f"{world} processes were started but parallel.strategy is 'none'; "
                            "set --set parallel.strategy=ddp (or fsdp, deepspeed)")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise PhitrainError("parallel.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    needs_group = world > 1 or cfg.strategy in ("fsdp", "deepspeed")
    if needs_group and not torch_dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            torch_dist.init_process_group(backend=backend)
        else:
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)  # what DeepSpeed reads; torchrun sets them otherwise
            torch_dist.init_process_group(backend=backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    if cfg.strategy == "deepspeed":
        _deepspeed(device).init_distributed(dist_backend=backend)  # adopts the group started above
    return Dist(rank, world, local_rank), device


def _deepspeed(device: torch.device):
    """Import DeepSpeed, on CPU with its cpu accelerator (which must be chosen before the import)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise PhitrainError("parallel.strategy deepspeed needs DeepSpeed: pip install 'phitrain[deepspeed]'") from None
    return deepspeed


def is_comm_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another rank went away (the process died, the
    node was lost or the group timed out) rather than a bug in this rank."""
    if isinstance(err, getattr(torch_dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out"))


def comm_failure_detail(err: BaseException) -> str:
    """The backend's reason in a few words: its first line without the source-location prefix."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo prefixes "[.../pair.cc:545] "
    return text.split(". ")[0][:160]


class Engine:
    """One process, no wrapping; the parallel engines below override what differs. The trainer calls the
    same methods whatever the strategy, in this order:

    `shard(model)` on the meta-device model (FSDP2 shards it there, so no rank ever holds it whole) →
    the trainer materialises and initialises or loads the weights → `setup(model)` wraps the model and
    builds the optimizer → per step `sync_grads`, `backward`, `step` → for checkpoints `save(dir)` (the
    engine's own sharded files), `state_dict()` (what goes into trainer_state.pt), `write_consolidated`
    (the full `model.safetensors`, streamed) and on resume `load(dir, state, saved_world_size)`.
    `loads_weights_itself`: on resume the engine's `load` restores the model too (FSDP2's DCP), so the
    trainer does not read the consolidated weights first.
    """

    owns_step = False
    sharded = False
    loads_weights_itself = False
    kind = "none"

    def __init__(self, stage: StageConfig, cfg: ParallelConfig, dist: Dist, precision: str):
        self.stage, self.cfg, self.dist, self.precision = stage, cfg, dist, precision
        self.module: nn.Module | None = None    # what to call for forward (maybe wrapped)
        self.model: nn.Module | None = None     # the PhiModel underneath
        self.optimizer = None

    def shard(self, model: nn.Module) -> None:
        """Apply sharding to the model while it is still on the meta device."""

    def setup(self, model: nn.Module) -> None:
        from phitrain.train.optim import build_optimizer

        self.model = self.module = model
        self.optimizer = build_optimizer(model, self.stage.optim)

    def sync_grads(self, last_micro_step: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, max_norm: float | None) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self, scaler, max_norm: float | None, finite_loss: bool) -> tuple[float, bool]:
        """Unscale, clip, and step — or skip when the loss or gradient norm is not finite.

        A skipped step changes no weight and no optimizer moment; with fp16 the scaler also lowers its
        scale (mixed-precision training, Micikevicius et al. 2018).
        """
        scaler.unscale_(self.optimizer)
        norm = self.clip(max_norm)
        ok = finite_loss and math.isfinite(norm)
        if ok:
            scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, ok

    def after_eval(self) -> None:
        """Called after a forward-only pass (validation)."""

    def state_dict(self) -> dict | None:
        """What trainer_state.pt holds for this engine: the full optimizer state (sharded engines: None,
        their state is in `save`'s files)."""
        return {"optimizer": self.optimizer.state_dict()}

    def save(self, checkpoint_dir: Path) -> None:
        """Write the engine's sharded state into `checkpoint_dir` (all ranks; the directory is shared)."""

    def load(self, checkpoint_dir: Path, state: dict | None, saved_world_size: int) -> None:
        if state is None:
            raise PhitrainError(f"{checkpoint_dir}: written with a sharded parallel.strategy; resume with that "
                                "strategy")
        self.optimizer.load_state_dict(state["optimizer"])

    def write_consolidated(self, checkpoint_dir: Path, is_writer: bool) -> None:
        """Stream the full weights into `checkpoint_dir/model.safetensors` (collective)."""
        from phitrain.train.consolidate import write_sharded_model

        write_sharded_model(checkpoint_dir / MODEL_FILE, self.model.state_dict().items(), is_writer, _METADATA)


class DDPEngine(Engine):
    kind = "ddp"

    def setup(self, model: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().setup(model)
        device_ids = [self.dist.local_rank] if next(model.parameters()).is_cuda else None
        self.module = DistributedDataParallel(model, device_ids=device_ids)

    def sync_grads(self, last_micro_step: bool):
        return contextlib.nullcontext() if last_micro_step else self.module.no_sync()


class FSDPEngine(Engine):
    """FSDP2: parameters, gradients and optimizer state sharded over ranks, from the meta device on.

    Checkpoints: each rank writes its shards with DCP (`dcp/`), nothing is gathered for the resumable
    state; DCP's metadata records the global shapes, so `load` reshards onto any number of ranks. The
    consolidated `model.safetensors` is streamed one gathered tensor at a time (`write_consolidated`).
    """

    sharded = True
    loads_weights_itself = True
    kind = "fsdp"

    def shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # compute in the training precision, reduce gradients and keep master weights in fp32
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
        # The embedding is a unit of its own, so its gathered weight is freed after the forward instead of
        # staying whole through the backward (vocab x hidden: 210 MB fp32 for phi-1, 0.5 GB per copy at
        # phi-4's 100K vocabulary); the root unit keeps only the final norm and the LM head, which the
        # backward needs first (torchtitan's layout).
        fully_shard(model.embed, mp_policy=mp)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)

    def sync_grads(self, last_micro_step: bool):
        self.module.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    def after_eval(self) -> None:
        # FSDP2 keeps the root's parameters unsharded after a forward (backward would need them next);
        # after a forward-only pass they must be resharded, or the module's parameters are not the
        # sharded ones the optimizer holds.
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def state_dict(self) -> dict | None:
        return None

    def save(self, checkpoint_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(checkpoint_dir / DCP_DIR))

    def load(self, checkpoint_dir: Path, state: dict | None, saved_world_size: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = checkpoint_dir / DCP_DIR
        if not (path / ".metadata").is_file():
            raise PhitrainError(f"{checkpoint_dir}: no sharded FSDP state ({DCP_DIR}/); it was written by another "
                                "parallel.strategy — resume with that strategy")
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        both = {"model": model_state, "optimizer": optim_state}
        dcp.load(both, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])


def deepspeed_config(stage: StageConfig, cfg: ParallelConfig, world_size: int, precision: str) -> dict:
    """The DeepSpeed config for a stage: batch arithmetic, ZeRO stage, precision and clipping from the
    recipe, so the recipe stays the single source of truth."""
    return {
        "train_batch_size": stage.global_batch_size,
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum_steps(world_size),
        "gradient_clipping": stage.optim.grad_clip or 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scaling, as phi-1's fp16 training needs (Micikevicius et al. 2018)
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW with our parameter groups (optim.py)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO: DeepSpeed's engine runs backward (loss scaling, partitioned gradient reduction), the
    accumulation boundary, clipping and the optimizer step; our LR schedule drives the wrapped AdamW's
    param-group learning rates, as it does for the other engines. The model is materialised whole
    before `deepspeed.initialize` (ZeRO-1/2 partition optimizer state and gradients, not weights)."""

    owns_step = True
    sharded = True
    kind = "deepspeed"

    def setup(self, model: nn.Module) -> None:
        deepspeed = _deepspeed(next(model.parameters()).device)
        super().setup(model)
        config = deepspeed_config(self.stage, self.cfg, self.dist.world_size, self.precision)
        self.module, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        self._last_micro_step = True

    def sync_grads(self, last_micro_step: bool):
        self._last_micro_step = last_micro_step
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # the trainer already divided the loss by the accumulation steps
        self.module.backward(loss, scale_wrt_gas=False)
        if not self._last_micro_step:
            self.module.step()  # a micro-step: DeepSpeed counts it and does not update

    def step(self, scaler, max_norm: float | None, finite_loss: bool) -> tuple[float, bool]:
        """DeepSpeed's boundary step; fp16 overflows are skipped by its loss scaler (was_step_applied)."""
        self.module.step()
        norm = self.module.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return norm, bool(self.module.was_step_applied()) and finite_loss and math.isfinite(norm)

    def state_dict(self) -> dict | None:
        return None

    def save(self, checkpoint_dir: Path) -> None:
        self.module.save_checkpoint(str(checkpoint_dir / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)

    def write_consolidated(self, checkpoint_dir: Path, is_writer: bool) -> None:
        """fp32 master weights rebuilt from the ZeRO checkpoint just written (any ZeRO stage, any
        precision: with bf16/fp16 the module holds rounded copies, the optimizer partitions the masters)."""
        if not is_writer:
            return
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from phitrain.train.consolidate import write_sharded_model

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        names = self.model.state_dict().keys()
        write_sharded_model(checkpoint_dir / MODEL_FILE, ((k, state[k]) for k in names), True, _METADATA)

    def load(self, checkpoint_dir: Path, state: dict | None, saved_world_size: int) -> None:
        path = checkpoint_dir / DEEPSPEED_DIR
        if not (path / DEEPSPEED_TAG).is_dir():
            raise PhitrainError(f"{checkpoint_dir}: no DeepSpeed state ({DEEPSPEED_DIR}/); it was written by another "
                                "parallel.strategy — resume with that strategy")
        world = torch_dist.get_world_size()
        if saved_world_size != world:
            raise PhitrainError(
                f"{checkpoint_dir}: DeepSpeed ZeRO state was saved by {saved_world_size} ranks and resumes only on "
                f"the same number (now {world}); restart with --nproc_per_node={saved_world_size}, or use "
                "parallel.strategy=fsdp for runs that change size")
        load_path, _ = self.module.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise PhitrainError(f"{path}: DeepSpeed could not load its checkpoint (tag {DEEPSPEED_TAG!r})")


# ---- materialising a model built on the meta device ---------------------------------------------------

def materialize(model: nn.Module, device: torch.device) -> None:
    """Give a meta-device model (plain, or already sharded by `fully_shard`) real, uninitialised storage
    on `device`: each rank allocates only its own shards (torchtitan's `to_empty` + `init_weights`)."""
    model.to_empty(device=device)
    model.rope.reset_tables()


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds (its shards, for a sharded model)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


def _set_local(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full value `full` into `param` (a DTensor shard or a plain tensor).
    Every rank holds the same `full`, so no communication is needed (`src_data_rank=None`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def init_fresh(model: nn.Module) -> None:
    """`PhiModel.init_weights`, with every value drawn on the CPU for the full tensor and each rank keeping
    its shard: the same numbers as a single process seeded alike, with one full tensor (never the whole
    model) in memory at a time."""
    def fill(param: torch.Tensor, kind: str, std: float) -> None:
        full = torch.empty(param.shape, dtype=param.dtype)
        if kind == "normal":
            full.normal_(0.0, std)
        else:
            full.fill_(0.0 if kind == "zeros" else 1.0)
        _set_local(param, full)

    model.init_weights(fill=fill)


@torch.no_grad()
def load_full_weights(model: nn.Module, path: Path) -> None:
    """Load a consolidated `model.safetensors` into a materialised (maybe sharded) model one tensor at a
    time, read lazily from the file; a missing, extra or mis-shaped tensor is one clear error."""
    from safetensors import SafetensorError, safe_open

    params = model.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(params) - names), sorted(names - set(params))
            if missing:
                raise PhitrainError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
            if unexpected:
                raise PhitrainError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
            for name, param in params.items():
                full = f.get_tensor(name)
                if tuple(full.shape) != tuple(param.shape):
                    raise PhitrainError(f"{path}: tensor {name!r} has shape {tuple(full.shape)}, the config "
                                        f"expects {tuple(param.shape)}")
                _set_local(param, full.to(param.dtype))
    except (SafetensorError, OSError) as err:
        raise PhitrainError(f"{path}: not a readable safetensors file ({err})") from None


def _checkpoint_activations(block: nn.Module) -> None:
    """Recompute the block's activations in backward instead of storing them (Chen et al. 2016).

    The block's own `forward` is replaced on the instance, so parameter names (and with them the
    checkpoint format) stay unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    inner = block.forward
    block.forward = lambda *args: checkpoint(inner, *args, use_reentrant=False)


def make_engine(stage: StageConfig, cfg: ParallelConfig, dist: Dist, precision: str,
                device: torch.device) -> Engine:
    """The engine for `cfg.strategy` (ddp over a single process is `none`: nothing to all-reduce, the
    checkpoint format is the same). Called before any weight is materialised, so `return_freed_memory`
    applies to every tensor of the run."""
    strategy = cfg.strategy
    if strategy == "ddp" and dist.world_size == 1:
        strategy = "none"
    engines = {"none": Engine, "ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}
    if strategy not in engines:
        raise PhitrainError(f"parallel.strategy {strategy!r} is not available in this build")
    engine = engines[strategy](stage, cfg, dist, precision)
    if device.type == "cpu":
        release = cfg.return_freed_memory if cfg.return_freed_memory is not None else engine.sharded
        set_freed_memory_policy(release, dist.is_main)
    return engine


# glibc's mallopt: allocations of at least M_MMAP_THRESHOLD bytes get their own mapping, unmapped when
# freed (setting it also stops glibc from raising it after each free, up to 32 MB); free memory above
# M_TRIM_THRESHOLD at the heap's top goes back to the OS.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_RELEASE_BYTES = 1 << 20
_DEFAULT_TRIM_BYTES = 128 << 10   # glibc's own M_TRIM_THRESHOLD
_KEEP_BYTES = (1 << 31) - 1


def set_freed_memory_policy(release: bool, report: bool) -> bool:
    """What the C library does with freed tensors (glibc only; elsewhere a one-line warning).

    release: tensors of 1 MB or more go back to the OS when freed, so a rank's memory is what its
    shards need, not what fragmentation left behind (the sharded strategies). keep: every freed tensor
    stays with the process for the next one, so a step never takes fresh pages from the OS. glibc's
    default, which maps and unmaps tensors above a threshold it keeps moving, had a CPU bf16 8x256
    step of phi-1-tiny take 12,000-41,000 page faults on 2 Zen 4 cores, at ~3 µs each in this VM:
    262 ms a compiled step kept against 272-331 by default, 276 eager against 289-348.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # both thresholds each time: a process may keep for one stage and release for the next
        mmap, trim = (_RELEASE_BYTES, _DEFAULT_TRIM_BYTES) if release else (_KEEP_BYTES, _KEEP_BYTES)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
    except (OSError, AttributeError):
        ok = False
    if not ok and report:
        print("warning: parallel.return_freed_memory: this C library has no mallopt(M_MMAP_THRESHOLD); "
              "freed memory follows its defaults", file=sys.stderr, flush=True)
    return ok


def apply_block_options(model: nn.Module, stage: StageConfig, device: torch.device) -> None:
    """Activation checkpointing and (`compile: true`) `torch.compile`, per block, before any sharding or
    wrapping (the model may still be on the meta device; `device` is where it will train). (`compile:
    auto` decides later, from the first steps' times: `train.trainer`.)"""
    if stage.activation_checkpointing:
        for block in model.blocks:
            _checkpoint_activations(block)
    if stage.compile is True:
        compile_blocks(model, device)


def compile_blocks(model: nn.Module, device: torch.device) -> None:
    """`torch.compile` each block in place (parameter names unchanged), torchtitan's granularity: the
    blocks are identical, so dynamo compiles one graph that all of them reuse, and FSDP2's per-block
    units keep their hooks outside the compiled code. Inductor fuses the elementwise work between the
    matmuls (LayerNorm, bias + GELU, rotary, residual adds, autocast casts) in both directions.

    Where the CPU emulates bf16 (`phitrain.model.cpu_bf16`: fp32 GEMMs of bf16 values) inductor keeps
    the rounding of every cast (`emulate_precision_casts`), which it would otherwise fold away when it
    fuses a cast to bf16 and back, leaving the GEMMs fp32 inputs."""
    emulated = gemm_dtype(torch.bfloat16, torch.device(device)) != torch.bfloat16
    for block in model.blocks:
        block.compile(options={"emulate_precision_casts": True} if emulated else None)
