"""Typed, validated configuration: YAML in, YAML out, overridable from the command line.

Every config is a pydantic model that forbids unknown keys, so a typo in a recipe (`lerning_rate`) is an
error naming the key, not a silently ignored setting. `load_yaml` / `dump_yaml` move configs to and from
files; `apply_overrides` implements the CLI's `--set key.path=value` (the value is parsed as YAML, so
`--set optim.lr=3e-4` is a float and `--set parallel.strategy=fsdp` a string).

The sections below are the model config (here), the data configs and the training recipe configs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from phitrain.errors import PhitrainError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every phitrain config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: message (got value)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def validate(cls: type[C], data: dict[str, Any], source: str) -> C:
    """Build `cls` from `data`, turning pydantic's report into a PhitrainError naming `source`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise PhitrainError(format_validation_error(err, source)) from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PhitrainError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PhitrainError(f"{path}: not valid YAML: {err}".splitlines()[0]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PhitrainError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_yaml(cls: type[C], path: str | os.PathLike, overrides: list[str] | None = None) -> C:
    """Read a YAML file into `cls`, applying `key.path=value` overrides first."""
    data = read_yaml(path)
    apply_overrides(data, overrides or [])
    return validate(cls, data, str(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_yaml(config: BaseModel, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict in place. List items are addressed by index (`stages.1.lr`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PhitrainError(f"--set {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, key)
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise PhitrainError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise PhitrainError(f"--set {key}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _list_item(node: list, part: str, key: str) -> Any:
    return node[_list_index(node, part, key)]


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class ModelConfig(Config):
    """One description for every phi architecture (REFERENCE.md "Model families").

    `block` selects the layer style:
    - "parallel" (phi-1, phi-1.5, phi-2; transformers `PhiForCausalLM`): one LayerNorm feeds attention and
      MLP side by side, partial rotary over the first `rotary_dim` dims of each head, gelu_new MLP, biases
      everywhere including a biased, untied lm_head (phi-1 §2.3, after CodeGen).
    - "sequential" (phi-4; transformers `Phi3ForCausalLM`): pre-norm RMSNorm before attention and before
      the SwiGLU MLP, grouped-query attention with a fused qkv projection, no biases, full RoPE.
    """

    name: str = "custom"
    block: Literal["parallel", "sequential"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    rotary_dim: int | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    qk_layernorm: bool = False
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    initializer_range: float = 0.02

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if not 0 < self.rotary_dims <= self.head_dim or self.rotary_dims % 2:
            raise ValueError(f"rotary_dim {self.rotary_dims} must be even and in (0, head_dim={self.head_dim}]")
        if self.qk_layernorm and self.block == "sequential":
            raise ValueError("qk_layernorm is a parallel-block (Phi) option; Phi3-style blocks have none")
        for field in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{field} must be in [0, 1), got {getattr(self, field)}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def rotary_dims(self) -> int:
        """Rotated dims per head: `rotary_dim` if set, else the whole head (full RoPE)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim
