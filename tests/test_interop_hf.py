"""phitrain against transformers, the reference implementation of PhiForCausalLM / Phi3ForCausalLM.

Both directions are checked on random weights: a phitrain checkpoint exported with `export_hf` and loaded
by `AutoModelForCausalLM.from_pretrained` unchanged, and a transformers model built from its own config
class, saved with `save_pretrained` and read with `import_hf`. Logits must agree to 1e-4 in fp32, greedy
decoding must give the same ids (also for a left-padded batch), and to-hf → from-hf must give back the
same bits.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONFIGS, randomize_, random_phitrain_model, tiny_config

transformers = pytest.importorskip("transformers")

from phitrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from phitrain.errors import PhitrainError  # noqa: E402
from phitrain.interop.hf import export_hf, import_hf  # noqa: E402
from phitrain.model.generate import generate  # noqa: E402
from phitrain.model.presets import PRESETS, count_params, get_preset  # noqa: E402

CONFIGS = list(TINY_CONFIGS)
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("torch_single_thread")



def hf_native_config(cfg):
    """The transformers config for `cfg`, written with transformers' own config classes and argument
    names (not through phitrain's `to_hf_config`), so the import direction tests our reading of them."""
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.block == "parallel":
        return transformers.PhiConfig(**common, partial_rotary_factor=cfg.rotary_dim / cfg.head_dim,
                                      qk_layernorm=cfg.qk_layernorm, layer_norm_eps=cfg.norm_eps)
    return transformers.Phi3Config(**common, rms_norm_eps=cfg.norm_eps)


def hf_model_from_phitrain(model, tmp_path):
    save_checkpoint(tmp_path / "ckpt", model)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


def effective(cfg) -> dict:
    """The config's meaning, without its name (defaults such as num_kv_heads = num_heads are filled in at
    validation, so a config built with them equals one that states them)."""
    return cfg.model_dump(exclude={"name"})


def random_ids(cfg, shape, seed=0):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_export_then_transformers_gives_same_logits(name, tmp_path):
    model = random_phitrain_model(tiny_config(name), seed=1)
    hf = hf_model_from_phitrain(model, tmp_path)
    expected_cls = "PhiForCausalLM" if model.config.block == "parallel" else "Phi3ForCausalLM"
    assert type(hf).__name__ == expected_cls
    ids = random_ids(model.config, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (2, 40, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_then_import_gives_same_logits(name, tmp_path):
    cfg = tiny_config(name)
    torch.manual_seed(0)
    hf = randomize_(transformers.AutoModelForCausalLM.from_config(hf_native_config(cfg)), seed=2).eval()
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert tokenizer is None
    assert effective(model.config) == effective(cfg)
    ids = random_ids(cfg, (3, 33), seed=1)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_matches_transformers(name, tmp_path):
    model = random_phitrain_model(tiny_config(name), seed=4)
    hf = hf_model_from_phitrain(model, tmp_path)
    prompts = [random_ids(model.config, (n,), seed=n).tolist() for n in (7, 12, 3)]
    n_new = 32

    ours_single = generate(model, prompts[:1], n_new)
    ours_batch = generate(model, prompts, n_new)

    gen = dict(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        single = hf.generate(torch.tensor(prompts[:1]), **gen)[0, len(prompts[0]):].tolist()
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        batch = hf.generate(ids, attention_mask=mask, **gen)[:, longest:].tolist()

    assert ours_single[0] == single
    assert ours_batch == batch
    assert ours_batch[0] == ours_single[0]  # padding does not change a row's tokens


@pytest.mark.parametrize("name", CONFIGS)
def test_to_hf_then_from_hf_is_bitwise_identical(name, tmp_path):
    model = random_phitrain_model(tiny_config(name), seed=5)
    save_checkpoint(tmp_path / "a", model)
    export_hf(tmp_path / "a", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "b")
    back, _ = load_checkpoint(tmp_path / "b")
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype
        assert torch.equal(before[k], after[k]), k
    assert effective(back.config) == effective(model.config)


@pytest.mark.parametrize("name", CONFIGS)
def test_param_count_equals_transformers(name):
    cfg = tiny_config(name)
    hf = transformers.AutoModelForCausalLM.from_config(hf_native_config(cfg))
    assert count_params(cfg)["total"] == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_param_count_equals_transformers_on_meta(preset):
    cfg = get_preset(preset)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_native_config(cfg))
    n = sum(p.numel() for p in hf.parameters())
    counts = count_params(cfg)
    assert counts["total"] == n
    assert counts["non_embedding"] == n - 2 * cfg.vocab_size * cfg.hidden_size


def test_known_preset_sizes():
    # phi-1: "1.3B" (REFERENCE.md: ≈1.42B counting embeddings and the biased head); phi-2 2.7-2.8B; phi-4 14.7B
    assert count_params(get_preset("phi-1"))["total"] == 1_418_270_720
    assert 2.7e9 < count_params(get_preset("phi-2"))["total"] < 2.8e9
    assert 14.6e9 < count_params(get_preset("phi-4"))["total"] < 14.7e9


def test_tokenizer_travels_with_the_export(tmp_path, tiny_tokenizer):
    cfg = tiny_config("sequential-gqa4", vocab_size=tiny_tokenizer.padded_vocab_size())
    save_checkpoint(tmp_path / "ckpt", random_phitrain_model(cfg), tiny_tokenizer)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == tiny_tokenizer.eos_id
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n        return x  # ünïcode\n"
    assert auto.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)
    import_hf(tmp_path / "hf", tmp_path / "back")
    _, tok = load_checkpoint(tmp_path / "back")
    assert tok is not None and tok.encode(text) == tiny_tokenizer.encode(text)
    assert tok.eos_id == tiny_tokenizer.eos_id


# ---- bad input -----------------------------------------------------------------------------------

def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _exported(tmp_path):
    model = random_phitrain_model(tiny_config("parallel-hd64"))
    save_checkpoint(tmp_path / "ckpt", model)
    return export_hf(tmp_path / "ckpt", tmp_path / "hf")


def test_unsupported_architecture_names_the_file(tmp_path):
    hf_dir = _exported(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(PhitrainError) as err:
        import_hf(hf_dir, tmp_path / "out")
    msg = _one_line(err)
    assert "config.json" in msg and "LlamaForCausalLM" in msg
    assert not (tmp_path / "out").exists()


def test_wrong_tensor_shape_in_hf_dir_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = _exported(tmp_path)
    state = load_file(hf_dir / "model.safetensors")
    state["model.layers.1.mlp.fc1.weight"] = torch.zeros(7, 128)
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(PhitrainError) as err:
        import_hf(hf_dir, tmp_path / "out")
    msg = _one_line(err)
    assert "blocks.1.mlp.fc1.weight" in msg and "(7, 128)" in msg and str(hf_dir) in msg


def test_missing_tensor_and_missing_files_in_hf_dir(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = _exported(tmp_path)
    state = load_file(hf_dir / "model.safetensors")
    del state["model.layers.0.self_attn.k_proj.bias"]
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(PhitrainError, match="k_proj.bias"):
        import_hf(hf_dir, tmp_path / "out")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(PhitrainError, match="no model.safetensors"):
        import_hf(hf_dir, tmp_path / "out")
    (hf_dir / "config.json").unlink()
    with pytest.raises(PhitrainError, match="config.json"):
        import_hf(hf_dir, tmp_path / "out")
    with pytest.raises(PhitrainError, match="does not exist"):
        import_hf(tmp_path / "nowhere", tmp_path / "out")


def test_corrupt_hf_weights_name_the_file(tmp_path):
    hf_dir = _exported(tmp_path)
    (hf_dir / "model.safetensors").write_bytes(b"\x00not safetensors at all")
    with pytest.raises(PhitrainError) as err:
        import_hf(hf_dir, tmp_path / "out")
    assert "model.safetensors" in _one_line(err)
