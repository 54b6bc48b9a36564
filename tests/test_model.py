"""The phi network itself: shapes, loss, dropout knobs, initialisation, meta-device counts, and the
checkpoint directory (save/load and every way a user can hand it a broken one)."""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import PYTHON, TINY_CONFIGS, random_phitrain_model, single_thread_env, tiny_config

from phitrain.checkpoint import CONFIG_FILE, MODEL_FILE, load_checkpoint, save_checkpoint
from phitrain.errors import PhitrainError
from phitrain.model.phi import PhiModel, gelu_tanh
from phitrain.model.presets import count_params, get_preset


pytestmark = pytest.mark.usefixtures("torch_single_thread")



@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_shape_and_loss_is_next_token_cross_entropy(name):
    model = random_phitrain_model(tiny_config(name))
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    targets = torch.randint(0, model.config.vocab_size, (2, 17))
    targets[0, :5] = -100
    logits = model(ids)
    assert logits.shape == (2, 17, model.config.vocab_size)
    loss = model(ids, targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gelu_is_the_tanh_gelu(dtype):
    """Compiled, `gelu_tanh` is computed as x·σ(2u): values and gradients match ATen's tanh GELU and an
    fp64 reference to fp32 rounding (bf16: within one bf16 ulp), over the range where GELU bends."""
    x = torch.linspace(-10, 10, 20_001, dtype=torch.float64)
    reference = F.gelu(x, approximate="tanh")
    x_ref = x.clone().requires_grad_()
    F.gelu(x_ref, approximate="tanh").sum().backward()
    compiled = torch.compile(gelu_tanh, fullgraph=True)
    for fn in (compiled, gelu_tanh):   # the compiled (sigmoid) form and the eager one (C kernel on CPU)
        xs = x.to(dtype).requires_grad_()
        out = fn(xs)
        out.sum().backward()
        assert out.dtype == dtype and xs.grad.dtype == dtype
        if dtype == torch.float32:
            assert (out.double() - reference).abs().max() < 1e-6
            assert (xs.grad.double() - x_ref.grad).abs().max() < 5e-6
        else:   # one rounding of the fp32 result; compare against the rounded inputs' exact values
            exact = F.gelu(xs.detach().double(), approximate="tanh")
            assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    # the compiled kernel is the exp-based form (inductor's tanh is ~3x slower: phi.gelu_tanh)
    from torch._inductor.utils import run_and_get_code
    _, code = run_and_get_code(torch.compile(gelu_tanh), torch.randn(64, dtype=dtype))
    assert "exp" in " ".join(code) and "tanh" not in " ".join(code)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_meta_device_count_equals_materialised_model(name):
    cfg = tiny_config(name)
    model = PhiModel(cfg)
    counts = count_params(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == counts["total"] - 2 * cfg.vocab_size * cfg.hidden_size


def test_parallel_block_has_biases_and_sequential_has_none():
    par = PhiModel(tiny_config("parallel-hd64"))
    seq = PhiModel(tiny_config("sequential-gqa4"))
    assert par.lm_head.bias is not None and par.blocks[0].attn.qkv.bias is not None
    assert seq.lm_head.bias is None and seq.blocks[0].attn.qkv.bias is None
    assert seq.blocks[0].attn.qkv.out_features == (4 + 2 * 1) * 32  # 4 query heads, 1 kv head, GQA 4:1


def test_init_follows_the_documented_scheme():
    torch.manual_seed(0)
    cfg = tiny_config("parallel-hd64", num_layers=8)
    model = PhiModel(cfg)
    std = cfg.initializer_range
    assert abs(model.embed.weight.std().item() - std) < 0.1 * std
    assert abs(model.blocks[0].mlp.fc1.weight.std().item() - std) < 0.1 * std
    resid = std / (2 * cfg.num_layers) ** 0.5
    assert abs(model.blocks[0].mlp.fc2.weight.std().item() - resid) < 0.1 * resid
    assert abs(model.blocks[0].attn.out_proj.weight.std().item() - resid) < 0.1 * resid
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.final_norm.weight == 1)


@pytest.mark.parametrize("knob", ["embd_pdrop", "resid_pdrop", "attn_pdrop"])
@pytest.mark.parametrize("name", ["parallel-hd64", "sequential-gqa4"])
def test_each_dropout_knob_acts_in_train_mode_only(name, knob):
    model = random_phitrain_model(tiny_config(name, **{knob: 0.3}))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
    # with the knob at 0, train mode is deterministic too: the difference above came from that knob
    plain = random_phitrain_model(tiny_config(name)).train()
    assert torch.equal(plain(ids), plain(ids))


def test_too_long_sequence_is_rejected():
    model = random_phitrain_model(tiny_config("parallel-hd64", max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_invalid_config_values_are_errors():
    with pytest.raises(ValueError, match="rotary_dim"):
        tiny_config("parallel-hd64", rotary_dim=33)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_config("sequential-gqa4", num_kv_heads=3)
    with pytest.raises(PhitrainError, match="unknown model preset"):
        get_preset("phi-9")


# ---- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = random_phitrain_model(tiny_config("sequential-hd80"), seed=7)
    save_checkpoint(tmp_path / "ckpt", model)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, MODEL_FILE]
    back, tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert tokenizer is None and not back.training
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))  # rope tables rebuilt after the meta-device load


def test_checkpoint_overwrite_leaves_no_temporary_dirs(tmp_path):
    model = random_phitrain_model(tiny_config("parallel-hd64"))
    save_checkpoint(tmp_path / "ckpt", model)
    save_checkpoint(tmp_path / "ckpt", model)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.fixture
def saved(tmp_path):
    save_checkpoint(tmp_path / "ckpt", random_phitrain_model(tiny_config("parallel-hd64")))
    return tmp_path / "ckpt"


def _message(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(PhitrainError) as err:
        load_checkpoint(tmp_path / "nope")
    assert "nope" in _message(err) and "does not exist" in _message(err)


def test_missing_weights_file(saved):
    (saved / MODEL_FILE).unlink()
    with pytest.raises(PhitrainError) as err:
        load_checkpoint(saved)
    assert str(saved / MODEL_FILE) in _message(err) and "missing" in _message(err)


def test_corrupt_weights_file(saved):
    data = (saved / MODEL_FILE).read_bytes()
    (saved / MODEL_FILE).write_bytes(data[: len(data) // 2])  # truncated, as after a crashed copy
    with pytest.raises(PhitrainError) as err:
        load_checkpoint(saved)
    assert str(saved / MODEL_FILE) in _message(err)


def test_config_with_unknown_key(saved):
    path = saved / CONFIG_FILE
    path.write_text(path.read_text() + "hiden_size: 12\n")
    with pytest.raises(PhitrainError) as err:
        load_checkpoint(saved)
    assert str(path) in _message(err) and "hiden_size" in _message(err)


def test_not_a_checkpoint_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PhitrainError, match="convert from-hf"):
        load_checkpoint(tmp_path)


def test_wrong_tensor_shape(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(saved / MODEL_FILE)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 128)
    save_file(state, saved / MODEL_FILE)
    with pytest.raises(PhitrainError) as err:
        load_checkpoint(saved)
    msg = _message(err)
    assert str(saved / MODEL_FILE) in msg and "blocks.0.mlp.fc1.weight" in msg and "(3, 128)" in msg


def test_cli_prints_one_error_line_without_traceback(tmp_path):
    missing = tmp_path / "missing-ckpt"
    proc = subprocess.run([PYTHON, "-m", "phitrain", "generate", str(missing), "--prompt", "x",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120,
                          env=single_thread_env())
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
