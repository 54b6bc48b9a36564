"""Model presets as plain data (REFERENCE.md "Model families"; phi-1 §2.3; Phi-4 report §3).

Shapes are the papers' and the released HuggingFace configs'. Vocabularies are the padded sizes the
released models use (51200 for CodeGen's 50295 tokens, 100352 for cl100k's 100352 ids). Dropouts follow
the training recipes, not the inference configs: phi-1 trained with attention and residual dropout 0.1
(§2.3); phi-2's HF config keeps resid_pdrop 0.1. The tiny presets have the same block styles at a size
that trains on a CPU in minutes; their vocab is set from the tokenizer at training time.
"""

from __future__ import annotations

from phitrain.config import ModelConfig
from phitrain.errors import PhitrainError

_PHI1 = dict(block="parallel", vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_layers=24,
             num_heads=32, rotary_dim=32, rope_theta=10000.0, max_position_embeddings=2048)

PRESETS: dict[str, dict] = {
    "phi-1": {**_PHI1, "attn_pdrop": 0.1, "resid_pdrop": 0.1},
    "phi-1-small": {**_PHI1, "hidden_size": 1024, "intermediate_size": 4096, "num_layers": 20,
                    "num_heads": 16, "attn_pdrop": 0.1, "resid_pdrop": 0.1},
    "phi-1.5": dict(_PHI1),
    "phi-2": {**_PHI1, "hidden_size": 2560, "intermediate_size": 10240, "num_layers": 32, "num_heads": 32,
              "resid_pdrop": 0.1},
    "phi-4": dict(block="sequential", vocab_size=100352, hidden_size=5120, intermediate_size=17920,
                  num_layers=40, num_heads=40, num_kv_heads=10, rope_theta=250000.0,
                  max_position_embeddings=16384),
    # CPU-sized presets of the same two block styles.
    "phi-1-tiny": dict(block="parallel", vocab_size=4096, hidden_size=256, intermediate_size=1024,
                       num_layers=6, num_heads=8, rotary_dim=16, max_position_embeddings=1024,
                       attn_pdrop=0.1, resid_pdrop=0.1),
    "phi-4-tiny": dict(block="sequential", vocab_size=4096, hidden_size=256, intermediate_size=768,
                       num_layers=6, num_heads=8, num_kv_heads=2, rope_theta=10000.0,
                       max_position_embeddings=1024),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset's ModelConfig, with `overrides` applied (validated like any config)."""
    if name not in PRESETS:
        raise PhitrainError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(name=name, **{**PRESETS[name], **overrides})


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from a model built on the meta device: no memory is allocated, even for phi-4."""
    import torch

    from phitrain.model.phi import PhiModel

    with torch.device("meta"):
        model = PhiModel(cfg)
    return {"total": model.num_params(), "non_embedding": model.num_params(exclude_embeddings=True)}


def describe_presets(names: list[str] | None = None) -> list[dict]:
    """Print a table of presets (shapes and meta-device parameter counts) and return its rows."""
    from rich.console import Console
    from rich.table import Table

    rows = []
    table = Table(title="phitrain model presets")
    for col in ("preset", "block", "layers", "hidden", "mlp", "heads", "kv", "head dim", "rotary",
                "rope θ", "vocab", "ctx", "params", "non-emb"):
        table.add_column(col, justify="left" if col in ("preset", "block") else "right")
    for name in names or list(PRESETS):
        cfg = get_preset(name)
        n = count_params(cfg)
        rows.append({"preset": name, **cfg.model_dump(), **n})
        table.add_row(name, cfg.block, str(cfg.num_layers), str(cfg.hidden_size), str(cfg.intermediate_size),
                      str(cfg.num_heads), str(cfg.num_kv_heads), str(cfg.head_dim), str(cfg.rotary_dim),
                      f"{cfg.rope_theta:g}", str(cfg.vocab_size), str(cfg.max_position_embeddings),
                      f"{n['total']:,}", f"{n['non_embedding']:,}")
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a pipe or file gets the whole table, not ellipses
    console.print(table)
    return rows
