"""Distributed training on CPU with gloo, 1 and 2 processes under torchrun (issue 6).

The same tiny recipe (2 layers, hidden 64, seq 32, fp32, dropout off, global batch 8 = micro 2 x accum 4 on
one rank or x accum 2 on two) runs single-process, with DDP, FSDP2 and DeepSpeed ZeRO-2. Per-step losses
must agree within 1e-4 relative (only the summation order of the gradient reduction differs); FSDP2's
sharded DCP checkpoints must resume on a different number of ranks, DeepSpeed's own checkpoints on the
same number, and a killed rank must stop the job with a clear message and leave a run that resumes.

Every training run is a subprocess with OMP_NUM_THREADS=1 (deterministic and fast on a shared 2-core
machine). The first DeepSpeed run on a machine JIT-compiles DeepSpeed's shared-memory CPU collective with
gcc (one to three minutes, cached in ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from phitrain.checkpoint import COMPLETE, complete_checkpoints, load_checkpoint
from phitrain.config import DataRecipe, StageConfig
from phitrain.train.metrics import read_metrics

TINY = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2, rotary_dim=16, vocab_size=320,
            max_position_embeddings=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
STEPS, SAVE_EVERY, RTOL = 10, 5, 1e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A tiny real corpus (a few stdlib modules, 300-id BPE) and a 10-step recipe reading it."""
    import email
    import json

    from phitrain.data.pipeline import prepare

    root = tmp_path_factory.mktemp("dist")
    prepare(DataRecipe.model_validate({
        "sources": [{"name": "code", "kind": "files", "include": ["*.py"],
                     "paths": [str(Path(json.__file__).parent), str(Path(email.__file__).parent)]}],
        "dedup": {"near": False}, "quality": {"enabled": False}, "decontam": {"enabled": False},
        "exercises": {"enabled": False}, "tokenizer": {"vocab_size": 300},
        "shards": {"val_fraction": 0.1}, "executor": {"workers": 1},
    }), root / "data", progress=False)
    stage = dict(name="pretrain", model="phi-1-tiny", model_overrides=TINY,
                 data={"data_dir": str(root / "data"), "sources": [{"path": "code", "weight": 1.0}]},
                 seq_len=32, global_batch_size=8, micro_batch_size=2, max_steps=STEPS, precision="fp32",
                 eval_windows=4, save_every=SAVE_EVERY, keep_last=3, optim={"lr": 3e-3, "warmup_steps": 2})
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "dist-test", "device": "cpu", "stages": [stage]}))
    return path


