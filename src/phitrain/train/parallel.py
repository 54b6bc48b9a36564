"""Parallelism applied from outside the model (torchtitan's split): the model file stays single-device.

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
starts the process group — gloo on CPU, NCCL on CUDA. `wrap` turns a plain `PhiModel` into an `Engine`:
the module to call, how to run backward and the optimizer step, how to skip gradient sync on
accumulation micro-steps, how to gather full weights for the consolidated `model.safetensors`, and —
for the sharded strategies — how to save and load their own sharded state. Strategies:

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
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from phitrain.config import ParallelConfig, StageConfig
from phitrain.errors import PhitrainError

DCP_DIR = "dcp"              # FSDP2's sharded model + optimizer state inside a checkpoint directory
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own checkpoint inside a checkpoint directory
DEEPSPEED_TAG = "state"


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
    """Single-process engine; the parallel engines below override what differs.

    `sharded` engines write their own optimizer (and model) state into the checkpoint directory
    (`save_sharded` / `load_sharded`); the others return a full optimizer state dict that goes into
    trainer_state.pt.
    """

    owns_step = False
    sharded = False
    kind = "none"

    def __init__(self, module: nn.Module, model: nn.Module):
        self.module = module      # what to call for forward (maybe wrapped)
        self.model = model        # the plain PhiModel underneath
        self.optimizer = None     # engines that build their own optimizer set this

    def sync_grads(self, last_micro_step: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, max_norm: float | None) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self, optimizer, scaler, max_norm: float | None, finite_loss: bool) -> tuple[float, bool]:
        """Unscale, clip, and step — or skip when the loss or gradient norm is not finite.

        A skipped step changes no weight and no optimizer moment; with fp16 the scaler also lowers its
        scale (mixed-precision training, Micikevicius et al. 2018).
        """
        scaler.unscale_(optimizer)
        norm = self.clip(max_norm)
        ok = finite_loss and math.isfinite(norm)
        if ok:
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm, ok

    def after_eval(self) -> None:
        """Called after a forward-only pass (validation)."""

    def full_state_dict(self, checkpoint_dir: Path) -> dict:
        """The full weights, on rank 0 (other ranks may get an empty dict). Collective."""
        return self.model.state_dict()

    def optimizer_state(self, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def save_sharded(self, checkpoint_dir: Path, optimizer) -> None:
        """Write this engine's sharded state into `checkpoint_dir` (all ranks; the directory is shared)."""

    def load_sharded(self, checkpoint_dir: Path, optimizer, saved_world_size: int) -> None:
        raise NotImplementedError


class DDPEngine(Engine):
    kind = "ddp"

    def sync_grads(self, last_micro_step: bool):
        return contextlib.nullcontext() if last_micro_step else self.module.no_sync()


class FSDPEngine(Engine):
    """FSDP2: parameters, gradients and optimizer state sharded over ranks.

    Checkpoints: each rank writes its shards with DCP (`dcp/`), nothing is gathered for the resumable
    state; DCP's metadata records the global shapes, so `load_sharded` reshards onto any number of ranks.
    Only the consolidated `model.safetensors` (what eval/convert/generate read) is gathered on rank 0.
    """

    sharded = True
    kind = "fsdp"

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

    def full_state_dict(self, checkpoint_dir: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_sharded(self, checkpoint_dir: Path, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(checkpoint_dir / DCP_DIR))

    def load_sharded(self, checkpoint_dir: Path, optimizer, saved_world_size: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = checkpoint_dir / DCP_DIR
        if not (path / ".metadata").is_file():
            raise PhitrainError(f"{checkpoint_dir}: no sharded FSDP state ({DCP_DIR}/); it was written by another "
                                "parallel.strategy — resume with that strategy")
        model_state, optim_state = get_state_dict(self.module, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


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
    param-group learning rates, as it does for the other engines."""

    owns_step = True
    sharded = True
    kind = "deepspeed"

    def __init__(self, ds_engine, model: nn.Module, optimizer):
        super().__init__(ds_engine, model)
        self.optimizer = optimizer
        self._last_micro_step = True

    def sync_grads(self, last_micro_step: bool):
        self._last_micro_step = last_micro_step
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # the trainer already divided the loss by the accumulation steps
        self.module.backward(loss, scale_wrt_gas=False)
        if not self._last_micro_step:
            self.module.step()  # a micro-step: DeepSpeed counts it and does not update

    def step(self, optimizer, scaler, max_norm: float | None, finite_loss: bool) -> tuple[float, bool]:
        """DeepSpeed's boundary step; fp16 overflows are skipped by its loss scaler (was_step_applied)."""
        self.module.step()
        norm = self.module.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return norm, bool(self.module.was_step_applied()) and finite_loss and math.isfinite(norm)

    def save_sharded(self, checkpoint_dir: Path, optimizer) -> None:
        self.module.save_checkpoint(str(checkpoint_dir / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)

    def full_state_dict(self, checkpoint_dir: Path) -> dict:
        """fp32 master weights rebuilt from the ZeRO checkpoint just written (any ZeRO stage, any
        precision: with bf16/fp16 the module holds rounded copies, the optimizer partitions the masters)."""
        if torch_dist.get_rank() != 0:
            return {}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        return {k: v for k, v in state.items() if k in self.model.state_dict()}

    def load_sharded(self, checkpoint_dir: Path, optimizer, saved_world_size: int) -> None:
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


def wrap(model: nn.Module, stage: StageConfig, cfg: ParallelConfig, dist: Dist, precision: str,
         build_optimizer=None) -> Engine:
    """The engine for `cfg.strategy`. `build_optimizer(model)` makes the AdamW the DeepSpeed engine wraps
    (the other engines leave the optimizer to the trainer, built after wrapping so it holds the sharded
    parameters)."""
    for block in model.blocks:
        if stage.activation_checkpointing:
            _checkpoint_activations(block)
        if stage.compile:
            block.compile()
    strategy = cfg.strategy
    if strategy == "ddp" and dist.world_size == 1:
        strategy = "none"  # nothing to all-reduce; the checkpoint format is the same
    if strategy == "none":
        return Engine(model, model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist.local_rank] if next(model.parameters()).is_cuda else None
        return DDPEngine(DistributedDataParallel(model, device_ids=device_ids), model)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # compute in the training precision, reduce gradients and keep master weights in fp32
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return FSDPEngine(model, model)
    if strategy == "deepspeed":
        deepspeed = _deepspeed(next(model.parameters()).device)
        if build_optimizer is None:
            raise PhitrainError("parallel.strategy deepspeed: wrap() needs build_optimizer")
        optimizer = build_optimizer(model)
        ds_engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(stage, cfg, dist.world_size, precision))
        return DeepSpeedEngine(ds_engine, model, optimizer)
    raise PhitrainError(f"parallel.strategy {strategy!r} is not available in this build")
