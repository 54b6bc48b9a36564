"""Consolidated `model.safetensors` without a full model in memory.

A safetensors file is an 8-byte header length, a JSON header (name → dtype, shape, byte offsets) and the
tensors' bytes. Every tensor's dtype and shape is known before any data exists (from the sharded
parameters, or from a DCP checkpoint's metadata), so the header can be written first and the tensors
streamed after it one at a time: gathered from the ranks' shards (`write_sharded_model`) or read from
`dcp/` (`consolidate_dcp`, the offline `phitrain checkpoint consolidate`). Peak memory is one full tensor,
not one full model — what a 14.7B-parameter phi-4 (59 GB in fp32) needs on a host that cannot hold two
copies of it. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from phitrain.errors import PhitrainError

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsStream:
    """Write a safetensors file tensor by tensor, in the order of `specs` [(name, dtype, shape)]."""

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.specs = specs
        self.next = 0
        header: dict = {"__metadata__": metadata or {}}
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in _DTYPES:
                raise PhitrainError(f"{name}: dtype {dtype} has no safetensors code")
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)          # the data starts 8-byte aligned, as safetensors writes it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.tmp.open("wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.specs[self.next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise PhitrainError(f"safetensors stream: expected {want_name} {dtype} {tuple(shape)}, "
                                f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():   # the tensor's own bytes, without a copy (a copy would double the peak per tensor)
            self.file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> Path:
        if self.next != len(self.specs):
            raise PhitrainError(f"safetensors stream: {len(self.specs) - self.next} tensors were not written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def stream_tensors(path: Path, specs, produce: Callable[[str], torch.Tensor | None], is_writer: bool,
                   metadata: dict[str, str] | None = None) -> None:
    """Call `produce(name)` for each spec in order (on every rank: it may be a collective) and, on the
    writing rank, append what it returns to the file."""
    stream = SafetensorsStream(path, specs, metadata) if is_writer else None
    try:
        for name, _, _ in specs:
            tensor = produce(name)
            if stream is not None:
                stream.write(name, tensor)
            del tensor
        if stream is not None:
            stream.close()
    except BaseException:
        if stream is not None:
            stream.abort()
        raise


def write_sharded_model(path: Path, named: Iterable[tuple[str, torch.Tensor]], is_writer: bool,
                        metadata: dict[str, str] | None = None) -> None:
    """The model's tensors — FSDP2 `DTensor` shards or plain tensors — gathered one at a time
    (`full_tensor()` is an all-gather every rank joins) and streamed into `path` by the writing rank."""
    tensors = dict(named)
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]

    def produce(name: str) -> torch.Tensor:
        t = tensors[name]
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    stream_tensors(path, specs, produce, is_writer, metadata)


def consolidate_dcp(dcp_dir: Path, out: Path, prefix: str = "model.") -> int:
    """Stream the model tensors of a DCP checkpoint (`dcp/`, as FSDP2 runs write it) into a safetensors
    file, reading one tensor at a time; no process group is needed. Returns the number of tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (dcp_dir / ".metadata").is_file():
        raise PhitrainError(f"{dcp_dir}: not a torch.distributed.checkpoint directory (no .metadata)")
    meta = dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    specs = [(key[len(prefix):], m.properties.dtype, tuple(m.size)) for key, m in sorted(meta.items())
             if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)]
    if not specs:
        raise PhitrainError(f"{dcp_dir}: holds no tensors under {prefix!r}")

    layout = {name: (dtype, shape) for name, dtype, shape in specs}

    def produce(name: str) -> torch.Tensor:
        dtype, shape = layout[name]
        box = {"model": {name: torch.empty(shape, dtype=dtype)}}
        dcp.load(box, checkpoint_id=str(dcp_dir), no_dist=True)
        return box["model"][name]

    stream_tensors(out, specs, produce, True, {"format": "pt", "producer": "phitrain"})
    return len(specs)


def consolidate_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """`phitrain checkpoint consolidate CKPT`: write `CKPT/model.safetensors` from `CKPT/dcp/` (a checkpoint
    saved with `save_consolidated: false`, or any FSDP checkpoint), one tensor in memory at a time."""
    from phitrain.checkpoint import MODEL_FILE

    ckpt = Path(checkpoint)
    if not (ckpt / "dcp" / ".metadata").is_file():
        raise PhitrainError(f"{ckpt}: no dcp/ directory with sharded weights (only FSDP checkpoints have one)")
    consolidate_dcp(ckpt / "dcp", ckpt / MODEL_FILE)
    return ckpt / MODEL_FILE
