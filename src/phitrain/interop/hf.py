"""To and from transformers checkpoints (`PhiForCausalLM`, `Phi3ForCausalLM`).

A transformers directory is `config.json` + `model.safetensors` (or a sharded index, or a legacy
`pytorch_model.bin`) + tokenizer files. Conversion is a renaming of tensors plus, for the parallel block,
splitting/joining phitrain's fused qkv projection into transformers' separate q/k/v. Nothing else changes,
so to-hf followed by from-hf gives back the same bits. transformers itself is not needed to convert; the
tests use it as the reference that loads our output unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from phitrain.checkpoint import load_checkpoint, model_from_state, read_state_dict, write_model_files
from phitrain.config import ModelConfig, validate
from phitrain.errors import PhitrainError
from phitrain.files import atomic_directory, atomic_write_text

ARCHITECTURES = {"parallel": ("PhiForCausalLM", "phi"), "sequential": ("Phi3ForCausalLM", "phi3")}


# ---- configs -------------------------------------------------------------------------------------

def to_hf_config(cfg: ModelConfig, eos_id: int | None = None) -> dict:
    """config.json for transformers. Rope settings are written both the transformers-4 way (top level)
    and the transformers-5 way (`rope_parameters`) so either version loads it."""
    arch, model_type = ARCHITECTURES[cfg.block]
    factor = cfg.rotary_dim / cfg.head_dim
    if int(cfg.head_dim * factor) != cfg.rotary_dim:
        raise PhitrainError(f"rotary_dim {cfg.rotary_dim} of head_dim {cfg.head_dim} has no exact "
                            "partial_rotary_factor in transformers")
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": factor,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": factor},
        "rope_scaling": None,
        "resid_pdrop": cfg.resid_pdrop,
        "embd_pdrop": cfg.embd_pdrop,
        "attention_dropout": cfg.attn_pdrop,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if cfg.block == "parallel":
        out.update(hidden_act="gelu_new", layer_norm_eps=cfg.norm_eps, qk_layernorm=cfg.qk_layernorm)
    else:
        out.update(hidden_act="silu", rms_norm_eps=cfg.norm_eps, sliding_window=None,
                   original_max_position_embeddings=cfg.max_position_embeddings)
    # phi-4 uses <|endoftext|> as bos, eos and pad; without a tokenizer, say so explicitly (transformers'
    # Phi3 default pad id 32000 would be outside a small vocabulary).
    out.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return out


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers config dict; unsupported architectures or features are errors."""
    arch = (hf.get("architectures") or [None])[0]
    model_type = hf.get("model_type")
    block = next((b for b, (a, t) in ARCHITECTURES.items() if arch == a or (arch is None and model_type == t)),
                 None)
    if block is None:
        raise PhitrainError(f"{source}: unsupported architecture {arch or model_type!r}; phitrain reads "
                            "PhiForCausalLM and Phi3ForCausalLM")

    def need(key, default=None):
        if key in hf and hf[key] is not None:
            return hf[key]
        if default is None:
            raise PhitrainError(f"{source}: missing field {key!r}")
        return default

    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise PhitrainError(f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    if hf.get("tie_word_embeddings"):
        raise PhitrainError(f"{source}: tie_word_embeddings=true is not supported (phi models are untied)")
    act = hf.get("hidden_act", "gelu_new" if block == "parallel" else "silu")
    if act != ("gelu_new" if block == "parallel" else "silu"):
        raise PhitrainError(f"{source}: hidden_act {act!r} is not the {arch}'s activation")
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hidden // heads
    if hf.get("head_dim") not in (None, head_dim):
        raise PhitrainError(f"{source}: head_dim {hf['head_dim']} != hidden_size/num_attention_heads")
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                      0.5 if block == "parallel" else 1.0))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return validate(ModelConfig, dict(
        name=hf.get("_name_or_path") or "from-hf",
        block=block,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        rotary_dim=int(head_dim * factor),
        rope_theta=float(theta),
        max_position_embeddings=need("max_position_embeddings", 2048),
        norm_eps=hf.get("layer_norm_eps" if block == "parallel" else "rms_norm_eps") or 1e-5,
        qk_layernorm=bool(hf.get("qk_layernorm", False)),
        embd_pdrop=hf.get("embd_pdrop", 0.0) or 0.0,
        resid_pdrop=hf.get("resid_pdrop", 0.0) or 0.0,
        attn_pdrop=hf.get("attention_dropout", 0.0) or 0.0,
        initializer_range=hf.get("initializer_range", 0.02),
    ), source)


# ---- weights -------------------------------------------------------------------------------------