def train(recipe: Path, run_dir: Path, nproc: int, *sets: str, check: bool = True) -> subprocess.CompletedProcess:
    """`phitrain train` in one plain process, or under torchrun with `nproc` workers."""
    if nproc == 1:
        launcher = [sys.executable, "-m", "phitrain"]
    else:  # --standalone: a private rendezvous on a free port (other jobs may hold torchrun's default)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "phitrain"]
    args = [*launcher, "train", str(recipe), "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "pretrain" / "metrics.jsonl") if "loss" in r}


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    steps = list(steps)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for s in steps:
        assert abs(got[s] - want[s]) <= RTOL * abs(want[s]), (s, got[s], want[s])


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had been stopped right after checkpoint `step`."""
    shutil.copytree(src, dst)
    stage = dst / "pretrain"
    for n, d in complete_checkpoints(stage / "checkpoints"):
        if n > step:
            shutil.rmtree(d)
    shutil.rmtree(stage / "final")
    (stage / "summary.json").unlink()
    return dst


def final_weights(run_dir: Path):
    model, _ = load_checkpoint(run_dir / "pretrain" / "final")
    return model.state_dict()


def assert_same_weights(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= atol, k


@pytest.fixture(scope="module")
def single(recipe, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    train(recipe, run, 1)
    return run


@pytest.fixture(scope="module")
def fsdp2(recipe, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp2") / "run"
    train(recipe, run, 2, "parallel.strategy=fsdp")
    return run


def test_deepspeed_config_follows_the_stage():
    from phitrain.config import ParallelConfig
    from phitrain.train.parallel import deepspeed_config

    stage = StageConfig.model_validate(dict(
        name="s", model="phi-1-tiny", data={"data_dir": "d", "sources": [{"path": "a", "weight": 1.0}]},
        seq_len=32, global_batch_size=64, micro_batch_size=4, max_steps=1, optim={"grad_clip": 0.5}))
    cfg = deepspeed_config(stage, ParallelConfig(strategy="deepspeed", zero_stage=3), world_size=2, precision="fp16")
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 8  # 64 / (4 x 2 ranks)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_clipping"] == 0.5
    assert cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0 and not cfg["bf16"]["enabled"]
    no_clip = stage.model_copy(update={"optim": stage.optim.model_copy(update={"grad_clip": None})})
    bf16 = deepspeed_config(no_clip, ParallelConfig(strategy="deepspeed"), world_size=1, precision="bf16")
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"] and bf16["gradient_clipping"] == 0.0
    assert bf16["gradient_accumulation_steps"] == 16


def test_ddp_two_ranks_match_single_process(recipe, single, tmp_path):
    run = tmp_path / "ddp"
    train(recipe, run, 2, "parallel.strategy=ddp")
    assert_close(losses(run), losses(single), range(1, STEPS + 1))
    assert_same_weights(final_weights(run), final_weights(single))


def test_fsdp_two_ranks_match_and_resume_on_one(recipe, single, fsdp2, tmp_path):
    assert_close(losses(fsdp2), losses(single), range(1, STEPS + 1))
    ckpt = fsdp2 / "pretrain" / "checkpoints" / f"step-{SAVE_EVERY:06d}"
    # sharded: one DCP file per rank, plus the consolidated weights every consumer reads
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "model.safetensors").is_file() and (ckpt / COMPLETE).is_file()
    assert_same_weights(final_weights(fsdp2), final_weights(single))

    resumed = rewind(fsdp2, tmp_path / "fsdp-2to1", SAVE_EVERY)
    out = train(recipe, resumed, 1, "parallel.strategy=fsdp")
    assert f"resuming from {resumed / 'pretrain' / 'checkpoints' / f'step-{SAVE_EVERY:06d}'}" in out.stdout
    assert_close(losses(resumed), losses(fsdp2), range(SAVE_EVERY + 1, STEPS + 1))
    assert_same_weights(final_weights(resumed), final_weights(fsdp2))


def test_fsdp_one_rank_resumes_on_two(recipe, single, tmp_path):
    one = tmp_path / "fsdp1"
    train(recipe, one, 1, "parallel.strategy=fsdp")
    assert_close(losses(one), losses(single), range(1, STEPS + 1))
    ckpt = one / "pretrain" / "checkpoints" / f"step-{SAVE_EVERY:06d}"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]

    resumed = rewind(one, tmp_path / "fsdp-1to2", SAVE_EVERY)
    train(recipe, resumed, 2, "parallel.strategy=fsdp")
    assert_close(losses(resumed), losses(one), range(SAVE_EVERY + 1, STEPS + 1))
    assert_same_weights(final_weights(resumed), final_weights(one))


DS2 = ("parallel.strategy=deepspeed", "parallel.zero_stage=2")


@pytest.fixture(scope="module")
def ds2(recipe, tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    run = tmp_path_factory.mktemp("ds2") / "run"
    train(recipe, run, 2, *DS2)
    return run


def test_deepspeed_zero2_trains_checkpoints_and_resumes(recipe, single, ds2, tmp_path):
    sets = DS2
    run = ds2
    assert_close(losses(run), losses(single), range(1, STEPS + 1))
    ckpt = run / "pretrain" / "checkpoints" / f"step-{SAVE_EVERY:06d}"
    shards = sorted(p.name for p in (ckpt / "deepspeed" / "state").iterdir())
    assert [s for s in shards if "optim_states" in s] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                          "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # the consolidated fp32 weights rebuilt from the ZeRO partitions are the single-process weights
    assert_same_weights(final_weights(run), final_weights(single))

    resumed = rewind(run, tmp_path / "ds-resume", SAVE_EVERY)
    train(recipe, resumed, 2, *sets)
    assert_close(losses(resumed), losses(run), range(SAVE_EVERY + 1, STEPS + 1))


def test_fsdp_build_never_holds_the_full_model(fsdp2, single):
    """FSDP2 is applied on the meta device: until its shards were materialised no rank had parameter
    storage at all, and afterwards each of the 2 ranks holds about half of the model's bytes (the trainer
    records both per rank during the build). A single process holds all of it."""
    build = json.loads((fsdp2 / "pretrain" / "summary.json").read_text())["build"]
    assert [b["rank"] for b in build] == [0, 1]
    total = build[0]["model_param_bytes"]
    for b in build:
        assert b["params_on_meta_until_materialized"], b
        assert b["local_param_bytes"] <= 0.55 * total, b
    assert sum(b["local_param_bytes"] for b in build) >= total
    (one,) = json.loads((single / "pretrain" / "summary.json").read_text())["build"]
    assert one["local_param_bytes"] == one["model_param_bytes"] == total


def test_fsdp_streamed_checkpoint_loads_in_transformers(fsdp2, tmp_path):
    """The consolidated weights of a 2-rank FSDP2 checkpoint — gathered one tensor at a time and streamed
    into model.safetensors — are what transformers computes with (same logits), and equal what the
    offline `consolidate` rebuilds from the DCP shards."""
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file

    from phitrain.interop.hf import export_hf
    from phitrain.train.consolidate import consolidate_dcp

    ckpt = fsdp2 / "pretrain" / "checkpoints" / f"step-{SAVE_EVERY:06d}"
    model, _ = load_checkpoint(ckpt)
    export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    consolidate_dcp(ckpt / "dcp", tmp_path / "offline.safetensors")
    streamed, offline = load_file(str(ckpt / "model.safetensors")), load_file(str(tmp_path / "offline.safetensors"))
    assert streamed.keys() == offline.keys() and all(torch.equal(streamed[k], offline[k]) for k in streamed)


def _launch(recipe: Path, run_dir: Path, sets) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "phitrain",
           "train", str(recipe), "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_job_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGKILL torchrun and every rank (the whole session) as soon as `ready()`; False if the job ended
    first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_kill9_during_a_save_and_at_a_random_step_resumes_identically(recipe, fsdp2, ds2, tmp_path, strategy):
    """2 ranks, a checkpoint every step. The whole job (torchrun and both ranks) is killed with SIGKILL once
    while a checkpoint is being assembled (a hidden staging directory exists) and once at a random later
    step; each re-run resumes from the newest complete checkpoint, and the per-step losses of the finished
    run are exactly those of the uninterrupted run."""
    import random

    reference = fsdp2 if strategy == "fsdp" else ds2
    sets = ("parallel.strategy=fsdp",) if strategy == "fsdp" else DS2
    sets = (*sets, "stages.0.save_every=1", "stages.0.keep_last=2")
    run = tmp_path / "run"
    ckpts = run / "pretrain" / "checkpoints"

    def saving() -> bool:
        return ckpts.is_dir() and any(p.name.startswith(".") for p in ckpts.iterdir())

    killed_in_save = False
    for _ in range(3):   # a save lasts milliseconds; a few tries make catching one certain in practice
        if _kill_job_when(_launch(recipe, run, sets), saving):
            killed_in_save = True
            break
    assert killed_in_save, "the job finished three times without being caught in a save"
    done = max((n for n, _ in complete_checkpoints(ckpts)), default=0)
    k = random.Random().randint(done + 1, STEPS - 1) if done + 1 < STEPS else STEPS
    if k < STEPS:
        assert _kill_job_when(_launch(recipe, run, sets), lambda: max(losses_so_far(run), default=0) >= k), k
    train(recipe, run, 2, *sets)
    assert losses(run) == losses(reference), f"killed in a save after step {done}, then at step {k}"


def losses_so_far(run_dir: Path) -> list[int]:
    path = run_dir / "pretrain" / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:   # a line being written
            pass
    return steps


def _workers(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (children of the launcher), read from /proc."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"PPid:\t{launcher_pid}\n" not in (d / "status").read_text():
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


def _wait_exited(pid: int, timeout: float) -> bool:
    """Whether process `pid` exits (or is a zombie nobody reaped yet) within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _rank_output(log_dir: Path, rank: int) -> str:
    """What one worker wrote to stdout and stderr (torchrun --log-dir ... --redirects 3)."""
    [attempt] = log_dir.glob(f"*/attempt_0/{rank}")
    return (attempt / "stdout.log").read_text() + (attempt / "stderr.log").read_text()


