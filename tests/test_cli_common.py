"""What every command shares: the progress display and the `--device` default."""

from __future__ import annotations

import io

import pytest

from phitrain.cli import build_parser
from phitrain.device import resolve_device
from phitrain.errors import PhitrainError
from phitrain.progress import Progress


def test_progress_on_a_pipe_prints_a_line_every_tenth_and_at_the_end():
    out = io.StringIO()
    with Progress("pretrain", 25, completed=3, file=out, unit="step") as bar:
        for step in range(4, 26):
            bar.update(step, f"loss {1 / step:.4f}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[pretrain] step 4/25  loss 0.2500"
    assert [int(line.split()[2].split("/")[0]) for line in lines] == [4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]
    quiet = io.StringIO()
    with Progress("tests", 7, file=quiet, enabled=False) as bar:
        bar.advance()
    assert quiet.getvalue() == ""


def test_progress_advance_reports_each_tenth_it_crosses():
    out = io.StringIO()
    with Progress("running tests", 100, file=out) as bar:
        for _ in range(33):
            bar.advance(3)     # steps over 10, 20, ... rather than landing on them
        bar.advance()
    assert out.getvalue().splitlines() == [f"[running tests] {n}/100" for n in (12, 21, 30, 42, 51, 60, 72, 81, 90, 100)]


@pytest.mark.parametrize("argv", [["generate", "ckpt", "--prompt", "x", "--max-new-tokens", "1"], ["serve", "ckpt"],
                                  ["eval", "humaneval", "--checkpoint", "ckpt"],
                                  ["eval", "loglik", "--checkpoint", "ckpt", "--task", "t.jsonl"],
                                  ["eval", "ppl", "--checkpoint", "ckpt", "a.txt"]])
def test_every_model_command_defaults_to_device_auto(argv):
    assert build_parser().parse_args(argv).device == "auto"


def test_resolve_device():
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(PhitrainError, match=f"--device {bad}"):
            resolve_device(bad)
