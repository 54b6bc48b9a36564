"""Consolidated weights without a full model in memory: the streaming safetensors writer and the offline
`phitrain checkpoint consolidate` of an FSDP checkpoint's DCP shards."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from phitrain.checkpoint import save_checkpoint
from phitrain.cli import main
from phitrain.errors import PhitrainError
from phitrain.model.phi import PhiModel
from phitrain.train.consolidate import SafetensorsStream, consolidate_dcp, write_sharded_model

from conftest import tiny_config


def test_stream_writes_what_safetensors_reads(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.zeros(0, 4)}
    write_sharded_model(tmp_path / "x.safetensors", tensors.items(), True, {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    stream = SafetensorsStream(tmp_path / "y.safetensors", [("a", torch.float32, (3, 5))])
    with pytest.raises(PhitrainError, match="expected a"):
        stream.write("a", torch.zeros(5, 3))
    stream.abort()
    assert not list(tmp_path.glob(".y.safetensors*")) and not (tmp_path / "y.safetensors").exists()


def test_consolidate_command_rebuilds_weights_from_dcp(tmp_path, capsys):
    model = PhiModel(tiny_config("parallel-hd64"))
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    reference = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()      # as with save_consolidated: false
    dcp.save({"model": model.state_dict(), "optimizer": {"step": torch.tensor(3.0)}},
             checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    assert main(["checkpoint", "consolidate", str(ckpt)]) == 0
    rebuilt = load_file(str(ckpt / "model.safetensors"))
    assert rebuilt.keys() == reference.keys() and all(torch.equal(rebuilt[k], reference[k]) for k in reference)
    assert "model.safetensors" in capsys.readouterr().out
    assert main(["checkpoint", "consolidate", str(tmp_path)]) == 2
    assert "no dcp/" in capsys.readouterr().err
    with pytest.raises(PhitrainError, match="no .metadata"):
        consolidate_dcp(tmp_path, tmp_path / "z.safetensors")
