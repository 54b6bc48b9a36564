"""The main job end to end, as a user runs it (a subprocess of the real CLI), on a small slice of the
standard library and a short budget: data → tokenizer → pretrain → finetune → HumanEval → HF export."""

import json
import os
import subprocess
import sys

import torch


def test_quickstart_smoke(tmp_path):
    run_dir = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "phitrain", "quickstart", "--run-dir", str(run_dir), "--minutes", "0.5",
         "--max-files", "40", "--humaneval-limit", "4"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == json.loads((run_dir / "results.json").read_text())
    assert results["pretrain_steps"] >= 20 and results["finetune_steps"] >= 10
    start, end = results["val_loss"]["pretrain"]
    assert end < start - 1.0                       # it learned something real about the held-out code
    assert results["humaneval_problems"] == 4 and 0.0 <= results["humaneval_pass@1"] <= 1.0
    report = (run_dir / "report.md").read_text()
    for section in ("pretrain", "finetune", "HumanEval pass@1", "Sample completions", "What to expect"):
        assert section in report
    for stage in ("pretrain", "finetune"):
        assert (run_dir / "train" / stage / "loss.png").stat().st_size > 1000
    assert (run_dir / "data" / "stats.json").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
