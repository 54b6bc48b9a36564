"""The training loop of one stage (phi-1 §2.3, Phi-4 §3): next-token loss on fixed-length windows, AdamW,
linear warmup/decay, fp16/bf16/fp32, dropout, gradient accumulation, checkpoints and exact resume.

`run_stage` reads top to bottom: build the model (fresh from a preset, or from the previous stage's
weights with the midtrain/finetune changes), place it (device, precision, parallel wrapping), build the
optimizer/schedule/loader, resume from the newest complete checkpoint if there is one, then loop.
Every stateful component (model, optimizer, scheduler, grad scaler, loader, RNGs, counters) is saved and
restored, so an interrupted run continues with bit-identical losses (fp32, CPU).
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

from phitrain.checkpoint import (MODEL_FILE, clean_partial, complete_checkpoints, finish_train_checkpoint,
                                 load_checkpoint, load_model_config, load_trainer_state, load_weights, model_from_state,
                                 new_staging_dir, prune, read_state_dict, rng_state, save_checkpoint, set_rng_state)
from phitrain.config import StageConfig
from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text
from phitrain.model.phi import PhiModel
from phitrain.model.presets import get_preset
from phitrain.progress import Progress
from phitrain.train import parallel
from phitrain.train.metrics import MetricsLogger, peak_tflops, plot_metrics, read_metrics
from phitrain.train.optim import build_optimizer, build_scheduler

FINAL_DIR = "final"
SUMMARY_FILE = "summary.json"


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


# ---- setup ---------------------------------------------------------------------------------------

def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or
    AMX — about 4x faster than fp32 matmuls there), fp16 on older GPUs, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def build_model(stage: StageConfig, tokenizer, init_dir: Path | None) -> PhiModel:
    """A fresh model from a preset, or the previous weights under the stage's config changes.

    Midtraining (Phi-4 §3) changes `rope_theta` and `max_position_embeddings`; neither changes a weight
    shape, so the weights load unchanged and only the RoPE tables are recomputed.
    """
    if stage.model is not None:
        cfg = get_preset(stage.model, **stage.model_overrides)
        model = PhiModel(cfg)
    else:
        if init_dir is None:
            raise PhitrainError(f"stage {stage.name!r}: init_from has no checkpoint to start from")
        previous = load_model_config(init_dir)
        try:
            cfg = type(previous).model_validate({**previous.model_dump(), **stage.model_overrides})
        except ValueError as err:
            raise PhitrainError(f"stage {stage.name!r}: model_overrides: {err}") from None
        model = model_from_state(cfg, read_state_dict(Path(init_dir) / MODEL_FILE), init_dir)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise PhitrainError(
            f"stage {stage.name!r}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size "
            f"is {model.config.vocab_size}; set model_overrides.vocab_size")
    if stage.seq_len > model.config.max_position_embeddings:
        raise PhitrainError(
            f"stage {stage.name!r}: seq_len {stage.seq_len} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}; raise it in model_overrides")
    return model


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def validation_loss(model, windows: torch.Tensor, batch_size: int, device, precision) -> float | None:
    """Mean next-token loss over held-out windows [N, seq_len+1]."""
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


# ---- the stage -----------------------------------------------------------------------------------

def run_stage(stage: StageConfig, stage_dir: Path, *, tokenizer, init_dir: Path | None,
              device: torch.device, dist: "parallel.Dist", parallel_cfg) -> StageSummary:
    """Train one stage into `stage_dir` (resuming if it holds checkpoints); returns its summary.

    A collective that fails because another rank died (or its node was lost) becomes one clear error on
    the surviving ranks instead of a backend traceback; torchrun then stops the job.
    """
    try:
        return _train_stage(stage, stage_dir, tokenizer=tokenizer, init_dir=init_dir, device=device, dist=dist,
                            parallel_cfg=parallel_cfg)
    except Exception as err:
        if dist.world_size == 1 or not parallel.is_comm_failure(err):
            raise
        ckpts = complete_checkpoints(stage_dir / "checkpoints")
        resume = f"from {ckpts[-1][1]}" if ckpts else "from the start of the stage (no complete checkpoint yet)"
        raise PhitrainError(f"rank {dist.rank}: lost contact with another rank ({parallel.comm_failure_detail(err)}): "
                            f"a process died or a node was lost, so the job stops. Re-run the same command to "
                            f"resume {resume}") from None


def _train_stage(stage: StageConfig, stage_dir: Path, *, tokenizer, init_dir: Path | None,
                 device: torch.device, dist: "parallel.Dist", parallel_cfg) -> StageSummary:
    from phitrain.data.windows import WindowLoader, load_validation_windows

    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = stage_dir / "checkpoints"
    if dist.is_main:
        clean_partial(ckpt_root)
    dist.barrier()

    torch.manual_seed(stage.seed)
    model = build_model(stage, tokenizer, init_dir)
    precision = resolve_precision(stage.precision, device)
    model.to(device)
    accum = stage.grad_accum_steps(dist.world_size)
    model_cfg = model.config
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(stage.seq_len)

    loader = WindowLoader(stage.data, stage.seq_len, stage.micro_batch_size, rank=dist.rank,
                          world_size=dist.world_size)
    val_windows = load_validation_windows(stage.data, stage.seq_len, stage.eval_windows)

    # Resume: the newest complete checkpoint restores weights before wrapping, state after (sharded
    # engines — FSDP2, DeepSpeed — then load their own sharded model and optimizer state).
    state = None
    ckpts = complete_checkpoints(ckpt_root)
    if ckpts:
        last_step, last_dir = ckpts[-1]
        load_weights(model, {k: v.to(device) for k, v in read_state_dict(last_dir / MODEL_FILE).items()}, last_dir)
        state = load_trainer_state(last_dir)
        if dist.is_main:
            print(f"[{stage.name}] resuming from {last_dir} (step {last_step})", flush=True)

    engine = parallel.wrap(model, stage, parallel_cfg, dist, precision,
                           build_optimizer=lambda m: build_optimizer(m, stage.optim))
    optimizer = engine.optimizer if engine.optimizer is not None else build_optimizer(model, stage.optim)
    scheduler = build_scheduler(optimizer, stage.optim, stage.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and not engine.owns_step)

    step, tokens_seen, skipped, spikes = 0, 0, 0, 0
    best = {"val_loss": math.inf, "step": None}
    loss_ema = None
    if state is not None:
        saved_world = len(state["loader"])
        if engine.sharded:
            engine.load_sharded(last_dir, optimizer, saved_world_size=saved_world)
        elif state["optimizer"] is None:
            raise PhitrainError(f"{last_dir}: written with parallel.strategy {state.get('strategy')!r}, whose optimizer "
                                "state is sharded; resume with that strategy")
        else:
            engine.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        # per-rank states; a resume on a different number of ranks takes rank 0's (the loader's state
        # is a global position, the RNGs only drive dropout)
        same_world = saved_world == dist.world_size
        loader.load_state_dict(state["loader"][dist.rank if same_world else 0])
        set_rng_state(state["rng"][dist.rank if same_world else 0])
        if not same_world:
            torch.manual_seed(stage.seed + 7919 * state["step"] + dist.rank)  # distinct dropout streams per rank
        step, tokens_seen, skipped, spikes = state["step"], state["tokens_seen"], state["skipped"], state["spikes"]
        best, loss_ema = state["best"], state["loss_ema"]
    else:
        torch.manual_seed(stage.seed + dist.rank)  # dropout streams differ per rank, repeatably

    logger = MetricsLogger(stage_dir / "metrics.jsonl", resume_step=step, enabled=dist.is_main)
    peak, peak_source = peak_tflops(device, precision, stage.peak_tflops)

    def save(at_step: int) -> None:
        # every rank writes into one staging directory (sharded state); rank 0 adds the rest and renames it
        staging = Path(dist.broadcast_object(str(new_staging_dir(ckpt_root)) if dist.is_main else None))
        engine.save_sharded(staging, optimizer)
        trainer_state = {
            "optimizer": None if engine.sharded else engine.optimizer_state(optimizer),
            "strategy": engine.kind, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "loader": dist.gather_object(loader.state_dict()),
            "rng": dist.gather_object(rng_state()), "step": at_step, "tokens_seen": tokens_seen,
            "skipped": skipped, "spikes": spikes, "best": best, "loss_ema": loss_ema,
            "stage": stage.model_dump(mode="json"),
        }
        full = engine.full_state_dict(staging)
        if dist.is_main:
            model_copy = model_from_state(model_cfg, full, staging)
            finish_train_checkpoint(staging, ckpt_root, at_step, model_copy, tokenizer, trainer_state)
            best_steps = {best["step"]} if stage.keep_best and best["step"] is not None else set()
            prune(ckpt_root, stage.keep_last, keep=best_steps)
        dist.barrier()

    def evaluate(at_step: int) -> float | None:
        val = validation_loss(engine.module, val_windows, stage.micro_batch_size, device, precision)
        engine.after_eval()
        if val is not None:
            logger.log({"step": at_step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
        return val

    val_start = evaluate(0) if step == 0 else _first_val(stage_dir)
    first_loss = _first_loss(stage_dir) if step else None
    progress = Progress(stage.name, stage.max_steps, completed=step, enabled=dist.is_main, file=sys.stdout,
                        unit="step")
    t_stage = time.perf_counter()
    steps_timed, time_timed = 0, 0.0
    loss_value = None
    engine.module.train()
    while step < stage.max_steps:
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            inputs, targets = next(loader)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with engine.sync_grads(micro == accum - 1), _autocast(device, precision):
                loss = engine.module(inputs, targets)
            engine.backward(scaler.scale(loss / accum))
            loss_sum += loss.detach().float()
        loss_value = float(dist.mean(loss_sum / accum))
        grad_norm, stepped = engine.step(optimizer, scaler, stage.optim.grad_clip,
                                         finite_loss=math.isfinite(loss_value))
        scheduler.step()
        step += 1
        tokens_seen += stage.tokens_per_step
        dt = time.perf_counter() - t0
        if step > 1:  # the first step pays one-off costs (allocator warm-up, compile)
            steps_timed, time_timed = steps_timed + 1, time_timed + dt
        record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens": tokens_seen, "tokens_per_s": stage.tokens_per_step / dt,
                  "mfu": flops_per_token * stage.tokens_per_step / dt / (peak * 1e12),
                  "step_time_s": dt, "mem_mb": _memory_mb(device)}
        if not stepped:
            skipped += 1
            record["skipped"] = True
        elif math.isfinite(loss_value):
            if loss_ema is not None and step > stage.optim.warmup_steps and loss_value > stage.spike_factor * loss_ema:
                spikes += 1
                record["spike"] = True
            loss_ema = loss_value if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_value
        if first_loss is None:
            first_loss = loss_value
        if step % stage.log_every == 0 or step == stage.max_steps or not stepped:
            logger.log(record)
        progress.update(step, f"loss {loss_value:.4f}  {record['tokens_per_s']:,.0f} tok/s")

        is_last = step == stage.max_steps
        do_save = (stage.save_every and step % stage.save_every == 0) or is_last
        val = evaluate(step) if (stage.eval_every and step % stage.eval_every == 0) or is_last else None
        if do_save and stage.keep_best:
            # best-checkpoint selection only among saved steps, so the best one always exists on disk
            val = evaluate(step) if val is None else val
            if val is not None and val < best["val_loss"]:
                best = {"val_loss": val, "step": step}
        if do_save:
            save(step)
    progress.close()
    logger.close()

    # The stage's product: the best (keep_best) or last weights as a plain model checkpoint.
    final_src = step
    if stage.keep_best and best["step"] is not None:
        final_src = best["step"]
    if dist.is_main:
        src_dir = dict(complete_checkpoints(ckpt_root))[final_src]
        final_model, _ = load_checkpoint(src_dir)
        save_checkpoint(stage_dir / FINAL_DIR, final_model, tokenizer)
    wall = time.perf_counter() - t_stage
    tok_s = stage.tokens_per_step * steps_timed / time_timed if time_timed else 0.0
    records = read_metrics(stage_dir / "metrics.jsonl") if dist.is_main else []
    summary = StageSummary(
        stage=stage.name, steps=step, tokens=tokens_seen, skipped_steps=skipped, loss_spikes=spikes,
        first_loss=first_loss, final_loss=loss_value, val_loss_start=val_start,
        val_loss_end=_last_val(records), best_step=best["step"], tokens_per_s=tok_s,
        mfu=flops_per_token * tok_s / (peak * 1e12), peak_tflops=peak, peak_source=peak_source,
        precision=precision, device=str(device), wall_s=wall, params=n_params,
        final_dir=str(stage_dir / FINAL_DIR))
    if dist.is_main:
        plot_metrics(records, stage_dir, stage.name)
        atomic_write_text(stage_dir / SUMMARY_FILE, json.dumps(asdict(summary), indent=2) + "\n")
    dist.barrier()
    return summary


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