LOST_CONTACT = re.compile(r"^error: rank 0: lost contact with another rank \(.+\): a process died or a node was lost, "
                          r"so the job stops\. Re-run the same command to resume from (\S+)$", re.MULTILINE)


def test_killed_rank_fails_the_job_clearly_and_rerun_resumes(recipe, tmp_path):
    run, logs = tmp_path / "killed", tmp_path / "logs"
    steps = 120
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = ["-m", "phitrain", "train", str(recipe), "--run-dir", str(run), "--set", "parallel.strategy=ddp",
               "--set", f"stages.0.max_steps={steps}", "--set", "stages.0.save_every=10"]
    launcher_out = tmp_path / "torchrun.out"
    with launcher_out.open("w") as out_file:
        # each worker's output in its own files, so the survivor's is checked on its own
        proc = subprocess.Popen([*torchrun, "--log-dir", str(logs), "--redirects", "3", *command], env=ENV,
                                stdout=out_file, stderr=subprocess.STDOUT, text=True)
        ckpts = run / "pretrain" / "checkpoints"
        deadline = time.time() + 300
        while not complete_checkpoints(ckpts):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        workers = _workers(proc.pid)
        # torchrun stops the remaining workers as soon as it notices one died, which can be before the survivor
        # reaches its next collective; a user would still see the survivor's message in most runs, a test must
        # in every run, so torchrun is paused until the survivor has reported and exited on its own.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            os.kill(workers[1], signal.SIGKILL)
            survivor_exited = _wait_exited(workers[0], timeout=180)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=300)
    out = launcher_out.read_text()
    assert proc.returncode != 0
    assert "rank      : 1" in out and "Signal 9 (SIGKILL)" in out, out[-4000:]   # torchrun names the dead rank
    survivor = _rank_output(logs, 0)
    assert survivor_exited, survivor[-4000:]
    # the surviving rank says what happened and how to continue, in one line and without a traceback
    last_step, last_dir = complete_checkpoints(ckpts)[-1]
    found = LOST_CONTACT.findall(survivor)
    assert found == [str(last_dir)], survivor[-4000:]
    assert "Traceback" not in survivor, survivor[-4000:]
    assert last_step < steps

    again = subprocess.run([*torchrun, *command], env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {last_dir} (step {last_step})" in again.stdout
    records = [r["step"] for r in read_metrics(run / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert records == list(range(1, steps + 1))
    assert (run / "pretrain" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_deepspeed_single_process_zero3_bf16_and_refuses_other_world(recipe, single, tmp_path):
    """One plain process with strategy deepspeed (ZeRO-3, bf16) trains and checkpoints with fp32 master
    weights; DeepSpeed's ZeRO state resumed on a different number of ranks is refused with a clear error."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "ds1"
    sets = ("parallel.strategy=deepspeed", "parallel.zero_stage=3", "stages.0.precision=bf16")
    train(recipe, run, 1, *sets)
    got, want = losses(run), losses(single)
    assert all(abs(got[s] - want[s]) < 0.05 * want[s] for s in want)  # bf16 compute: close, not equal
    weights = final_weights(run)
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in weights.values())

    resumed = rewind(run, tmp_path / "ds1-on-2", SAVE_EVERY)
    out = train(recipe, resumed, 2, *sets, check=False)
    assert out.returncode != 0
    assert "resumes only on the same number" in out.stdout + out.stderr


def test_return_freed_memory_defaults_to_the_sharded_strategies(monkeypatch):
    """`parallel.return_freed_memory` (auto) releases freed memory for fsdp/deepspeed and keeps it for the
    others, on CPU only; set, it applies to any strategy."""
    import torch

    from phitrain.config import ParallelConfig
    from phitrain.train import parallel

    calls = []
    monkeypatch.setattr(parallel, "set_freed_memory_policy", lambda release, report: calls.append(release) or True)
    stage = StageConfig.model_validate(dict(
        name="s", model="phi-1-tiny", data={"data_dir": "d", "sources": [{"path": "a", "weight": 1.0}]},
        seq_len=32, global_batch_size=4, micro_batch_size=4, max_steps=1))
    cpu, dist = torch.device("cpu"), parallel.Dist()
    parallel.make_engine(stage, ParallelConfig(strategy="none"), dist, "fp32", cpu)
    assert calls == [False]
    parallel.make_engine(stage, ParallelConfig(strategy="fsdp"), dist, "fp32", cpu)
    assert calls == [False, True]
    parallel.make_engine(stage, ParallelConfig(strategy="fsdp"), dist, "fp32", torch.device("meta"))
    parallel.make_engine(stage, ParallelConfig(strategy="fsdp", return_freed_memory=False), dist, "fp32", cpu)
    assert calls == [False, True, False]
    parallel.make_engine(stage, ParallelConfig(strategy="none", return_freed_memory=True), dist, "fp32", cpu)
    assert calls == [False, True, False, True]


def test_freed_memory_policy_takes_effect_on_glibc():
    """This machine's C library is glibc: both policies apply, and kept memory is reused without page
    faults (in a fresh process: the policy is the process's)."""
    script = """
import resource, torch
from phitrain.train.parallel import set_freed_memory_policy
assert set_freed_memory_policy(release=True, report=True) and set_freed_memory_policy(release=False, report=True)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        t = torch.empty(64 << 20, dtype=torch.uint8)
        t.fill_(1)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) < 100   # 4 x 64 MB freshly mapped would be ~65,000 faults


def test_release_after_keep_returns_memory_again():
    """A process that kept freed memory (one stage) and then releases it (a sharded next stage) hands
    freed heap memory back to the OS again: the trim threshold is reset with the mmap threshold. (128
    tensors of 512 KB, under the 1 MB mmap threshold, live at the heap's top and go back when freed.)"""
    script = """
import resource, torch
from phitrain.train.parallel import set_freed_memory_policy
assert set_freed_memory_policy(release=False, report=True) and set_freed_memory_policy(release=True, report=True)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(512 << 10, dtype=torch.uint8) for _ in range(128)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 10_000   # 64 MB taken afresh from the OS (~16,000 faults)