def _renames(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(phitrain name, transformers name) pairs; `{i}` stands for the layer index."""
    common = [("embed.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")]
    if cfg.block == "parallel":
        pairs = common + [("lm_head.bias", "lm_head.bias"),
                          ("final_norm.weight", "model.final_layernorm.weight"),
                          ("final_norm.bias", "model.final_layernorm.bias")]
        layer = [("norm", "input_layernorm"), ("attn.out_proj", "self_attn.dense"),
                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
        if cfg.qk_layernorm:
            layer += [("attn.q_norm", "self_attn.q_layernorm"), ("attn.k_norm", "self_attn.k_layernorm")]
        params = ("weight", "bias")
    else:
        pairs = common + [("final_norm.weight", "model.norm.weight")]
        layer = [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
                 ("attn.qkv", "self_attn.qkv_proj"), ("attn.out_proj", "self_attn.o_proj"),
                 ("mlp.gate_up", "mlp.gate_up_proj"), ("mlp.down", "mlp.down_proj")]
        params = ("weight",)
    for ours, theirs in layer:
        for p in params:
            pairs.append((f"blocks.{{i}}.{ours}.{p}", f"model.layers.{{i}}.{theirs}.{p}"))
    return pairs


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i in range(cfg.num_layers):
        if cfg.block == "parallel":
            for p in ("weight", "bias"):
                wq, wk, wv = state[f"blocks.{i}.attn.qkv.{p}"].split([q, kv, kv], dim=0)
                for name, w in (("q_proj", wq), ("k_proj", wk), ("v_proj", wv)):
                    out[f"model.layers.{i}.self_attn.{name}.{p}"] = w.contiguous()
    for ours, theirs in _renames(cfg):
        for i in range(cfg.num_layers) if "{i}" in ours else [None]:
            out[theirs.format(i=i)] = state[ours.format(i=i)]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise PhitrainError(f"{source}: missing tensor {name!r}")
        return hf[name]

    out = {}
    for i in range(cfg.num_layers):
        if cfg.block == "parallel":
            for p in ("weight", "bias"):
                parts = [take(f"model.layers.{i}.self_attn.{n}.{p}") for n in ("q_proj", "k_proj", "v_proj")]
                if len({t.shape[1:] for t in parts}) != 1:
                    raise PhitrainError(f"{source}: q/k/v projections of layer {i} have mismatched shapes")
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(parts, dim=0)
    for ours, theirs in _renames(cfg):
        for i in range(cfg.num_layers) if "{i}" in ours else [None]:
            out[ours.format(i=i)] = take(theirs.format(i=i))
    return out


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    legacy = hf_dir / "pytorch_model.bin"
    if single.is_file():
        return read_state_dict(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise PhitrainError(f"{index}: not a valid safetensors index ({err})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(hf_dir / shard))
        return state
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for a corrupt pickle
            raise PhitrainError(f"{legacy}: not a readable PyTorch weights file ({err})") from None
    raise PhitrainError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# ---- directories ---------------------------------------------------------------------------------

def export_hf(ckpt_dir: str | os.PathLike, hf_dir: str | os.PathLike) -> Path:
    """phitrain checkpoint → transformers directory (config.json, model.safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    model, tokenizer = load_checkpoint(ckpt_dir)
    cfg = model.config
    eos = tokenizer.eos_id if tokenizer is not None else None
    state = to_hf_state_dict({k: v.detach().contiguous() for k, v in model.state_dict().items()}, cfg)
    with atomic_directory(hf_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(to_hf_config(cfg, eos), indent=2) + "\n")
        gen = {"do_sample": False, **({"bos_token_id": eos, "eos_token_id": eos} if eos is not None else {})}
        atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            # Tokenizer.save replaces its whole target directory, so save into a subdirectory and move
            # the files up beside config.json, where AutoTokenizer looks for them.
            tokenizer.save(tmp / "tokenizer")
            for f in (tmp / "tokenizer").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "tokenizer").rmdir()
    return Path(hf_dir)


def import_hf(hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike) -> Path:
    """transformers directory → phitrain checkpoint (tokenizer.json, when present, comes along)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise PhitrainError(f"{hf_dir}: directory does not exist")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise PhitrainError(f"{config_path}: missing (not a transformers model directory)")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise PhitrainError(f"{config_path}: not valid JSON ({err})") from None
    cfg = from_hf_config(hf_config, str(config_path))
    state = from_hf_state_dict(_read_hf_weights(hf_dir), cfg, str(hf_dir))
    model = model_from_state(cfg, state, hf_dir)
    tokenizer = None
    if (hf_dir / "tokenizer.json").is_file():
        from phitrain.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(hf_dir)
    with atomic_directory(ckpt_dir) as tmp:
        write_model_files(tmp, model, tokenizer)
    return Path(ckpt_dir)

