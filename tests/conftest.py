"""Shared fixtures: tiny model configs of both block styles, random-weight models, a tiny trained tokenizer.

The configs are chosen to cover what differs between the phi variants (REFERENCE.md "Model families"):
partial rotary factor 0.5 (phi-1, head dim 64) and 0.4 (phi-2, head dim 80), grouped-query attention 4:1
(phi-4), qk LayerNorm on and off, and vocabulary sizes that are odd (no accidental alignment). Each is 2
layers with hidden 64-160, so a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from phitrain.config import ModelConfig

# name -> ModelConfig fields. Keep every entry tiny: every parity test runs on each of them.
TINY_CONFIGS: dict[str, dict] = {
    # phi-1 shape: head dim 64, rotary 32 (factor 0.5), no qk norm
    "parallel-hd64": dict(block="parallel", vocab_size=251, hidden_size=128, intermediate_size=256,
                          num_layers=2, num_heads=2, rotary_dim=32, max_position_embeddings=128),
    # phi-2 shape: head dim 80, rotary 32 (factor 0.4), with qk LayerNorm
    "parallel-hd80-qknorm": dict(block="parallel", vocab_size=257, hidden_size=160, intermediate_size=320,
                                 num_layers=2, num_heads=2, rotary_dim=32, qk_layernorm=True,
                                 max_position_embeddings=128),
    # phi-4 shape: GQA 4:1, full rotary, large rope base
    "sequential-gqa4": dict(block="sequential", vocab_size=263, hidden_size=128, intermediate_size=192,
                            num_layers=2, num_heads=4, num_kv_heads=1, rope_theta=250000.0,
                            max_position_embeddings=128),
    # sequential with plain multi-head attention and head dim 80
    "sequential-hd80": dict(block="sequential", vocab_size=199, hidden_size=160, intermediate_size=224,
                            num_layers=2, num_heads=2, rope_theta=10000.0, max_position_embeddings=128),
}


@pytest.fixture(scope="session", autouse=True)
def phitrain_cache_dir(tmp_path_factory):
    """This session's compile records and inductor cache (`phitrain.compile_cache`), not the user's: a
    record left by other runs must not change what `compile: auto` decides in a test."""
    before = os.environ.get("PHITRAIN_CACHE_DIR")
    os.environ["PHITRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("phitrain-cache"))
    yield
    if before is None:
        os.environ.pop("PHITRAIN_CACHE_DIR")
    else:
        os.environ["PHITRAIN_CACHE_DIR"] = before


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread. Tiny models gain nothing from a second thread, and on a
    2-core machine shared with other processes, OpenMP threads waiting on each other made the same test
    10-50x slower. Use with `pytestmark = pytest.mark.usefixtures("torch_single_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def single_thread_env() -> dict[str, str]:
    """Environment for a `python -m phitrain` subprocess with the same one-thread setting."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(name=name, **{**TINY_CONFIGS[name], **overrides})


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, biases and norm weights included.

    Initialisation leaves biases at 0 and norm weights at 1, which would hide a mis-mapped bias or norm
    in a conversion; random values everywhere make any mix-up visible in the logits. Weights are larger
    than the training init so logits are peaked and greedy decoding has no near-ties.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.dim() == 1 and ("norm" in name or "layernorm" in name):
            p.copy_(1.0 + 0.2 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def random_phitrain_model(cfg: ModelConfig, seed: int = 0):
    from phitrain.model.phi import PhiModel

    torch.manual_seed(seed)
    return randomize_(PhiModel(cfg), seed).eval()


@pytest.fixture
def make_model():
    """make_model(config_name_or_ModelConfig, seed=0, **overrides) -> PhiModel with random weights, eval mode."""
    def make(cfg, seed: int = 0, **overrides):
        if isinstance(cfg, str):
            cfg = tiny_config(cfg, **overrides)
        return random_phitrain_model(cfg, seed)
    return make


CORPUS_SAMPLES = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n\tprint(i)  # tabs\n",
    "text = 'héllo wörld — ünïcode ✓'\n",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE (vocab 512) trained on a few standard-library modules. phitrain's own tokenizer
    failing to import or train fails the tests that use it; it never skips them."""
    from phitrain.tokenizer import train_bpe

    import argparse
    import json
    import textwrap

    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (argparse, json.decoder, textwrap)]
    texts += CORPUS_SAMPLES * 20
    return train_bpe(iter(texts), vocab_size=512, out_dir=tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A saved phitrain checkpoint (parallel block, random weights) with the tiny tokenizer in it."""
    from phitrain.checkpoint import save_checkpoint

    cfg = tiny_config("parallel-hd64", vocab_size=tiny_tokenizer.padded_vocab_size(),
                      max_position_embeddings=256)
    model = random_phitrain_model(cfg, seed=3)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(directory, model, tiny_tokenizer)
    return directory


PYTHON = sys.executable


@pytest.fixture
def window_widths(monkeypatch) -> list[int]:
    """The width of every cache window a decode step takes (KVCache.window, recorded)."""
    from phitrain.model.phi import KVCache

    widths: list[int] = []
    real_window = KVCache.window

    def recording_window(self, width):
        widths.append(width)
        return real_window(self, width)

    monkeypatch.setattr(KVCache, "window", recording_window)
    return widths
