"""The shipped recipes carry the papers' numbers (REFERENCE.md "Training recipes"), and config errors
name the offending key."""

from pathlib import Path

import pytest

from phitrain.cli import main
from phitrain.config import StageConfig
from phitrain.errors import PhitrainError
from phitrain.model.presets import count_params, get_preset
from phitrain.train.optim import lr_factor
from phitrain.train.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_phi1_base_matches_paper():
    r = load_recipe(RECIPES / "phi-1-base.yaml")
    (s,) = r.stages
    assert s.model == "phi-1" and s.seq_len == 2048 and s.global_batch_size == 1024
    assert s.grad_accum_steps(world_size=8) == 16           # 8 A100s (phi-1 §2.3)
    assert s.optim.lr == 1e-3 and s.optim.warmup_steps == 750 and s.optim.weight_decay == 0.1
    assert s.max_steps == 36000 and s.precision == "fp16" and s.optim.schedule == "linear"
    assert s.tokens_per_step == 2_097_152
    # the released phi-1-base is the 24,000-step checkpoint: "a little over 50B total training tokens"
    assert 50e9 < s.tokens_per_step * 24000 < 51e9
    cfg = get_preset(s.model)
    assert cfg.attn_pdrop == 0.1 and cfg.resid_pdrop == 0.1 and cfg.rotary_dim == 32
    assert 1.3e9 < count_params(cfg)["total"] < 1.45e9
    assert r.parallel.strategy == "deepspeed"


def test_phi1_finetune_matches_paper():
    (s,) = load_recipe(RECIPES / "phi-1-finetune.yaml").stages
    assert s.init_from and s.global_batch_size == 256 and s.optim.lr == 1e-4
    assert s.optim.warmup_steps == 50 and s.optim.weight_decay == 0.01 and s.max_steps == 6000
    assert s.save_every == 1000 and s.keep_best


def test_phi1_small_matches_paper():
    (s,) = load_recipe(RECIPES / "phi-1-small.yaml").stages
    cfg = get_preset(s.model)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim) == (20, 1024, 4096, 16, 64)
    assert 3.3e8 < count_params(cfg)["total"] < 3.7e8


def test_phi4_pretrain_and_midtrain_match_report():
    pre = load_recipe(RECIPES / "phi-4-pretrain.yaml").stages[0]
    assert pre.global_batch_size == 5760 and pre.seq_len == 4096 and pre.optim.lr == 3e-4
    assert pre.optim.weight_decay == 0.1 and pre.optim.schedule == "linear"
    assert abs(pre.total_tokens - 10e12) / 10e12 < 0.001                 # ~10T tokens
    weights = {src.path: src.weight for src in pre.data.sources}
    assert weights == {"web": 0.15, "web_rewrites": 0.15, "synthetic": 0.40, "code": 0.20, "acquired": 0.10}
    mid = load_recipe(RECIPES / "phi-4-midtrain.yaml").stages[0]
    assert mid.seq_len == 16384 and mid.model_overrides["rope_theta"] == 250000
    assert mid.model_overrides["max_position_embeddings"] == 16384
    assert mid.optim.lr == pytest.approx(pre.optim.lr / 10)
    assert abs(mid.total_tokens - 250e9) / 250e9 < 0.001                 # ~250B tokens
    mix = {src.path: src.weight for src in mid.data.sources}
    assert mix["long_context"] == pytest.approx(0.30) and sum(mix.values()) == pytest.approx(1.0)
    cfg = get_preset("phi-4")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (40, 5120, 40, 10, 100352)
    assert 14.0e9 < count_params(cfg)["total"] < 14.8e9


def test_schedule_warmup_peak_and_linear_floor():
    s = StageConfig.model_validate(dict(
        name="s", model="phi-1-tiny", data={"data_dir": "d", "sources": [{"path": "a", "weight": 1}]},
        seq_len=8, global_batch_size=2, micro_batch_size=2, max_steps=100,
        optim={"lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1}))
    f = [lr_factor(i, s.optim, s.max_steps) for i in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)       # linear warmup to the peak
    assert f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.1)    # linear decay to the floor
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5)                         # halfway down
    diffs = [f[i] - f[i + 1] for i in range(10, 100)]
    assert max(diffs) - min(diffs) < 1e-9                                   # a straight line


def test_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "phi-1-base.yaml").read_text().replace("max_steps:", "max_stepz:"))
    with pytest.raises(PhitrainError, match=r"stages\.0\.max_stepz"):
        load_recipe(bad)
    with pytest.raises(PhitrainError, match="global_batch_size 1024 is not a multiple of micro_batch_size 7"):
        load_recipe(RECIPES / "phi-1-base.yaml", ["stages.0.micro_batch_size=7"])
    with pytest.raises(PhitrainError, match="not divisible"):
        load_recipe(RECIPES / "phi-1-base.yaml").stages[0].grad_accum_steps(world_size=3)
    with pytest.raises(PhitrainError, match=r"stages\.0\.optim\.lr"):
        load_recipe(RECIPES / "phi-1-base.yaml", ["stages.0.optim.lr=fast"])
    assert main(["train", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_stepz" in err and "Traceback" not in err


def test_cpu_chain_mirrors_the_paper_stages():
    pre, mid, fin = load_recipe(RECIPES / "tiny-chain.yaml").stages
    assert (pre.kind, mid.kind, fin.kind) == ("pretrain", "midtrain", "finetune")
    assert mid.init_from == fin.init_from == "previous"
    assert mid.seq_len == 2 * pre.seq_len and mid.model_overrides["rope_theta"] > 10000
    assert mid.optim.lr == pytest.approx(pre.optim.lr / 10)
    long_ctx = [s for s in mid.data.sources if s.min_doc_tokens]
    assert long_ctx and long_ctx[0].weight == pytest.approx(0.3)
    assert fin.keep_best and fin.optim.weight_decay == 0.01
