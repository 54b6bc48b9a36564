"""The training loop of one stage (phi-1 §2.3, Phi-4 §3): next-token loss on fixed-length windows, AdamW,
linear warmup/decay, fp16/bf16/fp32, dropout, gradient accumulation, checkpoints and exact resume.

Shaped after torchtitan: the model is built on the meta device, the engine shards it there (FSDP2), each
rank materialises only its own shards, and the weights are then drawn (`parallel.init_fresh`: the same
numbers whatever the strategy), loaded from the previous stage (one tensor at a time), or restored from
a checkpoint. The resumable state is a list of stateful components — the engine (model + optimizer), LR
scheduler, grad scaler, data loader, RNGs and the `TrainState` counters — that one `Checkpointer` saves
and loads through their `state_dict()` / `load_state_dict()`, so an interrupted run continues with
bit-identical losses (fp32, CPU). The `Trainer` never branches on the parallel strategy.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from phitrain import compile_cache
from phitrain.checkpoint import (MODEL_FILE, clean_partial, complete_checkpoints, copy_model_files,
                                 finish_train_checkpoint, load_model_config, load_trainer_state, new_staging_dir, prune,
                                 rng_state, set_rng_state)
from phitrain.config import ModelConfig, StageConfig
from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text
from phitrain.model.attention import CPU_HAS_AMX
from phitrain.model.cpu_bf16 import CPU_HAS_NATIVE_BF16
from phitrain.model.phi import PhiModel
from phitrain.model.presets import get_preset
from phitrain.progress import Progress
from phitrain.train import parallel
from phitrain.train.metrics import MetricsLogger, peak_tflops, plot_metrics, read_metrics
from phitrain.train.optim import build_scheduler

FINAL_DIR = "final"
SUMMARY_FILE = "summary.json"

# `compile: auto` decides once, after this many steps (the first pays one-off costs; the next time eager).
AUTO_COMPILE_STEP = 3
# Share of an eager step that compiled blocks save. CPU, phi-1-tiny at 8x256 on 2 cores
# (benchmarks/model_speed.py): in bf16 on a CPU with AMX 16-23%, most of it the attention backward that
# only compiled code replaces (model/attention.py); in bf16 on other CPUs with bf16 GEMMs (Zen 4) 11-13%
# (also 4x1024), the casts and elementwise work fused around GEMMs twice as fast as fp32's; otherwise
# 3-6%, the attention kernels being the same eager or compiled. CUDA: not measured here
# (benchmarks/gpu_mfu.py --no-compile measures it); elementwise work is a larger share of a GPU step.
AUTO_COMPILE_GAIN = {"cpu": 0.05, "cpu-bf16": 0.10, "cpu-bf16-amx": 0.15, "cuda": 0.10}
# The compile time assumed for a configuration never compiled on this machine (cold cache; phi-1-tiny
# measured 34 s on 2 CPU cores).
DEFAULT_COMPILE_S = {"cpu": 40.0, "cuda": 90.0}


@dataclass
class StageSummary:
    stage: str
    steps: int
    tokens: int
    skipped_steps: int
    loss_spikes: int
    first_loss: float | None
    final_loss: float | None
    val_loss_start: float | None
    val_loss_end: float | None
    best_step: int | None
    tokens_per_s: float
    mfu: float
    peak_tflops: float
    peak_source: str
    precision: str
    device: str
    wall_s: float
    params: int
    final_dir: str
    compiled_at_step: int | None = None      # the step after which the blocks ran compiled (0: from the start)
    peak_rss_mb: list[dict] | None = None    # per rank: after build, the first step, the last save
    build: list[dict] | None = None          # per rank: parameter bytes this rank holds vs the whole model


# ---- setup ---------------------------------------------------------------------------------------

def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or
    AMX — about 4x faster than fp32 matmuls there), fp16 on older GPUs, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if CPU_HAS_NATIVE_BF16 else "fp32"


def model_config(stage: StageConfig, tokenizer, init_dir: Path | None) -> ModelConfig:
    """The stage's model: a preset, or the previous stage's config under the stage's changes.

    Midtraining (Phi-4 §3) changes `rope_theta` and `max_position_embeddings`; neither changes a weight
    shape, so the previous weights load unchanged and only the RoPE tables are recomputed.
    """
    if stage.model is not None:
        cfg = get_preset(stage.model, **stage.model_overrides)
    else:
        if init_dir is None:
            raise PhitrainError(f"stage {stage.name!r}: init_from has no checkpoint to start from")
        previous = load_model_config(init_dir)
        try:
            cfg = type(previous).model_validate({**previous.model_dump(), **stage.model_overrides})
        except ValueError as err:
            raise PhitrainError(f"stage {stage.name!r}: model_overrides: {err}") from None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise PhitrainError(
            f"stage {stage.name!r}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size "
            f"is {cfg.vocab_size}; set model_overrides.vocab_size")
    if stage.seq_len > cfg.max_position_embeddings:
        raise PhitrainError(
            f"stage {stage.name!r}: seq_len {stage.seq_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}; raise it in model_overrides")
    return cfg


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
@torch.no_grad()
def validation_loss(model, windows: torch.Tensor, batch_size: int, device, precision) -> float | None:
    """Mean next-token loss over held-out windows [N, seq_len+1], without gradients (with them, the fused
    loss would compute the vocabulary projection's gradients too: two more GEMMs for every one)."""
    if windows is None or len(windows) == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        w = windows[start:start + batch_size].to(device)
        with _autocast(device, precision):
            loss = model(w[:, :-1], w[:, 1:])
        total += float(loss) * len(w)
        count += len(w)
    model.train(was_training)
    return total / count


# ---- stateful components ---------------------------------------------------------------------------

@dataclass
class TrainState:
    """The loop's counters and running values; saved and restored with everything else."""

    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    spikes: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    loss_ema: float | None = None
    compiled_at: int | None = None   # compile: auto compiled the blocks after this step (a resume does too)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class RNGState:
    """Python, NumPy, torch CPU and CUDA generators (they drive dropout)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class Checkpointer:
    """Saves and loads a list of stateful components as one checkpoint directory.

    `components` are saved by their `state_dict()` into trainer_state.pt; those named in `per_rank` hold
    one state per rank (gathered on save; on a resume with a different number of ranks every rank takes
    rank 0's, which is exact for the loader — its position is global — and only reseeds dropout). The
    engine adds its own files (sharded model/optimizer state) and the consolidated `model.safetensors`,
    streamed one tensor at a time (or skipped with `save_consolidated: false`; `phitrain checkpoint
    consolidate` writes it later). The directory is assembled under a hidden name and renamed with
    `COMPLETE` written last, so a kill at any moment leaves the previous checkpoint intact.
    """

    def __init__(self, root: Path, engine: "parallel.Engine", components: dict, per_rank: set[str],
                 dist: "parallel.Dist", model_cfg: ModelConfig, tokenizer, stage: StageConfig):
        self.root, self.engine, self.components, self.per_rank = root, engine, components, per_rank
        self.dist, self.model_cfg, self.tokenizer, self.stage = dist, model_cfg, tokenizer, stage

    def latest(self) -> tuple[int, Path] | None:
        ckpts = complete_checkpoints(self.root)
        return ckpts[-1] if ckpts else None

    def save(self, step: int, keep: set[int]) -> None:
        dist = self.dist
        staging = Path(dist.broadcast_object(str(new_staging_dir(self.root)) if dist.is_main else None))
        self.engine.save(staging)
        state = {"strategy": self.engine.kind, "world_size": dist.world_size, "engine": self.engine.state_dict(),
                 "components": {name: dist.gather_object(c.state_dict()) if name in self.per_rank else c.state_dict()
                                for name, c in self.components.items()},
                 "stage": self.stage.model_dump(mode="json")}
        if self.stage.save_consolidated or not self.engine.loads_weights_itself:   # the only copy of the weights
            self.engine.write_consolidated(staging, is_writer=dist.is_main)
        if dist.is_main:
            finish_train_checkpoint(staging, self.root, step, self.model_cfg, self.tokenizer, state)
            prune(self.root, self.stage.keep_last, keep=keep)
        dist.barrier()

    def load(self, directory: Path) -> bool:
        """Restore every component from `directory`; returns whether the number of ranks is the same."""
        state = load_trainer_state(directory)
        saved_world = state["world_size"]
        self.engine.load(directory, state["engine"], saved_world_size=saved_world)
        same_world = saved_world == self.dist.world_size
        for name, component in self.components.items():
            value = state["components"][name]
            component.load_state_dict(value[self.dist.rank if same_world else 0] if name in self.per_rank else value)
        return same_world


# ---- the trainer ------------------------------------------------------------------------------------

class Trainer:
    """One stage: build (meta → shard → materialise → init/load → wrap), resume, loop, checkpoint."""

    def __init__(self, stage: StageConfig, stage_dir: Path, *, tokenizer, init_dir: Path | None,
                 device: torch.device, dist: "parallel.Dist", parallel_cfg):
        from phitrain.data.windows import WindowLoader, load_validation_windows

        self.stage, self.stage_dir, self.device, self.dist = stage, stage_dir, device, dist
        stage_dir.mkdir(parents=True, exist_ok=True)
        ckpt_root = stage_dir / "checkpoints"
        if dist.is_main:
            clean_partial(ckpt_root)
        dist.barrier()
        self.peak_rss: dict[str, float] = {}

        self.precision = resolve_precision(stage.precision, device)
        self.model_cfg = model_config(stage, tokenizer, init_dir)
        with torch.device("meta"):
            model = PhiModel(self.model_cfg)
        self.engine = parallel.make_engine(stage, parallel_cfg, dist, self.precision, device)
        parallel.apply_block_options(model, stage, device)
        self.engine.shard(model)                  # FSDP2: each rank keeps only its shards from here on
        on_meta = all(p.is_meta for p in model.parameters())
        parallel.materialize(model, device)
        self.build_info = {"rank": dist.rank, "params_on_meta_until_materialized": on_meta,
                           "local_param_bytes": parallel.local_param_bytes(model),
                           "model_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
        last = complete_checkpoints(ckpt_root)
        if last and not self.engine.loads_weights_itself:
            parallel.load_full_weights(model, last[-1][1] / MODEL_FILE)
        elif not last and init_dir is not None and stage.model is None:
            parallel.load_full_weights(model, Path(init_dir) / MODEL_FILE)
        elif not last:
            torch.manual_seed(stage.seed)
            parallel.init_fresh(model)
        self.engine.setup(model)
        self.n_params = model.num_params()
        self.flops_per_token = model.flops_per_token(stage.seq_len)
        self.accum = stage.grad_accum_steps(dist.world_size)

        self.loader = WindowLoader(stage.data, stage.seq_len, stage.micro_batch_size, rank=dist.rank,
                                   world_size=dist.world_size)
        self.val_windows = load_validation_windows(stage.data, stage.seq_len, stage.eval_windows)
        self.scheduler = build_scheduler(self.engine.optimizer, stage.optim, stage.max_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16" and not self.engine.owns_step)
        self.state = TrainState()
        self.checkpointer = Checkpointer(
            ckpt_root, self.engine, {"scheduler": self.scheduler, "scaler": self.scaler, "loader": self.loader,
                                     "rng": RNGState(), "train_state": self.state},
            {"loader", "rng"}, dist, self.model_cfg, tokenizer, stage)
        if last:
            step, directory = last[-1]
            same_world = self.checkpointer.load(directory)
            if not same_world:   # distinct dropout streams per rank, repeatably
                torch.manual_seed(stage.seed + 7919 * self.state.step + dist.rank)
            if dist.is_main:
                print(f"[{stage.name}] resuming from {directory} (step {step})", flush=True)
        else:
            torch.manual_seed(stage.seed + dist.rank)  # dropout streams differ per rank, repeatably
        self.compiled = stage.compile is True
        if self.state.compiled_at is not None and not self.compiled:   # resume: as the run was before
            self._compile_blocks(model)
            if dist.is_main:
                print(f"[{stage.name}] compile auto: compiling the blocks again (the run compiled them after "
                      f"step {self.state.compiled_at})", flush=True)
        self._eager_step_s: list[float] = []
        self.peak_rss["build"] = _rss_mb()
        self.logger = MetricsLogger(stage_dir / "metrics.jsonl", resume_step=self.state.step, enabled=dist.is_main)
        self.peak, self.peak_source = peak_tflops(device, self.precision, stage.peak_tflops)

    # ---- compile: auto ---------------------------------------------------------------------------

    def _compile_key(self) -> str:
        return compile_cache.config_key(model=self.model_cfg.model_dump(mode="json"), seq=self.stage.seq_len,
                                        micro=self.stage.micro_batch_size, precision=self.precision,
                                        device=self.device.type, torch=torch.__version__,
                                        checkpointing=self.stage.activation_checkpointing)

    def _compile_blocks(self, model) -> None:
        compile_cache.keep_inductor_cache()
        parallel.compile_blocks(model, self.device)
        self.compiled = True

    def _auto_compile(self, record: dict) -> None:
        """`compile: auto`: after AUTO_COMPILE_STEP steps, compile the blocks when the eager time left
        times the expected gain exceeds the compile cost (last measured for this configuration on this
        machine, else a cold-cache default). Rank 0 decides for all ranks. Sharded engines (fsdp,
        deepspeed) stay eager: compiling must come before sharding there (`compile: true`)."""
        stage, st = self.stage, self.state
        if self.compiled:
            if st.compiled_at is not None and st.step == st.compiled_at + 1 and self._eager_step_s:
                # the first compiled step paid for compiling: keep that cost for the next decision
                cost = max(0.0, record["step_time_s"] - min(self._eager_step_s))
                if self.dist.is_main:
                    compile_cache.record_compile_seconds(self._compile_key(), cost)
            return
        if stage.compile != "auto" or st.step > AUTO_COMPILE_STEP:
            return
        if st.step > 1:
            self._eager_step_s.append(record["step_time_s"])
        if st.step < AUTO_COMPILE_STEP:
            return
        if self.engine.kind not in ("none", "ddp"):
            message = f"stays eager ({self.engine.kind} compiles before sharding: set compile: true)"
            decide = False
        else:
            eager_s = min(self._eager_step_s) if self._eager_step_s else record["step_time_s"]
            left_s = (stage.max_steps - st.step) * eager_s
            known = compile_cache.last_compile_seconds(self._compile_key())
            cost = known if known is not None else DEFAULT_COMPILE_S.get(self.device.type, 60.0)
            kind = self.device.type
            if kind == "cpu" and self.precision == "bf16" and CPU_HAS_NATIVE_BF16:
                kind = "cpu-bf16-amx" if CPU_HAS_AMX else "cpu-bf16"
            saving = left_s * AUTO_COMPILE_GAIN.get(kind, 0.05)
            decide = bool(self.dist.broadcast_object(saving > cost if self.dist.is_main else None))
            message = (f"{'compiling the blocks' if decide else 'stays eager'}: ~{saving:.0f} s to save over "
                       f"{stage.max_steps - st.step} steps vs ~{cost:.0f} s to compile "
                       f"({'as last measured' if known is not None else 'never compiled here: assumed'})")
        if self.dist.is_main:
            print(f"[{stage.name}] compile auto: {message}", flush=True)
        if decide:
            self._compile_blocks(self.engine.model)
            st.compiled_at = st.step

    def evaluate(self, step: int) -> float | None:
        val = validation_loss(self.engine.module, self.val_windows, self.stage.micro_batch_size, self.device,
                              self.precision)
        self.engine.after_eval()
        if val is not None:
            self.logger.log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
        return val

    def train_step(self) -> dict:
        """One optimizer step over `accum` micro-batches; returns the step's metrics record."""
        stage, engine, st = self.stage, self.engine, self.state
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            inputs, targets = next(self.loader)
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            with engine.sync_grads(micro == self.accum - 1), _autocast(self.device, self.precision):
                loss = engine.module(inputs, targets)
            engine.backward(self.scaler.scale(loss / self.accum))
            loss_sum += loss.detach().float()
        loss_value = float(self.dist.mean(loss_sum / self.accum))
        grad_norm, stepped = engine.step(self.scaler, stage.optim.grad_clip, finite_loss=math.isfinite(loss_value))
        self.scheduler.step()
        st.step += 1
        st.tokens_seen += stage.tokens_per_step
        dt = time.perf_counter() - t0
        record = {"step": st.step, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens": st.tokens_seen, "tokens_per_s": stage.tokens_per_step / dt,
                  "mfu": self.flops_per_token * stage.tokens_per_step / dt / (self.peak * 1e12),
                  "step_time_s": dt, "mem_mb": _memory_mb(self.device)}
        if not stepped:
            st.skipped += 1
            record["skipped"] = True
        elif math.isfinite(loss_value):
            if st.loss_ema is not None and st.step > stage.optim.warmup_steps and \
                    loss_value > stage.spike_factor * st.loss_ema:
                st.spikes += 1
                record["spike"] = True
            st.loss_ema = loss_value if st.loss_ema is None else 0.9 * st.loss_ema + 0.1 * loss_value
        return record

    def fit(self) -> StageSummary:
        stage, st, dist = self.stage, self.state, self.dist
        val_start = self.evaluate(0) if st.step == 0 else _first_val(self.stage_dir)
        first_loss = _first_loss(self.stage_dir) if st.step else None
        progress = Progress(stage.name, stage.max_steps, completed=st.step, enabled=dist.is_main, file=sys.stdout,
                            unit="step")
        t_stage = time.perf_counter()
        steps_run, steps_timed, time_timed = 0, 0, 0.0
        loss_value = None
        self.engine.module.train()
        while st.step < stage.max_steps:
            record = self.train_step()
            loss_value = record["loss"]
            # this run's first step, and the first after an auto compile, pay one-off costs (allocator
            # warm-up, compiling): neither counts in tokens/s
            first_step = steps_run == 0 or (st.compiled_at is not None and st.step == st.compiled_at + 1)
            steps_run += 1
            if not first_step:
                steps_timed, time_timed = steps_timed + 1, time_timed + record["step_time_s"]
            self.peak_rss.setdefault("first_step", _rss_mb())
            self._auto_compile(record)
            if first_loss is None:
                first_loss = loss_value
            if st.step % stage.log_every == 0 or st.step == stage.max_steps or record.get("skipped"):
                self.logger.log(record)
            progress.update(st.step, f"loss {loss_value:.4f}  {record['tokens_per_s']:,.0f} tok/s")
            is_last = st.step == stage.max_steps
            do_save = (stage.save_every and st.step % stage.save_every == 0) or is_last
            val = self.evaluate(st.step) if (stage.eval_every and st.step % stage.eval_every == 0) or is_last else None
            if do_save and stage.keep_best:
                # best-checkpoint selection only among saved steps, so the best one always exists on disk
                val = self.evaluate(st.step) if val is None else val
                if val is not None and val < st.best_val_loss:
                    st.best_val_loss, st.best_step = val, st.step
            if do_save:
                keep = {st.best_step} if stage.keep_best and st.best_step is not None else set()
                self.checkpointer.save(st.step, keep)
                self.peak_rss["save"] = _rss_mb()
        progress.close()
        self.logger.close()
        self._write_final()
        wall = time.perf_counter() - t_stage
        tok_s = stage.tokens_per_step * steps_timed / time_timed if time_timed else 0.0
        records = read_metrics(self.stage_dir / "metrics.jsonl") if dist.is_main else []
        summary = StageSummary(
            stage=stage.name, steps=st.step, tokens=st.tokens_seen, skipped_steps=st.skipped, loss_spikes=st.spikes,
            first_loss=first_loss, final_loss=loss_value, val_loss_start=val_start,
            val_loss_end=_last_val(records), best_step=st.best_step, tokens_per_s=tok_s,
            mfu=self.flops_per_token * tok_s / (self.peak * 1e12), peak_tflops=self.peak,
            peak_source=self.peak_source, precision=self.precision, device=str(self.device), wall_s=wall,
            params=self.n_params, final_dir=str(self.stage_dir / FINAL_DIR),
            compiled_at_step=0 if stage.compile is True else st.compiled_at,
            peak_rss_mb=dist.gather_object(self.peak_rss), build=dist.gather_object(self.build_info))
        if dist.is_main:
            plot_metrics(records, self.stage_dir, stage.name)
            atomic_write_text(self.stage_dir / SUMMARY_FILE, json.dumps(asdict(summary), indent=2) + "\n")
        dist.barrier()
        return summary

    def _write_final(self) -> None:
        """The stage's product: the best (keep_best) or last checkpoint's model files under `final/`,
        copied (or, without consolidated weights, consolidated from its DCP shards) — no model object."""
        st = self.state
        src = st.best_step if self.stage.keep_best and st.best_step is not None else st.step
        if self.dist.is_main:
            src_dir = dict(complete_checkpoints(self.checkpointer.root))[src]
            copy_model_files(src_dir, self.stage_dir / FINAL_DIR)
        self.dist.barrier()


def run_stage(stage: StageConfig, stage_dir: Path, *, tokenizer, init_dir: Path | None,
              device: torch.device, dist: "parallel.Dist", parallel_cfg) -> StageSummary:
    """Train one stage into `stage_dir` (resuming if it holds checkpoints); returns its summary.

    A collective that fails because another rank died (or its node was lost) becomes one clear error on
    the surviving ranks instead of a backend traceback; torchrun then stops the job.
    """
    try:
        return Trainer(stage, stage_dir, tokenizer=tokenizer, init_dir=init_dir, device=device, dist=dist,
                       parallel_cfg=parallel_cfg).fit()
    except Exception as err:
        if dist.world_size == 1 or not parallel.is_comm_failure(err):
            raise
        ckpts = complete_checkpoints(stage_dir / "checkpoints")
        resume = f"from {ckpts[-1][1]}" if ckpts else "from the start of the stage (no complete checkpoint yet)"
        raise PhitrainError(f"rank {dist.rank}: lost contact with another rank ({parallel.comm_failure_detail(err)}): "
                            f"a process died or a node was lost, so the job stops. Re-run the same command to "
                            f"resume {resume}") from None


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mb()


def _first_val(stage_dir: Path) -> float | None:
    return next((r["val_loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "val_loss" in r), None)


def _last_val(records: list[dict]) -> float | None:
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    return vals[-1] if vals else None


def _first_loss(stage_dir: Path) -> float | None:
    return next((r["loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "loss" in r), None)
